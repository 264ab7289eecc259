"""The two engines that run an algorithm over a client's episodes, and the choice between them.

* loop: one :class:`~fedmaml.meta.batch.Episode` at a time on ``torch.autograd.grad``, the mean
  of their meta-gradients: fastest for compute-bound models such as conv nets, where vmap is
  1.4-2.4x slower and needs 3-5x the memory;
* vmap: all episodes at once as one :class:`~fedmaml.meta.batch.StackedEpisodes`: 6-7x faster
  than the loop on the sinusoid MLP, where Python overhead dominates.

``batching="auto"`` picks by model (:func:`uses_vmap`), for meta-gradients and adaptation curves
alike. Measured in ``benchmarks/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from fedmaml.errors import FedmamlError
from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import (
    Episode,
    Pair,
    PerEpisodeStack,
    Row,
    Settings,
    StackedEpisodes,
    detached,
)
from fedmaml.meta.params import Params

Engine = Callable[
    [Algorithm, Settings, Params, list[Pair], list[Pair]], tuple[Params, dict[str, float]]
]


def loop_engine(
    algorithm: Algorithm,
    settings: Settings,
    theta: Params,
    supports: list[Pair],
    queries: list[Pair],
) -> tuple[Params, dict[str, float]]:
    """1/n Σ_i of each episode's meta-gradient, one episode at a time, and the mean metrics."""
    start = detached(theta)
    total: Params = {}
    rows: list[Row] = []
    for support, query in zip(supports, queries, strict=True):
        episode = Episode(settings, start, support, query)
        grads = algorithm.meta_gradient(episode)
        total = grads if not total else {k: total[k] + grads[k] for k in total}
        rows.append(_recorded(episode.metrics, algorithm))
    n = len(supports)
    return {k: v / n for k, v in total.items()}, summarise(rows, queries)


def vmap_engine(
    algorithm: Algorithm,
    settings: Settings,
    theta: Params,
    supports: list[Pair],
    queries: list[Pair],
) -> tuple[Params, dict[str, float]]:
    """The same over all episodes at once, stacked, under ``torch.vmap``."""
    batch = StackedEpisodes(settings, detached(theta), supports, queries)
    grads = algorithm.meta_gradient(batch)
    return grads, summarise([_recorded(batch.metrics, algorithm)], queries)


def per_episode_engine(
    algorithm: Algorithm,
    settings: Settings,
    theta: Params,
    supports: list[Pair],
    queries: list[Pair],
) -> tuple[Params, Row]:
    """Every episode's own meta-gradient (stacked along the first dimension) and metric rows,
    all episodes at once under ``torch.vmap`` (:class:`~fedmaml.meta.batch.PerEpisodeStack`)."""
    batch = PerEpisodeStack(settings, detached(theta), supports, queries)
    grads = algorithm.meta_gradient(batch)
    return {k: v.detach() for k, v in grads.items()}, _recorded(batch.metrics, algorithm)


def choose_engine(
    model: nn.Module,
    buffers: Mapping[str, Tensor],
    supports: list[Pair],
    queries: list[Pair],
    batching: str,
) -> Engine:
    """The vmap engine for several episodes of equal shapes when :func:`uses_vmap` (or one
    episode with ``batching="vmap"``), else the loop; ``vmap`` refuses ragged episodes."""
    same = same_shapes(supports, queries)
    if batching == "vmap" and not same:
        raise FedmamlError(
            "batching='vmap' needs every episode to have the same shapes; use batching='loop'"
        )
    vmap = (batching == "vmap" or (len(supports) > 1 and same)) and uses_vmap(
        model, buffers, batching
    )
    return vmap_engine if vmap else loop_engine


def uses_vmap(model: nn.Module, buffers: Mapping[str, Tensor], batching: str) -> bool:
    """Whether episodes (or users) of equal shapes run together under ``torch.vmap``: always
    for ``vmap`` (which refuses buffers: running statistics cannot be updated under vmap),
    never for ``loop``, and for ``auto`` when the model has no buffers and
    :func:`prefers_vmap`."""
    if batching == "vmap":
        if buffers:
            raise FedmamlError(
                "batching='vmap' cannot run a model with buffers (e.g. BatchNorm running "
                "statistics); use batching='loop' or BatchNorm(track_running_stats=False)"
            )
        return True
    return batching == "auto" and not buffers and prefers_vmap(model)


def prefers_vmap(model: nn.Module) -> bool:
    """vmap wins where per-task Python overhead dominates (small dense models); convolutions are
    compute-bound and run faster, with far less memory, one episode at a time (see
    ``benchmarks/core_speed.py``)."""
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def same_shapes(supports: list[Pair], queries: list[Pair]) -> bool:
    return len({shapes(s, q) for s, q in zip(supports, queries, strict=True)}) == 1


def shapes(support: Pair, query: Pair) -> tuple[torch.Size, ...]:
    """An episode's shapes: episodes with equal shapes can be stacked for vmap."""
    return support[0].shape, support[1].shape, query[0].shape, query[1].shape


def summarise(rows: list[Row], queries: list[Pair]) -> dict[str, float]:
    """Each metric's mean over the episodes; a row holds one episode or (vmap) a batch of them."""
    metrics = {k: float(torch.cat([r[k].reshape(-1) for r in rows]).mean()) for k in rows[0]}
    metrics["num_query"] = float(sum(q[0].shape[0] for q in queries))
    metrics["num_episodes"] = float(len(queries))
    return metrics


def _recorded(metrics: Row | None, algorithm: Algorithm) -> Row:
    if metrics is None:
        raise FedmamlError(
            f"algorithm {algorithm!r} recorded no query metrics; its meta_gradient must call "
            "batch.query_loss or batch.observe once"
        )
    return metrics
