"""FedAvg + fine-tuning, the standard personalization baseline: McMahan, Moore, Ramage, Hampson
& Agüera y Arcas, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017.

FedAvg's client update as a pseudo-gradient: K local SGD steps on all of the episode's data,
support ∪ query, and

    g = 1/n Σ_i (θ − θ'_i),   θ'_i = K SGD steps from θ on S_i ∪ Q_i

so that a server SGD step with rate 1 is FedAvg exactly. No meta-learning: the model is then
fine-tuned (evaluated, personalized) like any other.
"""

from __future__ import annotations

from fedmaml.meta.algorithms.reptile import Reptile
from fedmaml.meta.batch import EpisodeBatch, Pair


class FedAvg(Reptile):
    name = "fedavg"

    def local_data(self, batch: EpisodeBatch) -> Pair:
        """Each episode's support ∪ query set."""
        return batch.union


ALGORITHM = FedAvg()
