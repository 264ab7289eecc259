"""Episode batches: what an algorithm computes its meta-gradient on, on either engine.

An algorithm (:mod:`fedmaml.meta.algorithms`) is written once against :class:`EpisodeBatch`
and runs unchanged on both engines:

* :class:`Episode`, the loop engine: one episode; θ'_i has θ's shapes.
* :class:`StackedEpisodes`, the vmap engine: n episodes of equal shapes stacked along a new
  first dimension. θ is expanded to n copies θ_i (views: nothing is copied), the forward passes
  run under ``torch.vmap`` and plain autograd differentiates them
  (``autograd_grad_fn(batched=True)``): one backward pass of Σ_i L_i(θ'_i) through the
  expansion gives Σ_i ∇_θ L_i. On the sinusoid MLP this is 1.3-1.4x faster than
  ``vmap(torch.func.grad(...))`` (``benchmarks/README.md``); and differentiating a vmapped
  ``torch.func.grad`` from outside returns wrong second-order gradients through BatchNorm,
  LayerNorm and InstanceNorm in torch 2.13.
* :class:`PerEpisodeStack`: the same with one copy θ_i of θ per episode, so that the result
  keeps every episode's own meta-gradient (many users' meta-gradients in one batch).

Per-episode quantities (θ_i, θ'_i, ∇L(θ'_i)) carry the episode dimension on the vmap engine;
shared ones (θ, and gradients with respect to θ) never do. The operations:

    expand(θ)               θ_i = θ for every episode i
    adapt(θ_i, data, ...)   θ'_i: inner steps on each episode's data, first or second order
    query_loss(θ'_i)        Σ_i L_Qi(θ'_i), differentiable; records the query metrics
    observe(θ'_i)           records the query metrics, without a graph
    evaluate(θ'_i)          the query loss (and accuracy) of each episode, without a graph
    gradient(p_i, data)     ∇L_data_i(p_i) of each episode (first order)
    mean(x_i)               1/n Σ_i x_i
    map(f, x_i, ...)        f applied to each episode's tensors
    halves(data)            each episode's data split into even- and odd-numbered examples

The recorded metrics hold ``loss_after`` (and ``accuracy_after`` for integer labels) and, when
``metrics_before``, the same at θ, all from one forward pass per query set at each point.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedmaml.meta.inner import GradFn, LossFn, autograd_grad_fn, inner_loop, task_loss
from fedmaml.meta.params import InnerLR, Params

Pair = tuple[Tensor, Tensor]
Row = dict[str, Tensor]


@dataclass(frozen=True)
class Settings:
    """What every episode of one call shares. ``inner_lr`` holds no graph (Meta-SGD makes its
    own leaves of it); ``adapted`` names the parameters the inner loop adapts (None: all)."""

    model: nn.Module
    buffers: Params
    loss_fn: LossFn
    inner_steps: int
    inner_lr: InnerLR
    adapted: tuple[str, ...] | None = None
    metrics_before: bool = True


def leaves(params: Params) -> Params:
    """Fresh leaf tensors to differentiate with respect to (the tensors of ``params``)."""
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


class EpisodeBatch(ABC):
    """The episodes an algorithm works on, and the operations it may use (module docstring)."""

    batched: ClassVar[bool]
    #: θ holds one copy per episode along a first dimension (:class:`PerEpisodeStack`)
    theta_per_episode: ClassVar[bool] = False

    def __init__(self, settings: Settings, theta: Params, support: Pair, query: Pair) -> None:
        self.settings = settings
        self.theta = theta  # θ without a graph: where the metrics before adaptation are taken
        self.support = support
        self.query = query
        self.metrics: Row | None = None
        self._grad_fns: dict[bool, GradFn] = {}

    def adapt(
        self,
        start: Params,
        data: Pair,
        *,
        second_order: bool,
        lr: InnerLR | None = None,
        steps: int | None = None,
    ) -> Params:
        """θ'_i after ``steps`` (default K) inner steps from ``start`` on ``data`` with step size
        ``lr`` (default α), on the adapted parameters; differentiable through the steps when
        ``second_order``, else with dθ'/dθ = I."""
        s = self.settings
        return inner_loop(
            start,
            data,
            self._grad_fn(create_graph=second_order),
            inner_steps=s.inner_steps if steps is None else steps,
            inner_lr=s.inner_lr if lr is None else lr,
            first_order=not second_order,
            adapted=s.adapted,
        )

    def gradient(self, params: Params, data: Pair) -> Params:
        """∇_p L(p_i; data_i) of every episode, for all parameters, without a graph."""
        return self._grad_fn(create_graph=False)(params, data[0], data[1], None)

    def _grad_fn(self, *, create_graph: bool) -> GradFn:
        fn = self._grad_fns.get(create_graph)
        if fn is None:
            s = self.settings
            fn = autograd_grad_fn(
                s.model, s.buffers, s.loss_fn, create_graph=create_graph, batched=self.batched
            )
            self._grad_fns[create_graph] = fn
        return fn

    def _at(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, output) without a graph."""
        with torch.no_grad():
            return self._loss(params, x, y)

    def _loss(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s = self.settings
        return task_loss(s.model, params, s.buffers, x, y, s.loss_fn)

    def _query_row(self, fast: Params, x: Tensor, y: Tensor, theta: Params) -> tuple[Tensor, Row]:
        """One episode's L_Q(θ') and its metrics at θ' (and at its θ)."""
        before = self._at(theta, x, y) if self.settings.metrics_before else None
        after = self._loss(fast, x, y)
        return after[0], metric_row(before, after, y)

    def _evaluate_one(self, fast: Params, x: Tensor, y: Tensor) -> Row:
        loss, out = self._loss(fast, x, y)
        return metrics_of(loss, out, y, "")

    @property
    @abstractmethod
    def n(self) -> int:
        """The number of episodes."""

    @property
    @abstractmethod
    def union(self) -> Pair:
        """Each episode's support ∪ query set."""

    @abstractmethod
    def expand(self, params: Params) -> Params: ...

    @abstractmethod
    def mean(self, per_episode: Params) -> Params: ...

    @abstractmethod
    def map(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    @abstractmethod
    def halves(self, data: Pair) -> tuple[Pair, Pair]: ...

    @abstractmethod
    def query_loss(self, fast: Params) -> Tensor: ...

    @abstractmethod
    def observe(self, fast: Params) -> None: ...

    @abstractmethod
    def evaluate(self, fast: Params) -> Row: ...


class Episode(EpisodeBatch):
    """One episode (the loop engine)."""

    batched = False

    @property
    def n(self) -> int:
        return 1

    @property
    def union(self) -> Pair:
        (sx, sy), (qx, qy) = self.support, self.query
        return torch.cat([sx, qx]), torch.cat([sy, qy])

    def expand(self, params: Params) -> Params:
        return params

    def mean(self, per_episode: Params) -> Params:
        return per_episode

    def map(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def halves(self, data: Pair) -> tuple[Pair, Pair]:
        x, y = data
        return (x[0::2], y[0::2]), (x[1::2], y[1::2])

    def query_loss(self, fast: Params) -> Tensor:
        loss, self.metrics = self._query_row(fast, *self.query, self.theta)
        return loss

    def observe(self, fast: Params) -> None:
        with torch.no_grad():
            _, self.metrics = self._query_row(fast, *self.query, self.theta)

    def evaluate(self, fast: Params) -> Row:
        with torch.no_grad():
            return self._evaluate_one(fast, *self.query)


class StackedEpisodes(EpisodeBatch):
    """n episodes of equal shapes, stacked along a new first dimension (the vmap engine)."""

    batched = True

    def __init__(
        self, settings: Settings, theta: Params, supports: list[Pair], queries: list[Pair]
    ) -> None:
        super().__init__(settings, theta, _stack(supports), _stack(queries))
        self._n = len(supports)

    @property
    def n(self) -> int:
        return self._n

    @property
    def union(self) -> Pair:
        (sx, sy), (qx, qy) = self.support, self.query
        return torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)

    def expand(self, params: Params) -> Params:
        """n copies of every tensor along a new first dimension (views: nothing is copied)."""
        n = self._n
        return {k: v.expand(n, *v.shape) for k, v in params.items()}

    def mean(self, per_episode: Params) -> Params:
        return {k: v.mean(0) for k, v in per_episode.items()}

    def map(self, fn: Callable[..., Any], *args: Any) -> Any:
        return torch.vmap(fn)(*args)

    def halves(self, data: Pair) -> tuple[Pair, Pair]:
        x, y = data
        return (x[:, 0::2], y[:, 0::2]), (x[:, 1::2], y[:, 1::2])

    def query_loss(self, fast: Params) -> Tensor:
        losses, self.metrics = self._rows(fast)
        return losses.sum()

    def observe(self, fast: Params) -> None:
        with torch.no_grad():
            _, self.metrics = self._rows(fast)

    def _rows(self, fast: Params) -> tuple[Tensor, Row]:
        """Every episode's query loss and metrics (θ is shared, or per episode)."""
        theta_dim = 0 if self.theta_per_episode else None
        rows = torch.vmap(self._query_row, in_dims=(0, 0, 0, theta_dim))
        return rows(fast, *self.query, self.theta)

    def evaluate(self, fast: Params) -> Row:
        with torch.no_grad():
            return torch.vmap(self._evaluate_one)(fast, *self.query)


class PerEpisodeStack(StackedEpisodes):
    """Episodes stacked as in :class:`StackedEpisodes`, but each with its own copy θ_i of θ
    (and of learned step sizes α_i), so that an algorithm's result holds every episode's own
    meta-gradient along the first dimension instead of their mean: ``mean`` keeps the episodes
    apart and ``n`` is 1, so an algorithm's 1/n Σ_i becomes the per-episode term, and
    ∂(Σ_j L_j)/∂θ_i = ∇_θ L_i. The caller takes the means it needs (one per user:
    :func:`fedmaml.meta.gradient.meta_gradients`)."""

    theta_per_episode = True

    def __init__(
        self, settings: Settings, theta: Params, supports: list[Pair], queries: list[Pair]
    ) -> None:
        n = len(supports)
        lr = settings.inner_lr
        if isinstance(lr, dict):
            settings = dataclasses.replace(settings, inner_lr=_copies(lr, n))
        super().__init__(settings, _copies(theta, n), supports, queries)

    @property
    def n(self) -> int:
        return 1

    def expand(self, params: Params) -> Params:
        return params  # one copy per episode already

    def mean(self, per_episode: Params) -> Params:
        return per_episode


def _copies(params: Params, n: int) -> Params:
    """n copies of every tensor along a new first dimension (real copies: each its own leaf)."""
    return {k: v.expand(n, *v.shape).clone() for k, v in params.items()}


def metrics_of(loss: Tensor, out: Tensor, y: Tensor, suffix: str) -> Row:
    """``loss`` and, for integer labels, ``accuracy`` (names ending in ``suffix``)."""
    row = {"loss" + suffix: loss.detach()}
    if not torch.is_floating_point(y):
        row["accuracy" + suffix] = (out.detach().argmax(-1) == y).float().mean()
    return row


def metric_row(
    before: tuple[Tensor, Tensor] | None, after: tuple[Tensor, Tensor], y: Tensor
) -> Row:
    """One episode's query metrics from (loss, output) at θ (if given) and at θ' (also under
    ``vmap``)."""
    row = {} if before is None else metrics_of(*before, y, "_before")
    row.update(metrics_of(*after, y, "_after"))
    return row


def _stack(pairs: list[Pair]) -> Pair:
    x, y = (torch.stack(t) for t in zip(*pairs, strict=True))
    return x, y
