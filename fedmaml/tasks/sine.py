"""The MAML sinusoid task family (Finn et al., 2017, section 5.1).

Task i is y = A_i sin(x - phi_i) with A_i ~ U[0.1, 5.0], phi_i ~ U[0, pi], x ~ U[-5, 5].
In fedmaml each client is one task: it holds ``points`` training and ``points`` held-out
examples of its own sinusoid. Client ``i`` of a family is a pure function of (seed, split, i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
_SPLIT_OFFSET = {"train": 0, "heldout": 1_000_003, "val": 1_700_021}


@dataclass(frozen=True)
class SineFamily:
    """A seeded, reproducible population of sinusoid clients.

    ``split="train"`` clients take part in training; ``split="heldout"`` (test) and
    ``split="val"`` (validation) clients are unseen tasks drawn from the same distribution with
    random streams of their own.
    """

    seed: int = 0
    points: int = 50
    num_train: int = 100
    num_heldout: int = 20
    loss: str = "mse"
    num_val: int = 0

    def __post_init__(self) -> None:
        if self.points < 2:
            raise FedmamlError(f"a sinusoid client needs at least 2 points (got {self.points})")

    def num_clients(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}.get(split, self.num_heldout)

    def model_kwargs(self) -> dict[str, int]:
        return {}

    def client(self, index: int, split: str = "train") -> ClientData:
        if split not in _SPLIT_OFFSET:
            raise FedmamlError(f"unknown split {split!r}; use 'train', 'val' or 'heldout'")
        if not 0 <= index < self.num_clients(split):
            raise FedmamlError(
                f"sinusoid {split} client {index} does not exist "
                f"(0..{self.num_clients(split) - 1}); raise the number of {split} clients"
            )
        g = torch.Generator().manual_seed(self.seed * 2_000_003 + _SPLIT_OFFSET[split] + index)
        amplitude = _uniform(g, *AMPLITUDE, 1).item()
        phase = _uniform(g, *PHASE, 1).item()
        x = _uniform(g, *X_RANGE, 2 * self.points).unsqueeze(1)
        y = amplitude * torch.sin(x - phase)
        return ClientData(
            client_id=f"sine-{split}-{index}",
            x=x[: self.points],
            y=y[: self.points],
            x_test=x[self.points :],
            y_test=y[self.points :],
            meta={"amplitude": f"{amplitude:.6f}", "phase": f"{phase:.6f}"},
        )


def _uniform(g: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g)
