"""Model registry: the networks of the MAML and LEAF papers, built by name.

* ``sine_mlp``: MAML's sinusoid regressor, 1-40-40-1 with ReLU.
* ``conv4``: MAML's Omniglot network, four blocks of 3x3 convolution (64 filters, stride 2),
  BatchNorm and ReLU, then a linear N-way head. BatchNorm uses *batch statistics* always
  (``track_running_stats=False``), as in MAML: inside an inner loop each adapted model normalises
  with its own support or query batch, and no running buffers are mutated by adaptation.
* ``mlp``: a ReLU MLP for tabular data (in_features -> hidden -> hidden -> out_features).
* ``femnist_cnn``: the LEAF FEMNIST CNN (two 5x5 conv + max-pool blocks of 32 and 64 filters,
  a 2048-unit hidden layer, 62 classes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedmaml.errors import FedmamlError


def sine_mlp(hidden: int = 40) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def conv4(
    ways: int = 5, in_channels: int = 1, filters: int = 64, image_size: int = 28
) -> nn.Module:
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, filters, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
        ]
        channels, size = filters, (size + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * size * size, ways))


def mlp(in_features: int, out_features: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_features),
    )


def femnist_cnn(num_classes: int = 62) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 2048),
        nn.ReLU(),
        nn.Linear(2048, num_classes),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "sine_mlp": sine_mlp,
    "conv4": conv4,
    "femnist_cnn": femnist_cnn,
    "mlp": mlp,
}


#: the most parameters a model built from a name and arguments may have (a checkpoint or config
#: asking for more is refused before any memory is allocated)
MAX_PARAMETERS = 500_000_000


def check_model_spec(name: str, kwargs: dict[str, Any]) -> int:
    """The number of parameters of model ``name`` built with ``kwargs``, counted on PyTorch's
    meta device (no memory allocated); unknown names, arguments that are not positive integers,
    and models beyond :data:`MAX_PARAMETERS` are one clear error."""
    if name not in MODELS:
        raise FedmamlError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FedmamlError(
                f"model {name!r} argument {key}={value!r}; model sizes are integers >= 1"
            )
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in MODELS[name](**kwargs).parameters())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FedmamlError(
            f"model {name!r} does not take these arguments {kwargs}: {exc}"
        ) from None
    if count > MAX_PARAMETERS:
        raise FedmamlError(
            f"model {name!r} with {kwargs} would have {count:,} parameters (more than "
            f"{MAX_PARAMETERS:,}); check the model's sizes"
        )
    return count


def build_model(name: str, **kwargs: int) -> nn.Module:
    """Build a registered model by name (checked first by :func:`check_model_spec`)."""
    check_model_spec(name, kwargs)
    return MODELS[name](**kwargs)
