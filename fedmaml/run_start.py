"""Where a run starts: a fresh θ, or a checkpoint checked against this run's configuration.

The ServerApp starts here, and ``fedmaml simulate`` runs the same checks before Flower starts,
so that a checkpoint of another model, algorithm or meta-optimizer is refused with one clear
message instead of failing rounds later.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.problem import Problem
from fedmaml.rundir.names import CHECKPOINT

log = logging.getLogger(__name__)


@dataclass
class Start:
    """θ, the meta-optimizer (its state restored on resume) and the round to continue from."""

    params: Params
    optimizer: MetaOptimizer
    round: int
    resumed_from: str = ""
    #: the checkpoint's privacy ledger (differentially private runs)
    privacy: dict | None = None


def resume_path(cfg: RunConfig) -> str:
    """The checkpoint to continue from: ``resume``, where ``"auto"`` means the run directory's
    checkpoint when it has one (so the same command starts a run or resumes it), else none."""
    if cfg.resume != "auto":
        return cfg.resume
    path = Path(cfg.out_dir) / CHECKPOINT
    return str(path) if path.is_file() else ""


def start(cfg: RunConfig, work: Problem) -> Start:
    """A fresh start (round 0), or the checkpoint of ``resume`` after checking that it was
    trained with this run's model, algorithm and meta-optimizer. A new ``meta-lr`` applies from
    the resumed round on (and is logged); a new meta-optimizer is refused."""
    params = work.initial_params()
    resume = resume_path(cfg)
    if not resume:
        return Start(params, MetaOptimizer(params, cfg.meta_optimizer, cfg.meta_lr), 0)
    ckpt = load_checkpoint(resume)
    if ckpt.model != cfg.model_name or ckpt.model_kwargs != work.model_kwargs:
        raise FedmamlError(
            f"checkpoint {resume} holds model {ckpt.model} {ckpt.model_kwargs}, this run "
            f"uses {cfg.model_name} {work.model_kwargs}; resume with the same task and model"
        )
    if set(ckpt.params) != set(params) or any(
        tuple(ckpt.params[k].shape) != tuple(v.shape) for k, v in params.items()
    ):
        raise FedmamlError(
            f"checkpoint {resume} has other parameters than this run (e.g. trained with "
            "another algorithm's learned step sizes); resume with the same algorithm"
        )
    trained = ckpt.config.get("meta-optimizer", cfg.meta_optimizer)
    if trained != cfg.meta_optimizer:
        raise FedmamlError(
            f"checkpoint {resume} was trained with meta-optimizer {trained!r}, this run asks "
            f"for {cfg.meta_optimizer!r}; resume with meta-optimizer = {trained!r} (its state "
            "cannot carry over to another optimizer), or start a new run"
        )
    optimizer = MetaOptimizer(ckpt.params, cfg.meta_optimizer, cfg.meta_lr)
    if ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    old_lr = optimizer.set_lr(cfg.meta_lr)
    if not math.isclose(old_lr, cfg.meta_lr):
        log.warning(
            "fedmaml: meta-lr changed on resume: %g in the checkpoint, %g from now on",
            old_lr,
            cfg.meta_lr,
        )
    if cfg.accounted and ckpt.round > 0 and ckpt.privacy is None:
        raise FedmamlError(
            f"checkpoint {resume} is at round {ckpt.round} of a run without a privacy ledger "
            "(its rounds were not accounted): start a differentially private run from round 0"
        )
    return Start(optimizer.current(), optimizer, ckpt.round, resume, ckpt.privacy)
