"""``fedmaml simulate`` end to end as a user runs it: the CLI, a real Flower simulation, the
results table and plots, nothing left running, pyproject.toml untouched; and bad settings
refused before Flower starts."""

from __future__ import annotations

import hashlib
import os
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
    # start-up is not silent: the command's stages and the ServerApp's own
    for stage in ("checking the settings", "starting Flower", "loading the data", "who they are"):
        assert stage in result.stdout, stage
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
    summary = (out / "summary.md").read_text()
    assert "rounds: 3 of 3, status: finished" in summary and "central" not in summary
    assert "rounds that updated θ: 3; skipped: 0" in summary
    assert "| unseen |" in summary and "helped" in summary  # gain per group, counts as ints
    assert "\x1b[" not in (out / "flower.log").read_text()
    for name in ("rounds.csv", "summary.json", "checkpoint.pt", "summary.md"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
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
        (["--set", "inner-stpes=3"], ["unknown config key", "did you mean 'inner-steps'"]),
        (["--set", "task=femnist"], ["data-path", "femnist"]),
        (["--task", "table", "--data-path", "absent.csv"], ["absent.csv", "no such file"]),
        (["--device", "cuda:abc"], ["cuda:abc"]),
        (["--device", "cuda"], ["cuda", "no CUDA GPU"]),
        (["--gpus-per-client", "1"], ["gpus-per-client", "no CUDA GPU"]),
        (["--resume", "absent.pt"], ["absent.pt", "does not exist"]),
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


def bad_run(tmp_path, capsys, *args: str) -> str:
    """Run ``fedmaml simulate`` with ``args``; it must exit 2 with one line and no traceback,
    before any Flower process starts."""
    code = main(["simulate", "--rounds", "1", "--clients", "2", "--heldout-clients", "1", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert descendants(subprocess.os.getpid()) == []
    return err


def test_files_that_are_not_what_they_should_be_are_one_clear_line(tmp_path, capsys):
    (tmp_path / "latin1.toml").write_bytes("seed = 1 # caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in bad_run(tmp_path, capsys, "--config", str(tmp_path / "latin1.toml"))
    (tmp_path / "a-file").write_text("x")
    assert "is a file" in bad_run(tmp_path, capsys, "--out", str(tmp_path / "a-file"))
    assert "cannot be created" in bad_run(tmp_path, capsys, "--out", "/proc/fedmaml-run")
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    out = str(tmp_path / "run")
    err = bad_run(tmp_path, capsys, "--out", out, "--resume", str(tmp_path / "random.pt"))
    assert "could not be read" in err


def test_another_models_checkpoint_is_refused_before_flower(tmp_path, capsys):
    from fedmaml.checkpoint import Checkpoint, save_checkpoint
    from fedmaml.models import build_model

    model = build_model("mlp", in_features=3, out_features=2)
    ckpt = Checkpoint(
        {k: v.detach() for k, v in model.named_parameters()},
        "mlp",
        {"in_features": 3, "out_features": 2},
    )
    save_checkpoint(tmp_path / "other.pt", ckpt)
    err = bad_run(
        tmp_path, capsys, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "other.pt")
    )
    assert "holds model mlp" in err and "sine_mlp" in err


@pytest.mark.timeout(600)
def test_a_run_directory_is_never_replaced_silently_and_resumes_visibly(tmp_path):
    """A second run into a run directory is refused; --resume auto continues it (saying so, and
    without replaying the finished rounds); a finished run resumed again has nothing to do and
    succeeds; --overwrite replaces it; a config file's out-dir is respected."""
    out = tmp_path / "run"
    (tmp_path / "cfg.toml").write_text(f'out-dir = "{out}"\nnum-rounds = 2\n')
    base = [FEDMAML, "simulate", "--config", str(tmp_path / "cfg.toml"), "--clients", "3"]
    base += ["--heldout-clients", "1", "--eval-every", "1", "--eval-clients", "1", "--no-plot"]

    def simulate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=500)

    first = simulate()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (out / "checkpoint.pt").is_file()  # out-dir from the config file, not runs/latest
    again = simulate()
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "--resume auto" in again.stderr and "--overwrite" in again.stderr
    resumed = simulate("--resume", "auto", "--rounds", "3")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "at round 2 of 3" in resumed.stdout
    assert "round    3/3" in resumed.stdout and "round    1/" not in resumed.stdout
    log = (out / "flower.log").read_text()
    assert "===== resumed" in log and "Starting" in log.split("===== resumed")[0]  # appended
    done = simulate("--resume", "auto", "--rounds", "3")
    assert done.returncode == 0 and "already complete" in done.stdout, done.stderr
    replaced = simulate("--overwrite", "--rounds", "1")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "replacing the run" in replaced.stderr
    assert list(pd.read_csv(out / "rounds.csv")["round"]) == [0, 1]


@pytest.mark.timeout(600)
def test_compare_runs_maml_and_the_fedavg_baseline_on_the_same_clients(tmp_path):
    out = tmp_path / "cmp"
    args = [FEDMAML, "simulate", "--compare", "maml", "fedavg", "--rounds", "2", "--out", str(out)]
    args += ["--clients", "3", "--heldout-clients", "2", "--eval-every", "2", "--quiet"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("maml/checkpoint.pt", "fedavg/checkpoint.pt", "comparison.md", "comparison.png"):
        assert (out / name).is_file(), name
    table = (out / "comparison.md").read_text()
    assert "| maml |" in table and "| fedavg |" in table and "unseen@5" in table
    assert "comparison" in result.stdout


def test_help_shows_every_run_config_key_with_its_default_and_no_markup(capsys):
    from dataclasses import fields

    from fedmaml.config import RunConfig

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    for f in fields(RunConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "--rounds" in text and "(default: 300)" in text and "(default: 'maml')" in text
