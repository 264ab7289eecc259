"""The MAML core: pure torch (``torch.func``), no Flower.

    from fedmaml.meta import adapt, meta_gradient

Modules: ``algorithms`` (one per algorithm, and the registry of their names), ``batch`` (the
episode batches algorithms are written against), ``engines`` (loop or vmap, and the choice),
``inner`` (the inner loop), ``adapted`` (which parameters adapt), ``gradient`` (``adapt``,
``meta_gradient``, and ``meta_gradients`` of many users at once), ``evaluate`` (adaptation
curves), ``outer`` (the meta-optimizer),
``params``, ``validate`` and ``inputs`` (the core's edge).

Importing this package is cheap: its names load torch on first use, so that light paths (the
run configuration reads :data:`fedmaml.meta.algorithms.ALGORITHMS`) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmaml.meta.adapted import head_names
    from fedmaml.meta.algorithms import ALGORITHMS
    from fedmaml.meta.engines import prefers_vmap
    from fedmaml.meta.evaluate import adaptation_curve, adaptation_curves, mean_curve
    from fedmaml.meta.gradient import adapt, meta_gradient, meta_gradients
    from fedmaml.meta.params import (
        INNER_LR_PREFIX,
        Params,
        model_params,
        split_inner_lrs,
        with_inner_lrs,
    )

_HOMES = {
    "ALGORITHMS": "fedmaml.meta.algorithms",
    "INNER_LR_PREFIX": "fedmaml.meta.params",
    "Params": "fedmaml.meta.params",
    "adapt": "fedmaml.meta.gradient",
    "adaptation_curve": "fedmaml.meta.evaluate",
    "adaptation_curves": "fedmaml.meta.evaluate",
    "head_names": "fedmaml.meta.adapted",
    "mean_curve": "fedmaml.meta.evaluate",
    "meta_gradient": "fedmaml.meta.gradient",
    "meta_gradients": "fedmaml.meta.gradient",
    "model_params": "fedmaml.meta.params",
    "prefers_vmap": "fedmaml.meta.engines",
    "split_inner_lrs": "fedmaml.meta.params",
    "with_inner_lrs": "fedmaml.meta.params",
}


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "ALGORITHMS",
    "INNER_LR_PREFIX",
    "Params",
    "adapt",
    "adaptation_curve",
    "adaptation_curves",
    "head_names",
    "mean_curve",
    "meta_gradient",
    "meta_gradients",
    "model_params",
    "prefers_vmap",
    "split_inner_lrs",
    "with_inner_lrs",
]
