"""Checks before a simulation starts Flower: what would otherwise fail minutes later, inside the
ServerApp, with its reason only in ``flower.log``.

The same functions the ServerApp runs at its start (:func:`~fedmaml.rundir.state.check_run_dir`,
the workload and its data, :func:`~fedmaml.run_start.start` for a checkpoint to resume), run
here first, plus what only the launcher knows (GPU shares, the number of simulated nodes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.problem import Problem
from fedmaml.run_start import start
from fedmaml.rundir.state import check_run_dir

log = logging.getLogger(__name__)

#: simulated nodes above which start-up time and memory deserve a warning (Flower registers and
#: keeps every node: about 0.2 KB each, and a 10⁷-node federation did not reach round 1 in 150 s)
MANY_NODES = 10_000


@dataclass
class Ready:
    """What the checks found: the round the run starts from, and the warnings to show."""

    round: int
    resumed_from: str
    warnings: list[str] = field(default_factory=list)

    def complete(self, cfg: RunConfig) -> bool:
        """The checkpoint to resume is at num-rounds already: nothing to train."""
        return bool(self.resumed_from) and self.round >= cfg.num_rounds


def preflight(cfg: RunConfig, *, gpus_per_client: float, on_cluster: bool = False) -> Ready:
    """Check ``cfg`` as the ServerApp will (run directory, data and client counts, checkpoint,
    device) and the launcher's own settings; raise one clear FedmamlError, or return what the
    run will start from. ``on_cluster``: the clients run on an existing Ray cluster, whose
    workers (not this machine) hold the GPUs."""
    check_run_dir(cfg)
    work = Problem.from_config(cfg)  # opens the data: paths, formats, client counts, device
    begin = start(cfg, work)
    if gpus_per_client > 0 and not on_cluster:
        import torch

        if not torch.cuda.is_available():
            raise FedmamlError(
                f"--gpus-per-client {gpus_per_client:g} asks for a GPU share per simulated "
                "node, but no CUDA GPU is visible; use 0 (CPU), run on a machine with a GPU, or "
                "give --ray-address of a Ray cluster with GPU workers"
            )
    warnings = []
    nodes = cfg.simulated_nodes
    if nodes > MANY_NODES:
        warnings.append(
            f"{nodes:,} simulated SuperNodes: Flower registers each one before round 1 (start-up "
            f"grows with their number, about {nodes * 200 / 2**30:.1f} GiB of node state); "
            "consider fewer clients or more users-per-node"
        )
    return Ready(begin.round, begin.resumed_from, warnings)
