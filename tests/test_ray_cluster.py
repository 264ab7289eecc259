"""A simulation on an existing Ray cluster: a Ray head and a Ray worker node started here as two
separate processes on 127.0.0.1 (as on two machines), ``simulate(..., ray_address=)`` runs on
them, and both are stopped by pid, leaving nothing running."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.processes import (
    descendants,
    flower_env,
    free_port,
    marked,
    new_token,
    stop_marked,
    stop_tree,
)
from fedmaml.federated.ray_cluster import check_address, head_command, worker_command
from fedmaml.federated.simulation import SimulationOptions, simulate

pytestmark = pytest.mark.timeout(600)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


def test_a_simulation_runs_on_an_existing_ray_cluster_of_two_nodes(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    token = new_token()
    env = flower_env(token=token)
    temp = Path(f"/tmp/fm-ray-{token[:8]}")  # Ray's socket paths must stay short
    head = worker = None
    seen: set[int] = set()
    try:
        with open(tmp_path / "head.log", "w") as log:
            head = subprocess.Popen(
                [*head_command(port, num_cpus=1), "--temp-dir", str(temp)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def head_ready() -> bool:
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            try:
                check_address(address, timeout=1)
                return True
            except FedmamlError:
                return False

        wait_for(head_ready, 120, "the Ray head answers")
        with open(tmp_path / "worker.log", "w") as log:
            worker = subprocess.Popen(
                worker_command(address, num_cpus=1),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(),
            120,
            "the Ray worker node joins",
        )
        seen = {head.pid, worker.pid, *descendants(head.pid), *descendants(worker.pid)}
        cfg = RunConfig(
            num_train_clients=3,
            num_heldout_clients=1,
            fraction_train=1.0,
            min_train_nodes=3,
            num_rounds=2,
            eval_every=2,
            eval_clients=1,
            out_dir=str(tmp_path / "run"),
        )
        out = simulate(cfg, SimulationOptions(ray_address=address))
        rounds = pd.read_csv(out / "rounds.csv").set_index("round")
        assert rounds.loc[2, "ok"] == 3 and bool(rounds.loc[2, "updated"])
        # the run was a job of this cluster: its driver and its actors logged in the cluster's
        # session, not in a private Ray of the simulation's own
        logs = temp / "session_latest" / "logs"
        assert list(logs.glob("python-core-driver-*.log"))
        assert len(list(logs.glob("worker-*-01000000-*.out"))) >= 2
        seen |= {*descendants(head.pid), *descendants(worker.pid)}
    finally:
        for process in (worker, head):
            if process is not None:
                seen |= {process.pid, *descendants(process.pid)}
                stop_tree(process)
        stop_marked(token)
        subprocess.run(["rm", "-rf", str(temp)], check=False)
    assert not [p for p in seen if alive(p)], "a Ray process survived"
    assert not marked(token)


def test_an_address_no_ray_cluster_answers_at_stops_before_flower(tmp_path):
    cfg = RunConfig(num_train_clients=2, num_heldout_clients=0, out_dir=str(tmp_path / "r"))
    with pytest.raises(FedmamlError, match=r"no Ray cluster answers at 127\.0\.0\.1:"):
        simulate(cfg, SimulationOptions(ray_address=f"127.0.0.1:{free_port()}"))
    with pytest.raises(FedmamlError, match="is not HOST:PORT"):
        simulate(cfg, SimulationOptions(ray_address="ray-head"))


def test_a_gpu_share_on_a_cluster_is_not_refused_for_want_of_a_local_gpu(tmp_path):
    """With --ray-address the GPUs are the cluster workers'; without it, a GPU share on a machine
    that sees no CUDA GPU is one clear error (this machine has none)."""
    import torch

    from fedmaml.preflight import preflight

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = RunConfig(num_train_clients=2, num_heldout_clients=0, out_dir=str(tmp_path / "r"))
    with pytest.raises(FedmamlError, match="no CUDA GPU"):
        preflight(cfg, gpus_per_client=0.5)
    assert preflight(cfg, gpus_per_client=0.5, on_cluster=True).round == 0
