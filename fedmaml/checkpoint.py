"""Checkpoints: meta-parameters, meta-optimizer state, model spec, config and round, atomically.

A checkpoint is a ``torch.save`` of plain dicts, loaded with ``weights_only=True`` (no pickled
code runs on load). Writing goes to a temporary file in the same folder, then ``os.replace``:
a crash mid-write leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedmaml.atomic import atomic_write
from fedmaml.errors import FedmamlError
from fedmaml.models import build_model

FORMAT = "fedmaml-checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    """θ (∪ learned α), and everything needed to rebuild the model and resume the run."""

    params: dict[str, Tensor]
    model: str
    model_kwargs: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    optimizer_state: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        """The architecture this checkpoint was trained with (parameters not loaded)."""
        return build_model(self.model, **self.model_kwargs)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically; return the path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "params": {k: v.detach().cpu() for k, v in ckpt.params.items()},
        "model": ckpt.model,
        "model_kwargs": dict(ckpt.model_kwargs),
        "config": dict(ckpt.config),
        "round": int(ckpt.round),
        "optimizer_state": ckpt.optimizer_state,
    }
    atomic_write(path, lambda f: torch.save(payload, f), "wb", fsync=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a missing, truncated or foreign file gives one clear FedmamlError."""
    path = Path(path)
    if not path.is_file():
        raise FedmamlError(
            f"checkpoint {path} does not exist; give the path of a .pt file "
            "written by fedmaml (e.g. RUN_DIR/checkpoint.pt)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise FedmamlError(
            f"checkpoint {path} could not be read ({type(exc).__name__}); the file is truncated "
            "or not a fedmaml checkpoint: use another checkpoint or re-run training"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedmamlError(f"{path} is not a fedmaml checkpoint (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise FedmamlError(
            f"checkpoint {path} has format version {payload.get('version')}; this fedmaml reads "
            f"version {VERSION}: re-run training with this version"
        )
    return Checkpoint(
        params=payload["params"],
        model=payload["model"],
        model_kwargs=payload["model_kwargs"],
        config=payload["config"],
        round=payload["round"],
        optimizer_state=payload["optimizer_state"],
    )


class CheckpointSaver:
    """Writes checkpoints on one background thread while the next round runs (a save costs
    milliseconds, mostly ``fsync``, on every round's critical path otherwise).

    Saves happen in order and never overlap: each waits for the previous one, which has had a
    whole round to finish, so a failed save is raised by the next ``save`` or by ``close``.
    The checkpoint is a snapshot: later meta-updates do not change what is written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmaml-checkpoint")
        self._pending: Future | None = None

    def save(self, ckpt: Checkpoint) -> None:
        self.wait()
        ckpt = copy.copy(ckpt)
        ckpt.params = {k: v.detach().clone() for k, v in ckpt.params.items()}
        ckpt.optimizer_state = copy.deepcopy(ckpt.optimizer_state)
        self._pending = self._pool.submit(save_checkpoint, self.path, ckpt)

    def close(self) -> None:
        """Wait for the last save (raising its error, if any) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def wait(self) -> None:
        """Wait for the pending save, if any; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
