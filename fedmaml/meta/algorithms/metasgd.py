"""Meta-SGD: Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
2017.

MAML with a learned step size per parameter entry, α (same shape as θ), meta-learned with θ:

    θ'_{i,k+1} = θ'_{i,k} − α ⊙ ∇L_Si(θ'_{i,k}),   (g_θ, g_α) = 1/n Σ_i ∇_(θ,α) L_Qi(θ'_i(θ, α))

second order through all K steps. α is stored with θ under ``inner_lr.<name>`` keys and starts
at ``inner_lr`` when the meta-parameters do not hold it yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import Tensor

from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import EpisodeBatch, leaves
from fedmaml.meta.inner import gradients
from fedmaml.meta.params import INNER_LR_PREFIX, Params


class MetaSGD(Algorithm):
    name = "metasgd"
    learns_inner_lr = True

    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        start = leaves(batch.theta)
        alpha = leaves(dict(cast(Mapping[str, Tensor], batch.settings.inner_lr)))
        fast = batch.adapt(batch.expand(start), batch.support, second_order=True, lr=alpha)
        wrt = {**start, **{INNER_LR_PREFIX + k: v for k, v in alpha.items()}}
        return gradients(batch.query_loss(fast) / batch.n, wrt)


ALGORITHM = MetaSGD()
