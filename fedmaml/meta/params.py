"""Meta-parameters: the model's parameters θ plus, for Meta-SGD, per-parameter step sizes α.

Both live in one flat ``{name: tensor}`` dict so that a server, a checkpoint or a Flower
``ArrayRecord`` handles them as one object. A step size for parameter ``name`` is stored under
``INNER_LR_PREFIX + name`` and has that parameter's shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
InnerLR = float | Mapping[str, Tensor]

INNER_LR_PREFIX = "inner_lr."


def model_params(model: nn.Module) -> Params:
    """θ as a detached copy of the model's parameters (the start of every meta-training run)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def split_inner_lrs(params: Mapping[str, Tensor]) -> tuple[Params, Params]:
    """Split meta-parameters into (θ, α); α is empty unless the model learns its step sizes."""
    theta = {k: v for k, v in params.items() if not k.startswith(INNER_LR_PREFIX)}
    alpha = {
        k[len(INNER_LR_PREFIX) :]: v for k, v in params.items() if k.startswith(INNER_LR_PREFIX)
    }
    return theta, alpha


def with_inner_lrs(theta: Mapping[str, Tensor], value: float) -> Params:
    """θ ∪ α with every learned step size initialised to ``value`` (Meta-SGD's start)."""
    params = dict(theta)
    for name, p in theta.items():
        params[INNER_LR_PREFIX + name] = torch.full_like(p, value)
    return params
