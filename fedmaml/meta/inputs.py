"""Inputs at the core's edge: data moved to θ's device, private copies of the buffers, and
errors from deep inside the model turned into one FedmamlError naming the data."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from torch import Tensor, nn

from fedmaml.errors import FedmamlError
from fedmaml.meta.params import Params

Pair = tuple[Tensor, Tensor]


def device_of(theta: Mapping[str, Tensor]) -> torch.device:
    return next(iter(theta.values())).device


def to_device(pair: Pair, device: torch.device) -> Pair:
    x, y = pair
    return pair if x.device == device and y.device == device else (x.to(device), y.to(device))


def own_buffers(model: nn.Module, buffers: Mapping[str, Tensor] | None = None) -> Params:
    """Copies of the module's buffers (or of ``buffers``): adaptation never mutates the
    module's running state."""
    source = dict(model.named_buffers()) if buffers is None else buffers
    return {k: v.clone() for k, v in source.items()}


class clear_errors:
    """Turn a shape error from deep inside the model into one FedmamlError naming the data."""

    def __init__(self, name: str, sample: Pair) -> None:
        self.name, self.sample = name, sample

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if (
            kind is not None
            and issubclass(kind, RuntimeError)
            and not isinstance(exc, FedmamlError)
        ):
            x, y = self.sample
            raise FedmamlError(
                f"the model could not run on {self.name} data with inputs of shape "
                f"{tuple(x.shape)} ({x.dtype}) and labels {tuple(y.shape)} ({y.dtype}): "
                f"{str(exc).splitlines()[0]}; check that the data matches the model "
                "(input shape, label type for the loss)"
            ) from exc
