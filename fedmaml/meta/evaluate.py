"""Adaptation curves: how good θ'_k is on the query set after k = 0..K inner steps.

    θ'_0 = θ,  θ'_{k+1} = θ'_k − α ⊙ ∇L_support(θ'_k);   report L_query(θ'_k) (and accuracy)

on the adapted parameters (all, or the head: :mod:`fedmaml.meta.adapted`). This is the
evaluation protocol of MAML (k = 0 is the model before adaptation) and the way a trained θ is
personalized to a user. :func:`adaptation_curve` gives one episode's curve and θ'_K,
:func:`adaptation_curves` those of many episodes (users), batched with ``torch.vmap`` where the
engine choice (:func:`fedmaml.meta.engines.uses_vmap`) says so, and :func:`mean_curve` their
mean. No second-order graph is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fedmaml.errors import NonFiniteError
from fedmaml.meta import inputs, validate
from fedmaml.meta.adapted import Adapted, adapted_names
from fedmaml.meta.batch import (
    Episode,
    EpisodeBatch,
    Pair,
    Row,
    Settings,
    StackedEpisodes,
    detached,
)
from fedmaml.meta.choices import BATCHING
from fedmaml.meta.engines import shapes, uses_vmap
from fedmaml.meta.inner import LossFn
from fedmaml.meta.params import InnerLR, Params, split_inner_lrs

Curve = list[dict[str, float]]


class AdaptationDiverged(NonFiniteError):
    """Adaptation made an episode's parameters or query metrics NaN or Inf; ``episode`` is the
    index of the first such episode."""

    def __init__(self, episode: int) -> None:
        super().__init__(
            f"adaptation diverged on episode {episode} (the adapted parameters or the query loss "
            "are NaN or Inf); lower inner_lr or the number of steps, or check the data for "
            "extreme values"
        )
        self.episode = episode


def adaptation_curve(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Pair,
    query: Pair,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: InnerLR = 0.01,
    adapted: Adapted = "all",
) -> tuple[Curve, Params]:
    """Query metrics for k = 0..``steps`` and the adapted parameters θ'_steps (``steps`` = 0:
    the metrics of θ itself, and θ).

    Learned step sizes in ``params`` (Meta-SGD) replace ``inner_lr``. Each entry holds ``loss``
    and, for integer labels, ``accuracy``. Raises :class:`AdaptationDiverged` when θ'_k or a
    metric is not finite.
    """
    settings, theta, [support], [query] = _prepare(
        model, params, support, query, loss_fn, steps, inner_lr, adapted
    )
    [curve], fast = _run(Episode(settings, theta, support, query), [0])
    return curve, fast


def adaptation_curves(
    model: nn.Module,
    params: Mapping[str, Tensor],
    supports: Sequence[Pair],
    queries: Sequence[Pair],
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: InnerLR = 0.01,
    adapted: Adapted = "all",
    batching: str = "auto",
    chunk_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[Curve]:
    """The curves of many episodes (e.g. one per user), in their order.

    Episodes of equal shapes run together under ``torch.vmap``, ``chunk_size`` at a time, when
    :func:`~fedmaml.meta.engines.uses_vmap` says so for ``batching``; the others one at a time.
    Both give the curves of :func:`adaptation_curve`. ``progress(m)`` is called each time m more
    episodes are done. Raises :class:`AdaptationDiverged` naming the first diverged episode of
    the first chunk that holds one.
    """
    validate.check_choice("batching", batching, BATCHING)
    validate.check_chunk_size(chunk_size)
    settings, theta, supports_, queries_ = _prepare(
        model, params, list(supports), list(queries), loss_fn, steps, inner_lr, adapted
    )
    vmap = uses_vmap(model, settings.buffers, batching)
    groups: dict[tuple, list[int]] = {}
    for i, (s, q) in enumerate(zip(supports_, queries_, strict=True)):
        key = shapes(s, q) if vmap else (i,)
        groups.setdefault(key, []).append(i)
    curves: list[Curve] = [[] for _ in supports_]
    for members in groups.values():
        for start in range(0, len(members), chunk_size):
            chunk = members[start : start + chunk_size]
            batch: EpisodeBatch = (
                Episode(settings, theta, supports_[chunk[0]], queries_[chunk[0]])
                if len(chunk) == 1
                else StackedEpisodes(
                    settings, theta, [supports_[i] for i in chunk], [queries_[i] for i in chunk]
                )
            )
            for i, curve in zip(chunk, _run(batch, chunk)[0], strict=True):
                curves[i] = curve
            if progress is not None:
                progress(len(chunk))
    return curves


def mean_curve(curves: Sequence[Sequence[Mapping[str, float]]]) -> Curve:
    """The entry-wise mean of equal-length curves, m_k = 1/n Σ_i c_i[k] for every metric (an
    empty curve when there are none)."""
    if not curves:
        return []
    n = len(curves)
    return [
        {name: sum(c[k][name] for c in curves) / n for name in curves[0][k]}
        for k in range(len(curves[0]))
    ]


def _prepare(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Pair | list[Pair],
    query: Pair | list[Pair],
    loss_fn: LossFn,
    steps: int,
    inner_lr: InnerLR,
    adapted: Adapted,
) -> tuple[Settings, Params, list[Pair], list[Pair]]:
    """Checked settings, θ without a graph, and the episodes on θ's device."""
    theta, alpha = split_inner_lrs(params)
    validate.check_params(model, theta)
    validate.check_steps(steps, minimum=0)
    lr: InnerLR = {k: v.detach() for k, v in alpha.items()} or inner_lr
    validate.check_inner_lr(lr)
    names = adapted_names(model, adapted)
    supports = validate.as_episodes("support", support)
    queries = validate.as_episodes("query", query)
    validate.check_pairing(supports, queries)
    device = inputs.device_of(theta)
    supports = [inputs.to_device(p, device) for p in supports]
    queries = [inputs.to_device(p, device) for p in queries]
    settings = Settings(
        model=model,
        buffers=inputs.own_buffers(model),
        loss_fn=loss_fn,
        inner_steps=steps,
        inner_lr=lr,
        adapted=names,
        metrics_before=False,
    )
    return settings, detached(theta), supports, queries


def _run(batch: EpisodeBatch, indices: list[int]) -> tuple[list[Curve], Params]:
    """The curves of the batch's episodes (``indices``: their numbers, for the error) and
    θ'_K, checked to be finite."""
    with inputs.clear_errors("support/query", _first(batch)):
        fast = batch.expand(batch.theta)
        rows = [batch.evaluate(fast)]
        for _ in range(batch.settings.inner_steps):
            fast = batch.adapt(fast, batch.support, second_order=False, steps=1)
            rows.append(batch.evaluate(fast))
    curves = _curves(rows, batch.n)
    params_finite = torch.stack(
        [torch.isfinite(v).reshape(batch.n, -1).all(1) for v in fast.values()]
    ).all(0)
    for i, curve, ok in zip(indices, curves, params_finite.tolist(), strict=True):
        if not ok or not all(math.isfinite(v) for entry in curve for v in entry.values()):
            raise AdaptationDiverged(i)
    return curves, fast


def _curves(rows: list[Row], n: int) -> list[Curve]:
    """Per-step rows of per-episode metrics -> one curve (list of per-step dicts) per episode."""
    columns = {
        k: torch.stack([row[k] for row in rows]).reshape(len(rows), n).T.tolist() for k in rows[0]
    }
    return [
        [{k: columns[k][i][step] for k in columns} for step in range(len(rows))] for i in range(n)
    ]


def _first(batch: EpisodeBatch) -> Pair:
    """The first episode's support set (the shapes an error message names)."""
    x, y = batch.support
    return (x[0], y[0]) if batch.batched else (x, y)
