"""Meta-gradients of one client's episodes, the heart of fedmaml.

For episodes i = 1..n with support set S_i and query set Q_i (θ' = inner loop from θ on S_i):

* ``maml``     g = 1/n Σ_i ∇_θ L_Qi(θ'_i(θ))          exact second order, through all K steps
* ``fomaml``   g = 1/n Σ_i ∇_θ' L_Qi(θ'_i)             inner gradients treated as constants
* ``metasgd``  (g_θ, g_α) = 1/n Σ_i ∇_(θ,α) L_Qi(θ'_i(θ, α)),  α learned per parameter
* ``reptile``  g = 1/n Σ_i (θ − θ'_i)                 θ' after K first-order steps on S_i
* ``fedavg``   g = 1/n Σ_i (θ − θ'_i)                 θ' after K local SGD steps on S_i ∪ Q_i:
  FedAvg's client update as a pseudo-gradient (server SGD with step 1 is FedAvg exactly); no
  meta-learning, the standard personalization baseline.

Two engines compute the same thing: a per-episode loop on ``torch.autograd.grad`` (fastest for
compute-bound models such as conv nets, where vmap is 1.4-2.4x slower and needs 3-5x the
memory) and ``torch.vmap`` over stacked episodes (6-7x faster than the loop on the sinusoid MLP,
where Python overhead dominates); ``batching="auto"`` picks by model. Measured in
``benchmarks/README.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fedmaml.errors import FedmamlError
from fedmaml.meta import validate
from fedmaml.meta.inner import (
    LossFn,
    autograd_grad_fn,
    gradients,
    inner_loop,
    task_loss,
)
from fedmaml.meta.params import INNER_LR_PREFIX, InnerLR, Params, split_inner_lrs

Pair = tuple[Tensor, Tensor]
FIRST_ORDER = ("fomaml", "reptile", "fedavg")  # no gradient through the inner loop


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
) -> Params:
    """θ' after ``inner_steps`` steps θ ← θ − α ⊙ ∇L_support(θ).

    ``params`` may hold learned step sizes (keys ``inner_lr.<name>``, as Meta-SGD trains them);
    they then replace ``inner_lr``. The result is differentiable w.r.t. ``params`` (and α) when
    those require grad, unless ``first_order``.
    """
    theta, alpha = split_inner_lrs(params)
    validate.check_params(model, theta)
    validate.check_steps(inner_steps)
    lr: InnerLR = alpha or inner_lr
    validate.check_inner_lr(lr)
    [support] = validate.as_episodes("support", support)
    support = _to(support, _device(theta))
    grad_fn = autograd_grad_fn(
        model, _buffers(model, buffers), loss_fn, create_graph=not first_order
    )
    with _clear_errors("support", support):
        fast = inner_loop(
            theta, support, grad_fn, inner_steps=inner_steps, inner_lr=lr, first_order=first_order
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
    algorithm: str = "maml",
    inner_steps: int = 1,
    inner_lr: InnerLR = 0.01,
    batching: str = "auto",
    buffers: Mapping[str, Tensor] | None = None,
    metrics_before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """The meta-gradient of one or several episodes (averaged) and their query metrics.

    ``params`` holds θ (``dict(model.named_parameters())``); for ``metasgd`` it may also hold the
    learned step sizes α under ``inner_lr.<name>`` keys, else α starts at ``inner_lr`` everywhere.
    Returns ``(grads, metrics)``: ``grads`` has the keys of θ (and of α for ``metasgd``);
    ``metrics`` holds ``loss_before`` / ``loss_after`` (query loss at θ and at θ') and, when the
    labels are integers (classification), ``accuracy_before`` / ``accuracy_after``, plus
    ``num_query`` and ``num_episodes``. ``metrics_before=False`` leaves out the ``*_before``
    metrics and the no-grad forward of each query set at θ they cost (11-18% of a conv4 call,
    ``benchmarks/README.md``). Nothing is modified in place.
    """
    validate.check_choice("algorithm", algorithm, validate.ALGORITHMS)
    validate.check_choice("batching", batching, validate.BATCHING)
    validate.check_steps(inner_steps)
    theta, alpha = split_inner_lrs(params)
    validate.check_params(model, theta)
    if algorithm == "metasgd" and not alpha:
        validate.check_inner_lr(inner_lr)
        alpha = {k: torch.full_like(v, float(inner_lr)) for k, v in theta.items()}  # type: ignore[arg-type]
    lr: InnerLR = alpha or inner_lr
    validate.check_inner_lr(lr)
    supports = validate.as_episodes("support", support)
    queries = validate.as_episodes("query", query)
    validate.check_pairing(supports, queries)
    device = _device(theta)
    supports = [_to(p, device) for p in supports]
    queries = [_to(p, device) for p in queries]
    bufs = _buffers(model, buffers)
    engine = _engine(model, bufs, supports, queries, batching)
    with _clear_errors("support/query", supports[0]):
        grads, metrics = engine(
            model,
            theta,
            alpha,
            lr,
            bufs,
            supports,
            queries,
            loss_fn,
            algorithm,
            inner_steps,
            metrics_before,
        )
    validate.check_finite("the meta-gradient", grads)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise validate.NonFiniteError(
            f"the query loss is NaN or Inf ({metrics}); lower inner_lr or check the data; "
            "nothing was updated"
        )
    return grads, metrics


# --------------------------------------------------------------------------- per-episode loop


def _loop_engine(
    model: nn.Module,
    theta: Params,
    alpha: Params,
    lr: InnerLR,
    buffers: Params,
    supports: list[Pair],
    queries: list[Pair],
    loss_fn: LossFn,
    algorithm: str,
    steps: int,
    metrics_before: bool,
) -> tuple[Params, dict[str, float]]:
    total: Params = {}
    rows: list[dict[str, Tensor]] = []
    for support, query in zip(supports, queries, strict=True):
        grads, row = _loop_episode(
            model,
            theta,
            alpha,
            lr,
            buffers,
            support,
            query,
            loss_fn,
            algorithm,
            steps,
            metrics_before,
        )
        total = grads if not total else {k: total[k] + grads[k] for k in total}
        rows.append(row)
    n = len(supports)
    return {k: v / n for k, v in total.items()}, _summarise(rows, queries)


def _loop_episode(
    model: nn.Module,
    theta: Params,
    alpha: Params,
    lr: InnerLR,
    buffers: Params,
    support: Pair,
    query: Pair,
    loss_fn: LossFn,
    algorithm: str,
    steps: int,
    metrics_before: bool,
) -> tuple[Params, dict[str, Tensor]]:
    """One episode's gradient and metrics. The pre-adaptation metrics cost one no-grad forward
    of the query set at θ: 11-18% of an episode of 5-way 1-shot conv4 (75 query, 5 support)."""
    qx, qy = query
    before = _at(model, theta, buffers, qx, qy, loss_fn) if metrics_before else None
    if algorithm in FIRST_ORDER:
        data = _union(support, query) if algorithm == "fedavg" else support
        start = {k: v.detach() for k, v in theta.items()}
        fast = inner_loop(
            start,
            data,
            autograd_grad_fn(model, buffers, loss_fn, create_graph=False),
            inner_steps=steps,
            inner_lr=_detached(lr),
            first_order=True,
        )
        if algorithm != "fomaml":
            grads = {k: start[k] - fast[k] for k in start}
            return grads, _row(before, _at(model, fast, buffers, qx, qy, loss_fn), qy)
        leaves = {k: v.requires_grad_() for k, v in fast.items()}  # dθ'/dθ = I: ∇_θ' L_Q
        after = task_loss(model, leaves, buffers, qx, qy, loss_fn)
        return gradients(after[0], leaves), _row(before, after, qy)
    leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
    learned = (
        {k: v.detach().requires_grad_() for k, v in alpha.items()} if algorithm == "metasgd" else {}
    )
    fast = inner_loop(
        leaves,
        support,
        autograd_grad_fn(model, buffers, loss_fn, create_graph=True),
        inner_steps=steps,
        inner_lr=learned or _detached(lr),
        first_order=False,
    )
    after = task_loss(model, fast, buffers, qx, qy, loss_fn)
    wrt = {**leaves, **{INNER_LR_PREFIX + k: v for k, v in learned.items()}}
    return gradients(after[0], wrt), _row(before, after, qy)


# --------------------------------------------------------------------------- vmap over episodes


def _vmap_engine(
    model: nn.Module,
    theta: Params,
    alpha: Params,
    lr: InnerLR,
    buffers: Params,
    supports: list[Pair],
    queries: list[Pair],
    loss_fn: LossFn,
    algorithm: str,
    steps: int,
    metrics_before: bool,
) -> tuple[Params, dict[str, float]]:
    """All n episodes at once: θ is expanded to n copies (θ_i, one per episode), the forward
    passes run under ``torch.vmap`` and plain autograd differentiates them (see
    ``autograd_grad_fn(batched=True)``); one backward pass of 1/n Σ_i L_Qi(θ'_i) through the
    expansion then gives the mean meta-gradient. On the sinusoid MLP this is 1.3-1.4x faster
    than ``vmap(torch.func.grad(...))`` (``benchmarks/README.md``). (Differentiating a vmapped
    ``torch.func.grad`` from outside instead returns wrong second-order gradients through
    BatchNorm, LayerNorm and InstanceNorm in torch 2.13.)"""
    n = len(supports)
    sx, sy = _stack(supports)
    qx, qy = _stack(queries)

    start = {k: v.detach() for k, v in theta.items()}

    def query(p: Params, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_Q(θ') of one episode, and its metrics at θ and θ' (one vmap call for all)."""
        before = _at(model, start, buffers, x, y, loss_fn) if metrics_before else None
        after = task_loss(model, p, buffers, x, y, loss_fn)
        return after[0], _row(before, after, y)

    if algorithm in FIRST_ORDER:
        data = (
            (torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)) if algorithm == "fedavg" else (sx, sy)
        )
        fast = inner_loop(
            _expand(start, n),
            data,
            autograd_grad_fn(model, buffers, loss_fn, create_graph=False, batched=True),
            inner_steps=steps,
            inner_lr=_detached(lr),
            first_order=True,
        )
        if algorithm != "fomaml":
            with torch.no_grad():
                _, row = torch.vmap(query)(fast, qx, qy)
            return {k: start[k] - fast[k].mean(0) for k in start}, _summarise([row], queries)
        leaves = {k: v.requires_grad_() for k, v in fast.items()}  # dθ'/dθ = I: ∇_θ' L_Q
        losses, row = torch.vmap(query)(leaves, qx, qy)
        grads = gradients(losses.sum(), leaves)  # row i: ∇L_Qi(θ'_i)
        return {k: g.mean(0) for k, g in grads.items()}, _summarise([row], queries)
    leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
    learned = (
        {k: v.detach().requires_grad_() for k, v in alpha.items()} if algorithm == "metasgd" else {}
    )
    fast = inner_loop(
        _expand(leaves, n),
        (sx, sy),
        autograd_grad_fn(model, buffers, loss_fn, create_graph=True, batched=True),
        inner_steps=steps,
        inner_lr=learned or _detached(lr),
        first_order=False,
    )
    losses, row = torch.vmap(query)(fast, qx, qy)
    wrt = {**leaves, **{INNER_LR_PREFIX + k: v for k, v in learned.items()}}
    return gradients(losses.mean(), wrt), _summarise([row], queries)


# --------------------------------------------------------------------------- helpers


def _engine(
    model: nn.Module, buffers: Params, supports: list[Pair], queries: list[Pair], batching: str
):
    same_shapes = (
        len(
            {
                (s[0].shape, s[1].shape, q[0].shape, q[1].shape)
                for s, q in zip(supports, queries, strict=True)
            }
        )
        == 1
    )
    if batching == "vmap":
        if not same_shapes:
            raise FedmamlError(
                "batching='vmap' needs every episode to have the same shapes; use batching='loop'"
            )
        if buffers:
            raise FedmamlError(
                "batching='vmap' cannot run a model with buffers (e.g. BatchNorm running "
                "statistics); use batching='loop' or BatchNorm(track_running_stats=False)"
            )
        return _vmap_engine
    if batching == "loop" or len(supports) == 1 or not same_shapes or buffers:
        return _loop_engine
    return _vmap_engine if prefers_vmap(model) else _loop_engine


def prefers_vmap(model: nn.Module) -> bool:
    """vmap wins where per-task Python overhead dominates (small dense models); convolutions are
    compute-bound and run faster, with far less memory, one episode at a time (see
    ``benchmarks/core_speed.py``)."""
    return not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _at(
    model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, loss_fn: LossFn
) -> tuple[Tensor, Tensor]:
    """(loss, output) without a graph."""
    with torch.no_grad():
        return task_loss(model, params, buffers, x, y, loss_fn)


def _row(
    before: tuple[Tensor, Tensor] | None, after: tuple[Tensor, Tensor], y: Tensor
) -> dict[str, Tensor]:
    """One episode's query metrics from (loss, output) at θ (if given) and at θ' (also under
    ``vmap``)."""
    points = {"after": after} if before is None else {"before": before, "after": after}
    row = {}
    for when, (loss, out) in points.items():
        row[f"loss_{when}"] = loss.detach()
        if not torch.is_floating_point(y):
            row[f"accuracy_{when}"] = (out.detach().argmax(-1) == y).float().mean()
    return row


def _summarise(rows: list[dict[str, Tensor]], queries: list[Pair]) -> dict[str, float]:
    """Each metric's mean over the episodes; a row holds one episode or (vmap) a batch of them."""
    metrics = {k: float(torch.cat([r[k].reshape(-1) for r in rows]).mean()) for k in rows[0]}
    metrics["num_query"] = float(sum(q[0].shape[0] for q in queries))
    metrics["num_episodes"] = float(len(queries))
    return metrics


def _expand(params: Params, n: int) -> Params:
    """n copies of every tensor along a new first dimension (views: nothing is copied)."""
    return {k: v.expand(n, *v.shape) for k, v in params.items()}


def _stack(pairs: list[Pair]) -> Pair:
    x, y = (torch.stack(t) for t in zip(*pairs, strict=True))
    return x, y


def _union(a: Pair, b: Pair) -> Pair:
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def _detached(lr: InnerLR) -> InnerLR:
    return lr if isinstance(lr, float | int) else {k: v.detach() for k, v in lr.items()}


def _device(theta: Mapping[str, Tensor]) -> torch.device:
    return next(iter(theta.values())).device


def _to(pair: Pair, device: torch.device) -> Pair:
    x, y = pair
    return pair if x.device == device and y.device == device else (x.to(device), y.to(device))


def _buffers(model: nn.Module, buffers: Mapping[str, Tensor] | None) -> Params:
    """Copies of the module's buffers: adaptation never mutates the module's running state."""
    source = dict(model.named_buffers()) if buffers is None else buffers
    return {k: v.clone() for k, v in source.items()}


class _clear_errors:
    """Turn a shape error from deep inside the model into one FedmamlError naming the data."""

    def __init__(self, name: str, sample: Pair) -> None:
        self.name, self.sample = name, sample

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if (
            kind is not None
            and issubclass(kind, RuntimeError)
            and not isinstance(exc, FedmamlError)
        ):
            x, y = self.sample
            raise FedmamlError(
                f"the model could not run on {self.name} data with inputs of shape "
                f"{tuple(x.shape)} ({x.dtype}) and labels {tuple(y.shape)} ({y.dtype}): "
                f"{str(exc).splitlines()[0]}; check that the data matches the model "
                "(input shape, label type for the loss)"
            ) from exc
