"""The inner loop: K steps of gradient descent on a task's support set.

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ⊙ ∇_θ' L_support(θ'_k),   k = 0..K−1

α is one scalar, or one tensor per parameter (Meta-SGD). The gradient of the support loss is
computed by a *gradient function* so that one loop serves both engines: plain autograd (one
task at a time, differentiable by ``create_graph``) and ``torch.func.grad`` (composable with
``vmap`` over a batch of tasks). With ``first_order=True`` the inner gradients are treated as
constants (FOMAML, Reptile): dθ'/dθ = I.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.meta.params import InnerLR, Params

LossFn = Callable[[Tensor, Tensor], Tensor]
GradFn = Callable[[Params, Tensor, Tensor], Params]


def task_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
) -> tuple[Tensor, Tensor]:
    """L(f_params(x), y) and the model's output, without touching the module's own state."""
    out = functional_call(model, (dict(params), dict(buffers)), (x,))
    return loss_fn(out, y), out


def autograd_grad_fn(
    model: nn.Module, buffers: Mapping[str, Tensor], loss_fn: LossFn, *, create_graph: bool
) -> GradFn:
    """∇_p L(p; x, y) by ``torch.autograd.grad``; differentiable again when ``create_graph``."""

    def grad(p: Params, x: Tensor, y: Tensor) -> Params:
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in p.items()}
        loss, _ = task_loss(model, leaves, buffers, x, y, loss_fn)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), create_graph=create_graph, allow_unused=True
        )
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(leaves.items(), grads, strict=True)
        }

    return grad


def func_grad_fn(model: nn.Module, buffers: Mapping[str, Tensor], loss_fn: LossFn) -> GradFn:
    """∇_p L(p; x, y) by ``torch.func.grad``: composable with ``vmap`` and an outer ``grad``."""

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return task_loss(model, p, buffers, x, y, loss_fn)[0]

    return torch.func.grad(loss)


def inner_loop(
    params: Params,
    support: tuple[Tensor, Tensor],
    grad_fn: GradFn,
    *,
    inner_steps: int,
    inner_lr: InnerLR,
    first_order: bool,
) -> Params:
    """Run K inner steps from ``params`` and return θ' (differentiable w.r.t. θ and α unless
    ``first_order``)."""
    x, y = support
    fast = dict(params)
    for _ in range(inner_steps):
        grads = grad_fn(fast, x, y)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {k: fast[k] - _step_size(inner_lr, k) * grads[k] for k in fast}
    return fast


def _step_size(inner_lr: InnerLR, name: str) -> float | Tensor:
    return inner_lr if isinstance(inner_lr, float | int) else inner_lr[name]
