"""``fedmaml simulate`` end to end as a user runs it: the CLI, a real Flower simulation, the
results table and plots, nothing left running, pyproject.toml untouched; and bad settings
refused before Flower starts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedmaml.cli import main
from fedmaml.federated.processes import descendants

ROOT = Path(__file__).resolve().parents[1]
FEDMAML = str(Path(sys.executable).with_name("fedmaml"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(600)
def test_simulate_command_runs_reports_and_cleans_up(tmp_path):
    before = digest(ROOT / "pyproject.toml")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            FEDMAML,
            "simulate",
            "--rounds",
            "3",
            "--clients",
            "6",
            "--heldout-clients",
            "2",
            "--clients-per-round",
            "3",
            "--out",
            str(out),
            "--set",
            "eval-every=3",
            "--set",
            "eval-clients=2",
        ],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "round    3/3" in result.stdout
    assert "unseen@" in result.stdout  # the closing results table
    for name in (
        "checkpoint.pt",
        "rounds.csv",
        "clients.csv",
        "summary.json",
        "learning_curves.png",
        "client_gains.png",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [0, 1, 2, 3]
    assert digest(ROOT / "pyproject.toml") == before
    assert descendants(subprocess.os.getpid()) == []  # no SuperLink, Ray or app left behind


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "algorithm=foo"], ["algorithm", "maml"]),
        (["--set", "inner-lr=0"], ["inner-lr", "> 0"]),
        (["--set", "no-such-key=1"], ["unknown config key", "no-such-key"]),
        (["--clients-per-round", "500"], ["clients-per-round"]),
        (["--config", "missing.toml"], ["missing.toml"]),
        (["--clients", "2", "--set", "min-train-nodes=5"], ["min-train-nodes", "at most"]),
        (["--set", "task=local", "--set", "input-shape=3"], ["task 'local'", "deployment"]),
        (["--set", "seed=99999999999999999999"], ["seed", "64 bits"]),
        (["--set", "max-update-norm=-1"], ["max-update-norm", "clip"]),
    ],
)
def test_bad_settings_stop_before_flower_starts(tmp_path, capsys, args, words):
    code = main(["simulate", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err
    assert not (tmp_path / "run").exists()
