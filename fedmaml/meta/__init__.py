"""The MAML core: pure torch (``torch.func``), no Flower.

from fedmaml.meta import adapt, meta_gradient
"""

from fedmaml.meta.gradient import adapt, meta_gradient, prefers_vmap
from fedmaml.meta.params import (
    INNER_LR_PREFIX,
    Params,
    model_params,
    split_inner_lrs,
    with_inner_lrs,
)
from fedmaml.meta.validate import ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "INNER_LR_PREFIX",
    "Params",
    "adapt",
    "meta_gradient",
    "model_params",
    "prefers_vmap",
    "split_inner_lrs",
    "with_inner_lrs",
]
