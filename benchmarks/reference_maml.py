"""A straightforward per-task MAML meta-gradient: the yardstick for ``fedmaml.meta``.

Written independently of ``fedmaml.meta`` (it must not import it), following the algorithm
learn2learn's ``MAML`` runs: for each task i, clone θ into the autograd graph, take K inner SGD
steps on the support set

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ∇_θ' L_S(θ'_k)      (autograd.grad, create_graph = second order)

then back-propagate the query loss L_Q(θ'_K) to θ and accumulate; the result is
g = 1/n Σ_i ∇_θ L_Qi(θ'_i). First order treats the inner gradients as constants (dθ'/dθ = I).
By default no metrics are computed: this is the bare meta-gradient. ``with_metrics=True`` also
returns what fedmaml's default call returns, computed the plain way: the mean query loss and
accuracy (classification) before adaptation (a no-grad forward at θ) and after it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

Pair = tuple[Tensor, Tensor]


def reference_meta_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    tasks: Sequence[tuple[Pair, Pair]],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inner_steps: int,
    inner_lr: float,
    first_order: bool,
    with_metrics: bool = False,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, float]]:
    """The mean meta-gradient over ``tasks`` (each a ``(support, query)`` pair of ``(x, y)``),
    and with ``with_metrics`` the mean query metrics before and after adaptation."""
    theta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    buffers = dict(model.named_buffers())
    sums: dict[str, float] = {}

    def record(when: str, out: Tensor, loss: Tensor, y: Tensor) -> None:
        sums[f"loss_{when}"] = sums.get(f"loss_{when}", 0.0) + loss.item() / len(tasks)
        if not y.is_floating_point():
            accuracy = (out.argmax(-1) == y).float().mean().item()
            sums[f"accuracy_{when}"] = sums.get(f"accuracy_{when}", 0.0) + accuracy / len(tasks)

    for (sx, sy), (qx, qy) in tasks:
        if with_metrics:
            with torch.no_grad():
                out = functional_call(model, (theta, buffers), (qx,))
                record("before", out, loss_fn(out, qy), qy)
        fast = dict(theta)
        for _ in range(inner_steps):
            loss = loss_fn(functional_call(model, (fast, buffers), (sx,)), sy)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {
                k: w - inner_lr * (g.detach() if first_order else g)
                for (k, w), g in zip(fast.items(), grads, strict=True)
            }
        out = functional_call(model, (fast, buffers), (qx,))
        query_loss = loss_fn(out, qy)
        (query_loss / len(tasks)).backward()
        if with_metrics:
            record("after", out.detach(), query_loss.detach(), qy)
    grads = {k: v.grad for k, v in theta.items()}
    return (grads, sums) if with_metrics else grads  # type: ignore[return-value]
