"""The meta-learning algorithms, one module each, registered here by name.

:data:`ALGORITHMS` is the one list of algorithm names: the run configuration, ``fedmaml
simulate --algorithm`` and ``simulations/run.py`` read it. Algorithm ``name`` lives in the module
``fedmaml.meta.algorithms.<name>`` (its ``ALGORITHM`` object), imported on first use, so that
reading the names imports neither torch nor any algorithm.

=========== ================================================================================
maml        MAML, second order (Finn, Abbeel & Levine, ICML 2017)
fomaml      first-order MAML (same paper, §5.2)
metasgd     Meta-SGD: MAML with learned per-parameter step sizes (Li et al., 2017)
reptile     Reptile (Nichol, Achiam & Schulman, 2018)
fedavg      FedAvg + fine-tuning, as a pseudo-gradient (McMahan et al., AISTATS 2017)
anil        ANIL: the inner loop adapts the head only (Raghu et al., ICLR 2020)
perfedavg   Per-FedAvg, Hessian-free (Fallah, Mokhtari & Ozdaglar, NeurIPS 2020)
=========== ================================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedmaml.errors import FedmamlError

if TYPE_CHECKING:
    from fedmaml.meta.algorithms.base import Algorithm

ALGORITHMS: tuple[str, ...] = (
    "maml",
    "fomaml",
    "metasgd",
    "reptile",
    "fedavg",
    "anil",
    "perfedavg",
)


def resolve(algorithm: str | Algorithm) -> Algorithm:
    """The algorithm registered as ``algorithm``, or ``algorithm`` itself when it is already an
    :class:`~fedmaml.meta.algorithms.base.Algorithm` (e.g. one with non-default settings)."""
    if isinstance(algorithm, str):
        if algorithm not in ALGORITHMS:
            raise FedmamlError(
                f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        return importlib.import_module(f"{__name__}.{algorithm}").ALGORITHM
    from fedmaml.meta.algorithms.base import Algorithm

    if not isinstance(algorithm, Algorithm):
        raise FedmamlError(
            f"algorithm must be a name ({', '.join(ALGORITHMS)}) or an Algorithm "
            f"(got {type(algorithm).__name__})"
        )
    return algorithm
