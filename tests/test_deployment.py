"""A real Flower deployment on 127.0.0.1 (insecure: local testing): one SuperLink and one
SuperNode per device, each serving its own data file (task local), a short federated MAML run
submitted with ``flwr run``; and the faults a deployment meets: a device whose data is bad, a
device that dies mid-run, a SuperLink restarted mid-training.

Every process is started on free ports, waited for on ``/health``, and stopped by pid when the
``LocalFederation`` block ends, also when an assertion fails inside it.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest
from deployment_support import (
    contributors,
    finished_run,
    node_config,
    run_config,
    start_nodes,
    wait_for_round,
    write_devices,
)

from fedmaml.federated.deployment import LocalFederation
from fedmaml.federated.processes import stop_tree

pytestmark = pytest.mark.timeout(420)


def _tail(path, chars: int = 4000) -> str:
    return path.read_text()[-chars:] if path.is_file() else f"(no {path})"


def test_devices_train_and_a_device_with_bad_data_is_reported_not_fatal(tmp_path):
    files = write_devices(tmp_path)
    bad = tmp_path / "bad.csv"
    rows = np.random.default_rng(1).normal(size=(60, 9))
    rows[3, 2] = np.nan
    pd.DataFrame(rows, columns=[*(f"f{j}" for j in range(8)), "y"]).assign(y=1).to_csv(
        bad, index=False
    )
    config = run_config(tmp_path / "run")
    with LocalFederation(tmp_path / "federation") as fed:
        fed.start_superlink()
        start_nodes(fed, files, bad=node_config(9, bad))
        code = fed.run(config, timeout=360)
        assert code == 0, _tail(fed.log("run"))
        server_log = fed.log("run").read_text()
    rounds, clients = finished_run(tmp_path / "run", config)
    assert contributors(clients, 1) == contributors(clients, 2) == {0, 1, 2}
    failed = clients[clients["status"] != "ok"]
    assert failed["phase"].tolist() == ["describe"]
    assert "column 'f2'" in failed["reason"].iloc[0] and "NaN" in failed["reason"].iloc[0]
    assert "cannot take part" in server_log and "column 'f2'" in server_log
    evaluated = clients[(clients["phase"] == "evaluate") & (clients["status"] == "ok")]
    assert sorted(evaluated["client"].astype(int)) == [0, 1, 2]
    assert rounds["ok"].tolist() == [3, 3] and rounds["failed"].tolist() == [0, 0]


@pytest.mark.slow
def test_a_device_killed_mid_run_leaves_the_others_to_finish(tmp_path):
    files = write_devices(tmp_path)
    config = run_config(
        tmp_path / "run", **{"num-rounds": 3, "min-train-nodes": 2, "round-timeout": 15.0}
    )
    with LocalFederation(tmp_path / "federation") as fed:
        fed.start_superlink()
        start_nodes(fed, files)
        run = fed.submit(config)
        wait_for_round(tmp_path / "run", 1, run, timeout=240)
        fed.kill("node-2")
        assert run.wait(timeout=300) == 0, _tail(fed.log("run"))
    _, clients = finished_run(tmp_path / "run", config)
    assert contributors(clients, 1) == {0, 1, 2}
    assert contributors(clients, 3) == {0, 1}


@pytest.mark.slow
def test_a_restarted_superlink_resumes_from_the_last_checkpoint(tmp_path):
    files = write_devices(tmp_path)
    config = run_config(tmp_path / "run", **{"num-rounds": 3, "resume": "auto"})
    with LocalFederation(tmp_path / "federation") as fed:
        fed.start_superlink()
        start_nodes(fed, files)
        first = fed.submit(config, name="first")
        wait_for_round(tmp_path / "run", 1, first, timeout=240)
        fed.restart_superlink()
        try:
            first.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_tree(first)
        code = fed.run(config, name="resumed", timeout=360)
        assert code == 0, _tail(fed.log("resumed"))
        resumed_log = fed.log("resumed").read_text()
    assert "resuming from" in resumed_log
    _, clients = finished_run(tmp_path / "run", config)
    for meta_round in (1, 2, 3):
        assert contributors(clients, meta_round) == {0, 1, 2}
    assert len(clients[(clients["phase"] == "train") & (clients["round"] == 3)]) == 3


@pytest.mark.slow
def test_two_dead_devices_of_three_end_in_bounded_time_and_are_named(tmp_path):
    """kill -9 on 2 of 3 SuperNodes with min-train-nodes 2: no round can gather enough
    replies. Every wait is bounded by round-timeout; the silent devices are recorded with their
    identity, the rounds without enough replies are skipped, and the run ends."""
    files = write_devices(tmp_path)
    config = run_config(
        tmp_path / "run", **{"num-rounds": 3, "min-train-nodes": 2, "round-timeout": 15.0}
    )
    with LocalFederation(tmp_path / "federation") as fed:
        fed.start_superlink()
        start_nodes(fed, files)
        run = fed.submit(config)
        wait_for_round(tmp_path / "run", 1, run, timeout=240)
        fed.kill("node-1")
        fed.kill("node-2")
        run.wait(timeout=240)  # bounded: never "waiting for nodes" forever
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv").set_index("round")
    assert bool(rounds.loc[1, "updated"]) and not rounds.loc[[2, 3], "updated"].astype(bool).any()
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    silent = clients[clients["status"] == "no-reply"]
    assert set(silent["client"].astype(int)) == {1, 2}
    assert set(silent["client_id"]) == {"train-1", "train-2"}
