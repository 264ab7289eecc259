"""The run directory: one run at a time (a lock the kernel releases when a run dies), stale
temporary files of killed saves removed at the next start, a run never replaced silently,
resuming with other settings refused or said."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from fedmaml.checkpoint import Checkpoint, save_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.preflight import preflight
from fedmaml.problem import Problem
from fedmaml.run_start import start
from fedmaml.rundir.lock import locked
from fedmaml.rundir.state import check_run_dir, prepare_run_dir

TRY_LOCK = """
import sys
from pathlib import Path
from fedmaml.rundir.lock import locked
from fedmaml.errors import FedmamlError
try:
    with locked(Path(sys.argv[1])):
        print("took it")
except FedmamlError as exc:
    print(exc)
"""


def try_lock(path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(path)], capture_output=True, text=True, timeout=60
    )
    return result.stdout.strip()


def test_a_second_run_into_a_locked_run_directory_stops_with_the_owner(tmp_path):
    with locked(tmp_path):
        message = try_lock(tmp_path)
    assert "in use by another run" in message and str(tmp_path) in message
    assert try_lock(tmp_path) == "took it"  # released when the first run ended


def test_stale_temporary_files_of_killed_saves_are_removed(tmp_path):
    for name in (".checkpoint.pt.abc123.pt", ".rounds.csv.x1y2.csv", ".summary.json.q.json"):
        (tmp_path / name).write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("mine")
    prepare_run_dir(RunConfig(out_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def sine_checkpoint(tmp_path, **config) -> RunConfig:
    """A finished 3-round run of the default configuration, and its config (resume auto)."""
    cfg = RunConfig(out_dir=str(tmp_path), num_rounds=3, **config)
    work = Problem.from_config(cfg)
    opt = MetaOptimizer(work.initial_params(), cfg.meta_optimizer, cfg.meta_lr)
    opt.step({k: torch.ones_like(v) for k, v in opt.params.items()})
    save_checkpoint(
        tmp_path / "checkpoint.pt",
        Checkpoint(
            opt.current(),
            cfg.model_name,
            work.model_kwargs,
            cfg.to_mapping(),
            round=3,
            optimizer_state=opt.state_dict(),
        ),
    )
    return cfg


def test_a_run_directory_with_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    cfg = sine_checkpoint(tmp_path)
    with pytest.raises(FedmamlError, match="already holds a run"):
        check_run_dir(cfg)
    check_run_dir(cfg.replace(resume="auto"))
    prepare_run_dir(cfg.replace(overwrite=True))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resuming_with_another_meta_optimizer_is_refused(tmp_path):
    cfg = sine_checkpoint(tmp_path)
    resumed = cfg.replace(resume="auto", num_rounds=5, meta_optimizer="sgd")
    with pytest.raises(FedmamlError, match=r"meta-optimizer 'adam'.*'sgd'"):
        start(resumed, Problem.from_config(resumed))


def test_resuming_with_a_new_meta_lr_applies_it_and_says_so(tmp_path, caplog):
    cfg = sine_checkpoint(tmp_path)
    resumed = cfg.replace(resume="auto", num_rounds=5, meta_lr=0.5)
    with caplog.at_level(logging.WARNING, logger="fedmaml"):
        begin = start(resumed, Problem.from_config(resumed))
    assert begin.round == 3
    assert begin.optimizer.optimizer.param_groups[0]["lr"] == 0.5
    assert "meta-lr changed on resume: 0.003 in the checkpoint, 0.5 from now on" in caplog.text
    assert preflight(resumed, gpus_per_client=0).complete(resumed) is False
    done = cfg.replace(resume="auto")
    assert preflight(done, gpus_per_client=0).complete(done) is True


def test_a_huge_federation_is_warned_about_before_it_starts(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path / "run"), num_train_clients=10_000_000)
    ready = preflight(cfg, gpus_per_client=0)
    assert any("10,000,020 simulated SuperNodes" in w for w in ready.warnings)
