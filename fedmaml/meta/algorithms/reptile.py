"""Reptile: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018.

K first-order inner steps on each support set, and the mean displacement as the update
direction (the outer step θ ← θ − β g moves θ towards the adapted parameters):

    g = 1/n Σ_i (θ − θ'_i),   θ'_i = K first-order inner steps from θ on S_i

The query set is used for the metrics only.
"""

from __future__ import annotations

from fedmaml.meta.algorithms.base import Algorithm
from fedmaml.meta.batch import EpisodeBatch, Pair
from fedmaml.meta.params import Params


class Reptile(Algorithm):
    name = "reptile"

    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        start = batch.theta
        fast = batch.adapt(batch.expand(start), self.local_data(batch), second_order=False)
        batch.observe(fast)
        return {k: start[k] - v for k, v in batch.mean(fast).items()}

    def local_data(self, batch: EpisodeBatch) -> Pair:
        """The data the inner steps run on: each episode's support set."""
        return batch.support


ALGORITHM = Reptile()
