"""A data source: a population of clients (train and held-out), each one a task.

Sources are lazy: ``client(i, split)`` builds one client's data only, so a federated client
process loads just its own partition.
"""

from __future__ import annotations

from typing import Protocol

from fedmaml.tasks.episodes import ClientData

#: training clients, validation clients (never trained on; the personalization recipe is
#: chosen on them), held-out clients (never trained on; unseen users, the test group)
SPLITS = ("train", "val", "heldout")


class TaskSource(Protocol):
    """What every data source offers."""

    #: ``"mse"`` (regression) or ``"cross_entropy"`` (classification)
    loss: str

    def num_clients(self, split: str) -> int:
        """How many clients the split holds (train: seen in training; val and heldout: never
        seen)."""
        ...

    def client(self, index: int, split: str = "train") -> ClientData:
        """Client ``index`` of ``split``, with a training pool and a held-out pool."""
        ...

    def model_kwargs(self) -> dict[str, int]:
        """Arguments for the source's default model (e.g. number of classes)."""
        ...
