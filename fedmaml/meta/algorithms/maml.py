"""MAML, second order: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation
of Deep Networks", ICML 2017 (Algorithm 2).

For episodes i = 1..n with support set S_i and query set Q_i, K inner steps

    θ'_{i,0} = θ,   θ'_{i,k+1} = θ'_{i,k} − α ∇L_Si(θ'_{i,k}),   θ'_i = θ'_{i,K}

and the meta-gradient is the exact derivative of the post-adaptation query loss through all K
steps (Hessian-vector products included, by differentiating the inner gradients again):

    g = 1/n Σ_i ∇_θ L_Qi(θ'_i(θ)) = 1/n Σ_i [Π_{k=K−1..0} (I − α ∇²L_Si(θ'_{i,k}))] ∇L_Qi(θ'_i)

The inner steps adapt the parameters of ``adapted`` (all of them here; ANIL subclasses this with
the head only); the gradient reaches every parameter.
"""

from __future__ import annotations

from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import EpisodeBatch, leaves
from fedmaml.meta.inner import gradients
from fedmaml.meta.params import Params


class MAML(Algorithm):
    name = "maml"

    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        start = leaves(batch.theta)
        fast = batch.adapt(batch.expand(start), batch.support, second_order=True)
        return gradients(batch.query_loss(fast) / batch.n, start)


ALGORITHM = MAML()
