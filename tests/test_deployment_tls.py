"""The deployment over TLS with SuperNode authentication, as in production: the SuperLink
presents a certificate signed by a CA (``fedmaml certs``), every SuperNode checks it and signs
in with its ECDSA key registered through ``flwr supernode register``; a SuperNode whose key was
never registered is refused and takes no part in the run."""

from __future__ import annotations

import json

import pytest
from deployment_support import (
    contributors,
    finished_run,
    node_config,
    run_config,
    write_devices,
)

from fedmaml.commands.certs import make_dev_certs
from fedmaml.federated.deployment import LocalFederation

pytestmark = pytest.mark.timeout(420)


def test_tls_authenticated_supernodes_train_and_an_unregistered_one_is_refused(tmp_path):
    files = write_devices(tmp_path)
    certs = make_dev_certs(tmp_path / "certs", nodes=4)
    config = run_config(tmp_path / "run", **{"num-rounds": 1})
    tls = {"ca_cert": certs.ca_cert, "cert": certs.server_cert, "key": certs.server_key}
    with LocalFederation(tmp_path / "federation", **tls, supernode_auth=True) as fed:
        fed.start_superlink()
        for i in range(len(files)):
            registered = fed.register(certs.public_key(i))
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for i, file in enumerate(files):
            fed.add_node(f"node-{i}", node_config(i, file), auth_key=certs.node_keys[i], wait=False)
        intruder = fed.add_node(
            "intruder", node_config(7, files[0]), auth_key=certs.node_keys[3], wait=False
        )
        fed.wait_ready("node-0", "node-1", "node-2")
        code = fed.run(config, timeout=360)
        assert code == 0, fed.log("run").read_text()[-4000:]
        assert intruder.wait(timeout=60) != 0
        refused = fed.log("intruder").read_text()
        listed = fed.flwr("supernode", "ls", "fedmaml", "--format", "json")
    assert "Failed to initialize the connection" in refused
    _, clients = finished_run(tmp_path / "run", config)
    assert contributors(clients, 1) == {0, 1, 2}
    assert 7 not in set(clients["client"].astype(int))
    assert [n["status"] for n in json.loads(listed.stdout)["nodes"]] == ["online"] * 3
