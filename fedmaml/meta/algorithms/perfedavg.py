"""Per-FedAvg, Hessian-free: Fallah, Mokhtari & Ozdaglar, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", NeurIPS 2020, Per-FedAvg (HF).

One temporary step on the support set D, then the gradient of the loss after it on a batch D'
with the Hessian-vector product estimated on a third batch D'':

    θ' = θ − α ∇L_D(θ)
    g  = ∇L_D'(θ') − α H_D''(θ) ∇L_D'(θ')
    H_D''(θ) v ≈ [∇L_D''(θ + δv) − ∇L_D''(θ − δv)] / (2δ),   δ = h / ‖v‖

D' and D'' are the two halves of the episode's query set, its even- and odd-numbered examples:
disjoint, and independent of D (fedmaml's N-way episodes list the query set class by class, so
each half holds every class). A query set needs at least 2 examples.

δ = h/‖v‖ puts the two probe points at distance h from θ whatever the size of v. The default
h = ε^(1/3), ε the machine epsilon of the parameters' type (4.9e-3 in float32, 6.1e-6 in
float64), is the step that balances the central difference's truncation error (∝ h²) against
its rounding error (∝ ε/h); ``PerFedAvg(fd_step=h)`` sets another. ReLU networks (all of
fedmaml's models) have kinks in their gradient: a probe that switches a unit on or off for an
example of D'' adds a jump to the difference, with a probability ∝ h and a size ∝ 1/h, so no h
is exact there. Measured on the sinusoid MLP in float32 (40 meta-batches of 10 episodes,
α = 0.01, against float64), the relative error of the meta-gradient had median 0.43-0.49 and
maximum 4.3-6.2 with h = ε^(1/3); with h = √ε its median was 2e-5-8e-5 but its maximum 24-41
(a tenth of the batches above 3). The default keeps the worst case smallest.

The paper's temporary step is one step (inner_steps = 1). K = inner_steps > 1 applies the same
estimate at each of K steps θ'_{k+1} = θ'_k − α ⊙ ∇L_D(θ'_k), i.e. the exact chain rule of K
steps with every Hessian replaced by its estimate on D'' (and α ⊙ v for learned per-parameter
step sizes, since (I − diag(α) H)ᵀ v = v − H (α ⊙ v)):

    v_K = ∇L_D'(θ'_K),   v_k = v_{k+1} − H_D''(θ'_k) (α ⊙ v_{k+1}),   g = v_0

No second-order graph is built: each episode costs K + 1 + 2K gradients and one forward pass of
the query set (its metrics at θ'_K).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import EpisodeBatch, Pair
from fedmaml.meta.inner import step_size
from fedmaml.meta.params import Params


class PerFedAvg(Algorithm):
    """``fd_step``: the distance h of the finite-difference probes (default: ε^(1/3))."""

    name = "perfedavg"

    def __init__(self, fd_step: float | None = None) -> None:
        if fd_step is not None and not (math.isfinite(fd_step) and fd_step > 0):
            raise FedmamlError(f"fd_step must be a finite number > 0 (got {fd_step})")
        self.fd_step = fd_step

    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        gradient_half, hessian_half = batch.halves(batch.query)
        if hessian_half[1].numel() == 0:
            raise FedmamlError(
                "perfedavg splits each query set into two halves (one for the gradient, one for "
                "the Hessian-vector product) and needs at least 2 query examples per episode "
                "(got 1); raise query-size"
            )
        path = [batch.expand(batch.theta)]
        for _ in range(batch.settings.inner_steps):
            path.append(batch.adapt(path[-1], batch.support, second_order=False, steps=1))
        batch.observe(path[-1])
        v = batch.gradient(path.pop(), gradient_half)
        h = self.fd_step or torch.finfo(next(iter(batch.theta.values())).dtype).eps ** (1 / 3)
        for point in reversed(path):
            u = {k: step_size(batch.settings.inner_lr, k) * g for k, g in v.items()}  # α ⊙ v
            hu = hessian_vector(batch, point, u, hessian_half, h)
            v = {k: v[k] - hu[k] for k in v}
        return batch.mean(v)

    def __repr__(self) -> str:
        return f"PerFedAvg(fd_step={self.fd_step})"


def hessian_vector(batch: EpisodeBatch, point: Params, u: Params, data: Pair, h: float) -> Params:
    """H_data(point) u of every episode by central differences of gradients, the probes at
    distance h from the point along u."""
    plus, minus, delta = batch.map(partial(_probes, h=h), point, u)
    return batch.map(_difference, batch.gradient(plus, data), batch.gradient(minus, data), delta)


def _probes(p: Params, u: Params, h: float) -> tuple[Params, Params, Tensor]:
    """p ± δu with δ = h/‖u‖ (one episode; δ stays finite when u = 0, where Hu = 0)."""
    norm = torch.sqrt(sum((t * t).sum() for t in u.values()))
    delta = h / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return {k: p[k] + delta * u[k] for k in p}, {k: p[k] - delta * u[k] for k in p}, delta


def _difference(plus: Params, minus: Params, delta: Tensor) -> Params:
    return {k: (plus[k] - minus[k]) / (2 * delta) for k in plus}


ALGORITHM = PerFedAvg()
