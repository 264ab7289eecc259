"""First-order MAML: Finn, Abbeel & Levine, ICML 2017, §5.2 ("first-order approximation").

MAML's meta-gradient with the second derivatives dropped: the inner gradients are treated as
constants, so dθ'/dθ = I and

    g = 1/n Σ_i ∇_θ' L_Qi(θ'_i),   θ'_i = K first-order inner steps from θ on S_i

(the query gradient at the adapted parameters, applied to θ).
"""

from __future__ import annotations

from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import EpisodeBatch
from fedmaml.meta.inner import gradients
from fedmaml.meta.params import Params


class FOMAML(Algorithm):
    name = "fomaml"

    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        fast = batch.adapt(batch.expand(batch.theta), batch.support, second_order=False)
        adapted = {k: v.requires_grad_() for k, v in fast.items()}  # new tensors: θ'_i
        return batch.mean(gradients(batch.query_loss(adapted), adapted))  # row i: ∇L_Qi(θ'_i)


ALGORITHM = FOMAML()
