"""Meta-gradients of one client's episodes, the heart of fedmaml, and plain adaptation.

For episodes i = 1..n with support set S_i and query set Q_i (θ'_i = inner loop from θ on S_i),
each algorithm of :mod:`fedmaml.meta.algorithms` gives its own mean meta-gradient:

* ``maml``      g = 1/n Σ_i ∇_θ L_Qi(θ'_i(θ))          exact second order, through all K steps
* ``fomaml``    g = 1/n Σ_i ∇_θ' L_Qi(θ'_i)             inner gradients treated as constants
* ``metasgd``   (g_θ, g_α) = 1/n Σ_i ∇_(θ,α) L_Qi(θ'_i(θ, α)),  α learned per parameter
* ``reptile``   g = 1/n Σ_i (θ − θ'_i)                 θ' after K first-order steps on S_i
* ``fedavg``    g = 1/n Σ_i (θ − θ'_i)                 θ' after K local SGD steps on S_i ∪ Q_i
* ``anil``      MAML whose inner loop adapts the head only
* ``perfedavg`` Per-FedAvg (HF): ∇L_D'(θ') − α H_D''(θ) ∇L_D'(θ'), the Hessian-vector product by
  finite differences on the other half D'' of the query set

computed by one of two engines (:mod:`fedmaml.meta.engines`): a per-episode loop, or
``torch.vmap`` over the stacked episodes; ``batching="auto"`` picks by model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fedmaml.errors import FedmamlError
from fedmaml.meta import inputs, validate
from fedmaml.meta.adapted import Adapted, adapted_names
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import Pair, Settings
from fedmaml.meta.choices import BATCHING
from fedmaml.meta.engines import choose_engine, per_episode_engine, same_shapes, uses_vmap
from fedmaml.meta.inner import LossFn, autograd_grad_fn, inner_loop
from fedmaml.meta.params import InnerLR, Params, split_inner_lrs

#: most episodes one vmap call of :func:`meta_gradients` stacks (bounds its memory)
CHUNK = 1024


def adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Pair,
    *,
    loss_fn: LossFn,
    inner_steps: int = 1,
    inner_lr: InnerLR = 0.01,
    first_order: bool = False,
    buffers: Mapping[str, Tensor] | None = None,
    adapted: Adapted = "all",
) -> Params:
    """θ' after ``inner_steps`` steps θ ← θ − α ⊙ ∇L_support(θ) on the ``adapted`` parameters
    (``"all"``, ``"head"`` or a collection of names, :mod:`fedmaml.meta.adapted`); the others
    are returned unchanged.

    ``params`` may hold learned step sizes (keys ``inner_lr.<name>``, as Meta-SGD trains them);
    they then replace ``inner_lr``. The result is differentiable w.r.t. ``params`` (and α) when
    those require grad, unless ``first_order``.
    """
    theta, alpha = split_inner_lrs(params)
    validate.check_params(model, theta)
    validate.check_steps(inner_steps)
    lr: InnerLR = alpha or inner_lr
    validate.check_inner_lr(lr)
    names = adapted_names(model, adapted)
    [support] = validate.as_episodes("support", support)
    support = inputs.to_device(support, inputs.device_of(theta))
    grad_fn = autograd_grad_fn(
        model, inputs.own_buffers(model, buffers), loss_fn, create_graph=not first_order
    )
    with inputs.clear_errors("support", support):
        fast = inner_loop(
            theta,
            support,
            grad_fn,
            inner_steps=inner_steps,
            inner_lr=lr,
            first_order=first_order,
            adapted=names,
        )
    validate.check_finite("the adapted parameters", fast)
    return fast


def meta_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Pair | Sequence[Pair],
    query: Pair | Sequence[Pair],
    *,
    loss_fn: LossFn,
    algorithm: str | Algorithm = "maml",
    inner_steps: int = 1,
    inner_lr: InnerLR = 0.01,
    batching: str = "auto",
    buffers: Mapping[str, Tensor] | None = None,
    metrics_before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """The meta-gradient of one or several episodes (averaged) and their query metrics.

    ``algorithm``: a name of :data:`fedmaml.meta.algorithms.ALGORITHMS` or an
    :class:`~fedmaml.meta.algorithms.base.Algorithm`. ``params`` holds θ
    (``dict(model.named_parameters())``); for ``metasgd`` it may also hold the learned step
    sizes α under ``inner_lr.<name>`` keys, else α starts at ``inner_lr`` everywhere (other
    algorithms use α as fixed step sizes). Returns ``(grads, metrics)``: ``grads`` has the keys
    of θ (and of α for ``metasgd``); ``metrics`` holds ``loss_before`` / ``loss_after`` (query
    loss at θ and at θ') and, when the labels are integers (classification),
    ``accuracy_before`` / ``accuracy_after``, plus ``num_query`` and ``num_episodes``.
    ``metrics_before=False`` leaves out the ``*_before`` metrics and the no-grad forward of each
    query set at θ they cost (11-18% of a conv4 call, ``benchmarks/README.md``). Nothing is
    modified in place.
    """
    call = _Call.of(model, params, loss_fn, algorithm, inner_steps, inner_lr, batching, buffers)
    supports, queries = call.episodes(support, query)
    engine = choose_engine(model, call.buffers, supports, queries, batching)
    with inputs.clear_errors("support/query", supports[0]):
        grads, metrics = engine(
            call.algorithm, call.settings(metrics_before), call.theta, supports, queries
        )
    return _checked(grads, metrics)


def meta_gradients(
    model: nn.Module,
    params: Mapping[str, Tensor],
    supports: Sequence[Sequence[Pair]],
    queries: Sequence[Sequence[Pair]],
    *,
    loss_fn: LossFn,
    algorithm: str | Algorithm = "maml",
    inner_steps: int = 1,
    inner_lr: InnerLR = 0.01,
    batching: str = "auto",
    buffers: Mapping[str, Tensor] | None = None,
    metrics_before: bool = True,
    chunk: int = CHUNK,
) -> list[tuple[Params, dict[str, float]] | FedmamlError]:
    """The meta-gradients of several users at once: entry u is what
    ``meta_gradient(model, params, supports[u], queries[u], ...)`` returns for user u's episodes
    (equal up to float rounding), or the :class:`~fedmaml.errors.FedmamlError` that call raises
    (that user's only: the others are unaffected).

    When every episode has the same shapes and the model runs under vmap (:func:`uses_vmap`:
    small dense models, where per-user Python overhead dominates), the episodes of all users run
    as one batch (``chunk`` episodes at most per vmap call), each episode with its own copy θ_i
    of θ (:class:`~fedmaml.meta.batch.PerEpisodeStack`), and user u's meta-gradient is the mean
    over its episodes E_u: g_u = 1/|E_u| Σ_{i∈E_u} g_i, its metrics the means of its episodes'.
    Otherwise (conv nets, ragged episodes, ``batching="loop"``) each user's call runs on its
    own. A user whose meta-gradient or query loss is not finite fails alone.
    """
    if len(supports) != len(queries):
        raise FedmamlError(f"{len(supports)} users' support sets but {len(queries)} query sets")
    call = _Call.of(model, params, loss_fn, algorithm, inner_steps, inner_lr, batching, buffers)
    try:
        users = [call.episodes(s, q) for s, q in zip(supports, queries, strict=True)]
        flat_s = [p for s, _ in users for p in s]
        flat_q = [p for _, q in users for p in q]
        batched = (
            len(flat_s) > 1
            and same_shapes(flat_s, flat_q)
            and uses_vmap(model, call.buffers, batching)
        )
    except FedmamlError:
        batched = False  # a user's episodes are malformed: each call names its own problem
    if not batched:
        own = partial(
            _one,
            model,
            params,
            loss_fn=loss_fn,
            algorithm=algorithm,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            batching=batching,
            buffers=buffers,
            metrics_before=metrics_before,
        )
        return [own(s, q) for s, q in zip(supports, queries, strict=True)]
    settings = call.settings(metrics_before)
    grads, rows = [], []
    with inputs.clear_errors("support/query", flat_s[0]):
        for a in range(0, len(flat_s), chunk):
            g, row = per_episode_engine(
                call.algorithm, settings, call.theta, flat_s[a : a + chunk], flat_q[a : a + chunk]
            )
            grads.append(g)
            rows.append(row)
    per_episode = {k: torch.cat([g[k] for g in grads]) for k in grads[0]}
    metric_rows = {k: torch.cat([r[k].reshape(-1) for r in rows]) for k in rows[0]}
    results: list[tuple[Params, dict[str, float]] | FedmamlError] = []
    begin = 0
    for _, user_queries in users:
        end = begin + len(user_queries)
        user_grads = {k: v[begin:end].mean(0) for k, v in per_episode.items()}
        metrics = {k: float(v[begin:end].mean()) for k, v in metric_rows.items()}
        metrics["num_query"] = float(sum(q[0].shape[0] for q in user_queries))
        metrics["num_episodes"] = float(len(user_queries))
        try:
            results.append(_checked(user_grads, metrics))
        except FedmamlError as exc:
            results.append(exc)
        begin = end
    return results


def _one(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Sequence[Pair],
    query: Sequence[Pair],
    **settings: Any,
) -> tuple[Params, dict[str, float]] | FedmamlError:
    """One user's :func:`meta_gradient`, or its error."""
    try:
        return meta_gradient(model, params, support, query, **settings)
    except FedmamlError as exc:
        return exc


@dataclass(frozen=True)
class _Call:
    """What one meta-gradient call shares: checked algorithm, θ, step sizes and buffers."""

    model: nn.Module
    algorithm: Algorithm
    theta: Params
    lr: InnerLR
    loss_fn: LossFn
    inner_steps: int
    buffers: Params
    device: torch.device

    @classmethod
    def of(
        cls,
        model: nn.Module,
        params: Mapping[str, Tensor],
        loss_fn: LossFn,
        algorithm: str | Algorithm,
        inner_steps: int,
        inner_lr: InnerLR,
        batching: str,
        buffers: Mapping[str, Tensor] | None,
    ) -> _Call:
        algo = resolve(algorithm)
        validate.check_choice("batching", batching, BATCHING)
        validate.check_steps(inner_steps)
        theta, alpha = split_inner_lrs(params)
        validate.check_params(model, theta)
        if algo.learns_inner_lr and not alpha:
            validate.check_inner_lr(inner_lr)
            alpha = {k: torch.full_like(v, float(inner_lr)) for k, v in theta.items()}  # type: ignore[arg-type]
        lr: InnerLR = alpha or inner_lr
        validate.check_inner_lr(lr)
        bufs = inputs.own_buffers(model, buffers)
        return cls(model, algo, theta, lr, loss_fn, inner_steps, bufs, inputs.device_of(theta))

    def episodes(
        self, support: Pair | Sequence[Pair], query: Pair | Sequence[Pair]
    ) -> tuple[list[Pair], list[Pair]]:
        """Checked episodes on θ's device."""
        supports = validate.as_episodes("support", support)
        queries = validate.as_episodes("query", query)
        validate.check_pairing(supports, queries)
        return (
            [inputs.to_device(p, self.device) for p in supports],
            [inputs.to_device(p, self.device) for p in queries],
        )

    def settings(self, metrics_before: bool) -> Settings:
        lr = self.lr
        return Settings(
            model=self.model,
            buffers=self.buffers,
            loss_fn=self.loss_fn,
            inner_steps=self.inner_steps,
            inner_lr=lr if isinstance(lr, float | int) else {k: v.detach() for k, v in lr.items()},
            adapted=adapted_names(self.model, self.algorithm.adapted),
            metrics_before=metrics_before,
        )


def _checked(grads: Params, metrics: dict[str, float]) -> tuple[Params, dict[str, float]]:
    """``(grads, metrics)`` once both are finite, else the error that says what to do."""
    validate.check_finite("the meta-gradient", grads)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise validate.NonFiniteError(
            f"the query loss is NaN or Inf ({metrics}); lower inner_lr or check the data; "
            "nothing was updated"
        )
    return grads, metrics
