"""What the deployment tests share: device data files, the run config, and the checks on a
finished run's directory (checkpoint moved, every node contributed, metrics came back)."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.federated.deployment import LocalFederation
from fedmaml.problem import Problem
from fedmaml.rundir.names import CHECKPOINT, CLIENTS, ROUNDS

FEATURES, CLASSES = 8, 4


def write_devices(root: Path, n: int = 3, rows: int = 60, seed: int = 0) -> list[Path]:
    """``n`` devices' own files, each a different format (CSV, Parquet, NPZ in turn): 8
    features, 4 classes, a labelling rule that differs a little per device."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(FEATURES, CLASSES))
    files = []
    for i in range(n):
        x = rng.normal(size=(rows, FEATURES))
        y = (x @ (shared + 0.3 * rng.normal(size=shared.shape))).argmax(1)
        df = pd.DataFrame(x, columns=[f"f{j}" for j in range(FEATURES)]).assign(y=y)
        kind = ("csv", "parquet", "npz")[i % 3]
        path = root / f"device-{i}.{kind}"
        if kind == "csv":
            df.to_csv(path, index=False)
        elif kind == "parquet":
            df.to_parquet(path)
        else:
            np.savez(path, x=x, y=y)
        files.append(path)
    return files


def node_config(index: int, path: Path, role: str = "train") -> dict[str, Any]:
    """A device's node config; decoded data is cached beside its file, not in ~/.cache."""
    return {
        "role": role,
        "client-index": index,
        "data-path": str(path),
        "device": "cpu",
        "cache-dir": str(path.parent / "cache"),
    }


def start_nodes(fed: LocalFederation, files: list[Path], **extra: dict[str, Any]) -> None:
    """One training SuperNode per file (client index = position), plus ``extra`` nodes by name,
    started together and waited for."""
    configs = {f"node-{i}": node_config(i, file) for i, file in enumerate(files)} | extra
    for name, config in configs.items():
        fed.add_node(name, config, wait=False)
    fed.wait_ready(*configs)


def run_config(out_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A short federated MAML run of task local over 3 training nodes."""
    values = {
        "task": "local",
        "input-shape": str(FEATURES),
        "num-classes": CLASSES,
        "label-column": "y",
        "support-size": 5,
        "query-size": 5,
        "inner-lr": 0.1,
        "meta-lr": 0.01,
        "num-rounds": 2,
        "num-train-clients": 3,
        "num-heldout-clients": 0,
        "fraction-train": 1.0,
        "min-train-nodes": 3,
        "eval-every": 100,
        "eval-clients": 3,
        "round-timeout": 60.0,
        "out-dir": str(out_dir),
    }
    return values | overrides


def finished_run(out_dir: Path, config: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check the run's checkpoint is at its last round and differs from the initial θ, and
    that every round's metrics came back; its rounds and clients tables."""
    cfg = RunConfig.from_mapping(config)
    ckpt = load_checkpoint(out_dir / CHECKPOINT)
    assert ckpt.round == cfg.num_rounds
    initial = Problem.from_config(cfg).initial_params()
    assert set(ckpt.params) == set(initial)
    assert any(not torch.equal(ckpt.params[k], initial[k]) for k in initial)
    rounds = pd.read_csv(out_dir / ROUNDS)
    clients = pd.read_csv(out_dir / CLIENTS)
    assert rounds["round"].tolist() == list(range(1, cfg.num_rounds + 1))
    assert rounds["updated"].all()
    assert all(math.isfinite(v) for v in rounds["train-loss-before"])
    final = rounds.iloc[-1]
    assert math.isfinite(final["seen-loss-0"]) and 0 <= final["seen-accuracy-0"] <= 1
    return rounds, clients


def contributors(clients: pd.DataFrame, meta_round: int) -> set[int]:
    """Client indices whose training reply was used in ``meta_round``."""
    rows = clients[
        (clients["round"] == meta_round)
        & (clients["phase"] == "train")
        & (clients["status"] == "ok")
    ]
    return {int(c) for c in rows["client"]}


def wait_for_round(out_dir: Path, meta_round: int, run: subprocess.Popen, timeout: float) -> None:
    """Wait until the run's tables show ``meta_round`` finished (fail if the run ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out_dir / ROUNDS).is_file():
            done = pd.read_csv(out_dir / ROUNDS)
            if "updated" in done and (done["round"] >= meta_round).any():
                return
        assert run.poll() is None, (
            f"the run ended (exit {run.returncode}) before round {meta_round}"
        )
        time.sleep(0.5)
    raise AssertionError(f"round {meta_round} did not finish within {timeout:.0f} s")
