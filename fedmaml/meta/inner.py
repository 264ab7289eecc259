"""The inner loop: K steps of gradient descent on a task's support set.

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ⊙ ∇_θ' L_support(θ'_k),   k = 0..K−1

α is one scalar, or one tensor per parameter (Meta-SGD). Only the adapted parameters take the
step (all of them, or e.g. the head: :mod:`fedmaml.meta.adapted`); the others stay as they are.
The gradient of the support loss is computed by a *gradient function* so that one loop serves
both engines: plain autograd on one task, or on a batch of tasks whose parameters carry a
leading task index (the forward pass under ``torch.vmap``), both differentiable again by
``create_graph``. With ``first_order=True`` the inner gradients are treated as constants
(FOMAML, Reptile): dθ'/dθ = I.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.meta.params import InnerLR, Params

LossFn = Callable[[Tensor, Tensor], Tensor]
Names = Sequence[str] | None  # the parameters to differentiate / adapt; None: all
GradFn = Callable[[Params, Tensor, Tensor, Names], Params]


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
    """``grad(p, x, y, names)``: ∇_p L(p; x, y) by ``torch.autograd.grad`` for the parameters
    ``names`` (None: all); differentiable again when ``create_graph``.

    ``batched``: ``p``, ``x`` and ``y`` hold n tasks along their first dimension and the forward
    pass runs under ``torch.vmap``. Task i's loss depends on p[i] only, so one backward pass of
    Σ_i L_i(p[i]) gives every task's gradient: ∂(Σ_j L_j)/∂p[i] = ∇L_i(p[i]).
    """

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return task_loss(model, p, buffers, x, y, loss_fn)[0]

    batch_loss = torch.vmap(loss)

    def grad(p: Params, x: Tensor, y: Tensor, names: Names = None) -> Params:
        if names is None:
            leaves = {k: _leaf(v) for k, v in p.items()}
            wrt = leaves
        else:
            wrt = {k: _leaf(p[k]) for k in names}
            leaves = {**p, **wrt}
        total = batch_loss(leaves, x, y).sum() if batched else loss(leaves, x, y)
        return gradients(total, wrt, create_graph=create_graph)

    return grad


def _leaf(t: Tensor) -> Tensor:
    """``t`` itself when it is already part of a graph, else a fresh leaf to differentiate."""
    return t if t.requires_grad else t.detach().requires_grad_()


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
    adapted: Names = None,
) -> Params:
    """Run K inner steps from ``params`` on the parameters ``adapted`` (None: all) and return
    θ' (differentiable w.r.t. θ and α unless ``first_order``); the others are returned as
    given."""
    x, y = support
    fast = dict(params)
    for _ in range(inner_steps):
        grads = grad_fn(fast, x, y, adapted)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        stepped = {k: fast[k] - step_size(inner_lr, k) * g for k, g in grads.items()}
        fast = stepped if adapted is None else {**fast, **stepped}
    return fast


def step_size(inner_lr: InnerLR, name: str) -> float | Tensor:
    """α for parameter ``name``: the one step size, or that parameter's tensor (Meta-SGD)."""
    return inner_lr if isinstance(inner_lr, float | int) else inner_lr[name]
