"""Adaptation curves: how good θ'_k is on the query set after k = 0..K inner steps.

    θ'_0 = θ,  θ'_{k+1} = θ'_k − α ⊙ ∇L_support(θ'_k);   report L_query(θ'_k) (and accuracy)

This is the evaluation protocol of MAML (k = 0 is the model before adaptation) and the way a
trained θ is personalized to a user. No second-order graph is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from fedmaml.meta import validate
from fedmaml.meta.inner import autograd_grad_fn, inner_loop, task_loss
from fedmaml.meta.inputs import clear_errors
from fedmaml.meta.params import InnerLR, Params, split_inner_lrs

Pair = tuple[Tensor, Tensor]


def adaptation_curve(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support: Pair,
    query: Pair,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    inner_lr: InnerLR = 0.01,
) -> tuple[list[dict[str, float]], Params]:
    """Query metrics for k = 0..``steps`` and the adapted parameters θ'_steps.

    Learned step sizes in ``params`` (Meta-SGD) replace ``inner_lr``. Each entry holds ``loss``
    and, for integer labels, ``accuracy``.
    """
    theta, alpha = split_inner_lrs(params)
    validate.check_params(model, theta)
    validate.check_steps(steps)
    lr: InnerLR = {k: v.detach() for k, v in alpha.items()} or inner_lr
    validate.check_inner_lr(lr)
    [support] = validate.as_episodes("support", support)
    [query] = validate.as_episodes("query", query)
    validate.check_pairing([support], [query])
    device = next(iter(theta.values())).device
    support = (support[0].to(device), support[1].to(device))
    qx, qy = query[0].to(device), query[1].to(device)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    grad_fn = autograd_grad_fn(model, buffers, loss_fn, create_graph=False)
    fast = {k: v.detach() for k, v in theta.items()}
    curve = []
    with clear_errors("support/query", support):
        for k in range(steps + 1):
            if k:
                fast = inner_loop(
                    fast, support, grad_fn, inner_steps=1, inner_lr=lr, first_order=True
                )
                fast = {name: v.detach() for name, v in fast.items()}
            with torch.no_grad():
                loss, out = task_loss(model, fast, buffers, qx, qy, loss_fn)
            entry = {"loss": float(loss)}
            if not torch.is_floating_point(qy):
                entry["accuracy"] = float((out.argmax(-1) == qy).float().mean())
            curve.append(entry)
    validate.check_finite("the adapted parameters", fast)
    return curve, fast
