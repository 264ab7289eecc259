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

import torch
from torch import Tensor, nn

from fedmaml.meta import inputs, validate
from fedmaml.meta.adapted import Adapted, adapted_names
from fedmaml.meta.algorithms import resolve
from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import Pair, Settings
from fedmaml.meta.choices import BATCHING
from fedmaml.meta.engines import choose_engine
from fedmaml.meta.inner import LossFn, autograd_grad_fn, inner_loop
from fedmaml.meta.params import InnerLR, Params, split_inner_lrs


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
    supports = validate.as_episodes("support", support)
    queries = validate.as_episodes("query", query)
    validate.check_pairing(supports, queries)
    device = inputs.device_of(theta)
    supports = [inputs.to_device(p, device) for p in supports]
    queries = [inputs.to_device(p, device) for p in queries]
    bufs = inputs.own_buffers(model, buffers)
    engine = choose_engine(model, bufs, supports, queries, batching)
    settings = Settings(
        model=model,
        buffers=bufs,
        loss_fn=loss_fn,
        inner_steps=inner_steps,
        inner_lr=lr if isinstance(lr, float | int) else {k: v.detach() for k, v in lr.items()},
        adapted=adapted_names(model, algo.adapted),
        metrics_before=metrics_before,
    )
    with inputs.clear_errors("support/query", supports[0]):
        grads, metrics = engine(algo, settings, theta, supports, queries)
    validate.check_finite("the meta-gradient", grads)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise validate.NonFiniteError(
            f"the query loss is NaN or Inf ({metrics}); lower inner_lr or check the data; "
            "nothing was updated"
        )
    return grads, metrics
