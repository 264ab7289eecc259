"""What an algorithm is: its mean meta-gradient over a batch of episodes, written once for both
engines against :class:`~fedmaml.meta.batch.EpisodeBatch`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from fedmaml.meta.adapted import Adapted
from fedmaml.meta.batch import EpisodeBatch
from fedmaml.meta.params import Params


class Algorithm(ABC):
    """One meta-learning algorithm.

    ``adapted``: which parameters its inner loop adapts (``"all"`` or ``"head"``, see
    :mod:`fedmaml.meta.adapted`); evaluation and personalization of its models adapt the same
    ones. ``learns_inner_lr``: the meta-parameters hold learned step sizes α (Meta-SGD), which
    start at ``inner_lr`` when absent.
    """

    name: ClassVar[str]
    adapted: ClassVar[Adapted] = "all"
    learns_inner_lr: ClassVar[bool] = False

    @abstractmethod
    def meta_gradient(self, batch: EpisodeBatch) -> Params:
        """The mean over ``batch``'s episodes of the meta-gradient (or update direction) at θ
        (``batch.theta``, without a graph), with θ's keys (and α's, as ``inner_lr.<name>``, when
        ``learns_inner_lr``).

        The query metrics are those of the last ``batch.query_loss`` or ``batch.observe`` call:
        make exactly one.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
