"""Whether a run may write a run directory, and getting it ready.

A directory that already holds a run is never replaced silently: a new run into it is refused
unless it resumes that run (``resume``) or replaces it (``overwrite``, said in the log). Files
left half-written by a run killed mid-save (``.checkpoint.pt.*`` beside the checkpoint) are
removed at the next start.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.rundir.names import (
    CHECKPOINT,
    CLIENTS,
    CURVES_PNG,
    GAINS_PNG,
    ROUNDS,
    SUMMARY,
    SUMMARY_MD,
)

log = logging.getLogger(__name__)

#: what a run writes (and what ``overwrite`` replaces); the Flower log is the launcher's
RUN_FILES = (CHECKPOINT, ROUNDS, CLIENTS, SUMMARY, SUMMARY_MD, CURVES_PNG, GAINS_PNG)


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds (part of) a run: its checkpoint or its tables."""
    return any((out_dir / name).is_file() for name in (CHECKPOINT, ROUNDS))


def check_run_dir(cfg: RunConfig) -> None:
    """Refuse an out-dir that cannot be written, or that holds a run this one would replace
    without ``resume`` or ``overwrite``; changes nothing."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise FedmamlError(f"out-dir {out} is a file; give a folder for the run's files")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    try:  # a probe folder where out-dir would go: the only check root's privileges do not skip
        os.rmdir(tempfile.mkdtemp(prefix=".fedmaml-probe-", dir=existing))
    except (OSError, TypeError):
        raise FedmamlError(
            f"out-dir {out} cannot be created or written; choose another folder"
        ) from None
    if holds_run(out) and not cfg.resume and not cfg.overwrite:
        raise FedmamlError(
            f"out-dir {out} already holds a run; resume it (resume = auto, fedmaml simulate "
            "--resume auto), replace it (overwrite = true, --overwrite), or choose another out-dir"
        )


def prepare_run_dir(cfg: RunConfig) -> None:
    """:func:`check_run_dir`, then replace an earlier run's files if ``overwrite`` asks for it,
    and remove the temporary files of saves that were killed midway."""
    check_run_dir(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume and holds_run(out):
        log.warning("fedmaml: overwrite: replacing the run in %s", out)
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    for name in RUN_FILES:
        for stale in out.glob(f".{name}.*"):
            stale.unlink(missing_ok=True)
