"""Secure aggregation and differential privacy in a real deployment: a SuperLink over TLS with
SuperNode authentication, SuperNodes in their own processes (a ``flwr-clientapp`` process per
message), each protocol stage a real round trip. And a device killed after it shared its keys,
in the middle of the masking stage: the round goes on without it.

Both are marked ``slow`` (``pytest -m slow``): a deployed SuperNode polls every 3 s and starts a
process per message, so a SecAgg+ round (4 stages) takes 40-75 s on 2 shared cores; measured
190 s and 288 s."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from deployment_support import contributors, finished_run, node_config, run_config, write_devices

from fedmaml.checkpoint import load_checkpoint
from fedmaml.commands.certs import make_dev_certs
from fedmaml.federated.deployment import LocalFederation

pytestmark = pytest.mark.timeout(600)

PRIVATE = {
    "secure-aggregation": True,
    "dp-clip": 1.0,
    "dp-noise": 1.0,
    "round-timeout": 30.0,
}


def authenticated_federation(tmp_path, nodes: int) -> tuple[LocalFederation, list]:
    files = write_devices(tmp_path, n=nodes)
    certs = make_dev_certs(tmp_path / "certs", nodes=nodes)
    tls = {"ca_cert": certs.ca_cert, "cert": certs.server_cert, "key": certs.server_key}
    fed = LocalFederation(tmp_path / "federation", **tls, supernode_auth=True)
    fed.start_superlink()
    for i, file in enumerate(files):
        registered = fed.register(certs.public_key(i))
        assert registered.returncode == 0, registered.stdout + registered.stderr
        fed.add_node(f"node-{i}", node_config(i, file), auth_key=certs.node_keys[i], wait=False)
    fed.wait_ready(*(f"node-{i}" for i in range(nodes)))
    return fed, files


@pytest.mark.slow  # 190 s here: every round is 4 protocol stages of SuperNode polls and processes
def test_three_authenticated_supernodes_over_tls_train_two_rounds_with_secagg_and_dp(tmp_path):
    config = run_config(tmp_path / "run", **PRIVATE)
    fed, _ = authenticated_federation(tmp_path, 3)
    with fed:
        code = fed.run(config, timeout=400)
        assert code == 0, fed.log("run").read_text()[-4000:]
        node_log = fed.log("node-0").read_text()
    rounds, clients = finished_run(tmp_path / "run", config)
    assert contributors(clients, 1) == contributors(clients, 2) == {0, 1, 2}
    assert clients[clients["phase"] == "train"]["masked"].all()
    assert list(rounds["ok"]) == [3, 3] and rounds["epsilon"].is_monotonic_increasing
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").privacy["releases"] == [
        [0.5, 3, 3, 2]
    ]
    assert node_log.count("masking this client's update") == 2


@pytest.mark.slow
def test_a_device_killed_after_sharing_its_keys_does_not_stop_the_round(tmp_path):
    """Four devices, at least three per round; device 3 is killed (SIGKILL, with everything it
    started) as soon as it starts masking in round 1: its keys are shared, its vector never
    comes. The server rebuilds its key from the others' shares and the round updates θ."""
    config = run_config(
        tmp_path / "run",
        **PRIVATE,
        **{"num-train-clients": 4, "min-train-nodes": 3},
    )
    fed, _ = authenticated_federation(tmp_path, 4)
    with fed:
        run = fed.submit(config)
        deadline = time.monotonic() + 300
        while "masking this client's update" not in fed.log("node-3").read_text():
            assert run.poll() is None and time.monotonic() < deadline, fed.log("run").read_text()
            time.sleep(0.05)
        fed.kill("node-3")
        code = run.wait(timeout=400)
        assert code == 0, fed.log("run").read_text()[-4000:]
    rounds = pd.read_csv(tmp_path / "run" / "rounds.csv").set_index("round")
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert rounds.loc[1, "ok"] == 3 and bool(rounds.loc[1, "updated"])
    assert bool(rounds.loc[2, "updated"])
    assert contributors(clients, 1) == {0, 1, 2}
    lost = clients[(clients["round"] == 1) & (clients["client"] == 3)]
    assert list(lost["status"]) == ["no-reply"]
    assert lost["reason"].iloc[0].startswith("collect-masked:")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").round == 2
