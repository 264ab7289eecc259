"""The inner loop: K steps of gradient descent on a task's support set.

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ⊙ ∇_θ' L_support(θ'_k),   k = 0..K−1

α is one scalar, or one tensor per parameter (Meta-SGD). The gradient of the support loss is
computed by a *gradient function* so that one loop serves every engine: plain autograd on one
task, or on a batch of tasks whose parameters carry a leading task index (the forward pass under
``torch.vmap``), both differentiable again by ``create_graph``. With ``first_order=True`` the
inner gradients are treated as constants (FOMAML, Reptile): dθ'/dθ = I.
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
    model: nn.Module,
    buffers: Mapping[str, Tensor],
    loss_fn: LossFn,
    *,
    create_graph: bool,
    batched: bool = False,
) -> GradFn:
    """∇_p L(p; x, y) by ``torch.autograd.grad``; differentiable again when ``create_graph``.

    ``batched``: ``p``, ``x`` and ``y`` hold n tasks along their first dimension and the forward
    pass runs under ``torch.vmap``. Task i's loss depends on p[i] only, so one backward pass of
    Σ_i L_i(p[i]) gives every task's gradient: ∂(Σ_j L_j)/∂p[i] = ∇L_i(p[i]).
    """

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return task_loss(model, p, buffers, x, y, loss_fn)[0]

    batch_loss = torch.vmap(loss)

    def grad(p: Params, x: Tensor, y: Tensor) -> Params:
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in p.items()}
        total = batch_loss(leaves, x, y).sum() if batched else loss(leaves, x, y)
        return gradients(total, leaves, create_graph=create_graph)

    return grad


def gradients(loss: Tensor, wrt: Mapping[str, Tensor], *, create_graph: bool = False) -> Params:
    """∂loss/∂t for every t in ``wrt`` by ``torch.autograd.grad``; zeros where loss ignores t."""
    grads = torch.autograd.grad(
        loss, list(wrt.values()), create_graph=create_graph, allow_unused=True
    )
    return {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(wrt.items(), grads, strict=True)
    }


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
