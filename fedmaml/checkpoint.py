"""Checkpoints: meta-parameters, meta-optimizer state, model spec, config and round, atomically;
optionally the input preprocessing the model was trained with (``inputs``) and the
personalization recipe chosen on validation users at the end of training (``recipe``), both
plain tables that older checkpoints lack (they load with None).

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
from fedmaml.models import build_model, check_model_spec

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
    #: the privacy ledger of a differentially private run (``PrivacyAccount.state_dict``)
    privacy: dict[str, Any] | None = None
    #: how raw examples become model inputs (:class:`fedmaml.tasks.inputs.InputSpec`)
    inputs: dict[str, Any] | None = None
    #: the personalization recipe (:class:`fedmaml.personalize.recipe.Recipe`)
    recipe: dict[str, Any] | None = None

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
        "privacy": ckpt.privacy,
    }
    for key in ("inputs", "recipe"):  # optional: absent from older checkpoints
        if getattr(ckpt, key) is not None:
            payload[key] = dict(getattr(ckpt, key))
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
    problem = _structure_problem(payload)
    if problem:
        raise FedmamlError(
            f"checkpoint {path} is damaged ({problem}); use another checkpoint or re-run training"
        )
    return Checkpoint(
        params=payload["params"],
        model=payload["model"],
        model_kwargs=payload["model_kwargs"],
        config=payload["config"],
        round=payload["round"],
        optimizer_state=payload["optimizer_state"],
        privacy=payload.get("privacy"),
        inputs=payload.get("inputs"),
        recipe=payload.get("recipe"),
    )


def _structure_problem(payload: dict[str, Any]) -> str:
    """What is wrong with a checkpoint's structure ("" when nothing is), checked before anything
    is built from it: a crafted file must not reach a traceback or a huge allocation."""
    params = payload.get("params")
    if not isinstance(params, dict) or not params:
        return "no parameters"
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in params.items()):
        return "parameters that are not named tensors"
    if not all(torch.is_floating_point(v) for v in params.values()):
        return "parameters that are not floating-point tensors"
    kwargs = payload.get("model_kwargs")
    if not isinstance(payload.get("model"), str) or not isinstance(kwargs, dict):
        return "no model name and arguments"
    if not isinstance(payload.get("config"), dict):
        return "a config that is not a table of keys"
    rnd = payload.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        return f"round {rnd!r}"
    state = payload.get("optimizer_state")
    if state is not None and not isinstance(state, dict):
        return "an optimizer state that is not a table"
    privacy = payload.get("privacy")
    if privacy is not None and not isinstance(privacy, dict):
        return "a privacy ledger that is not a table"
    for key in ("inputs", "recipe"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            return f"{key} that is not a table"
    try:
        check_model_spec(payload["model"], kwargs)
    except FedmamlError as exc:
        return str(exc)
    return ""


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
