"""Real Flower simulations that must not run silently wrong or forever: a federation smaller
than the run config (``flwr run`` with Flower's 2-node default), a run in which no round can
update θ, a machine on which a Ray head died and left its address behind."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.processes import free_port
from fedmaml.federated.simulation import SimulationOptions, simulate

pytestmark = pytest.mark.timeout(600)


def config(tmp_path, **changes) -> RunConfig:
    base = dict(
        num_train_clients=6,
        num_heldout_clients=2,
        fraction_train=1.0,
        min_train_nodes=2,
        num_rounds=2,
        eval_every=1,
        eval_clients=2,
        out_dir=str(tmp_path / "run"),
    )
    return RunConfig(**{**base, **changes})


def test_a_two_node_federation_without_the_heldout_clients_stops_with_the_fix(tmp_path):
    """Flower's default local federation has 2 SuperNodes: both are training clients, none is
    held out. The ServerApp says so, and how to size the federation, before round 1."""
    cfg = config(tmp_path)
    with pytest.raises(FedmamlError, match="num-supernodes=8") as info:
        simulate(cfg, SimulationOptions(num_supernodes=2))
    assert "no held-out client" in str(info.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "num-supernodes=8" in summary["error"]


def test_fewer_training_nodes_than_configured_train_with_a_warning(tmp_path):
    cfg = config(tmp_path, num_heldout_clients=0)
    out = simulate(cfg, SimulationOptions(num_supernodes=2))
    log = (out / "flower.log").read_text()
    assert "only 2 of 6 training" in log and "num-supernodes=6" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["clients"] == {"train": 2, "heldout": 0, "configured": 6, "broken": 0}
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[2, "ok"] == 2 and bool(rounds.loc[2, "updated"])


def test_a_run_in_which_no_round_updated_theta_fails(tmp_path):
    """inner-lr = 1e30: every client's adaptation diverges, no round can update θ; the run
    must not report success."""
    cfg = config(tmp_path, num_heldout_clients=0, num_train_clients=2, inner_lr=1e30)
    with pytest.raises(FedmamlError, match="no round updated"):
        simulate(cfg)
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    train = clients[clients["phase"] == "train"]
    assert len(train) == 4 and (train["status"] == "failed").all()
    assert train["reason"].str.contains("NaN or Inf").all()
    assert not train["reason"].str.contains("\\x1b|Traceback|\\n", regex=True).any()


@pytest.mark.timeout(300)
def test_a_dead_ray_head_left_behind_does_not_hang_the_simulation(tmp_path, monkeypatch):
    """`ray start --head` writes its address to <tmp>/ray/ray_current_cluster and a head that
    died leaves it there; ray.init() without an address would try to join it forever. A
    simulation starts its own Ray instance instead."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="fm", dir="/tmp"))  # Ray's socket paths must be short
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        cfg = config(tmp_path, num_train_clients=2, num_heldout_clients=0, num_rounds=1)
        out = simulate(cfg)
        assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
