"""Where tensors live: CUDA when available, CPU otherwise, overridable by name."""

from __future__ import annotations

import torch

from fedmaml.errors import FedmamlError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: ``cuda`` if a GPU is visible, else ``cpu``; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedmamlError(
            f"device {name!r} was asked for but no CUDA GPU is visible; use 'cpu' or 'auto'"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise FedmamlError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
