"""Running a simulation on an existing Ray cluster (more machines, or GPU workers).

Flower's simulation runtime starts Ray with ``ray.init()`` and no address
(``flwr/server/superlink/fleet/vce/backend/raybackend.py``); Ray then joins the cluster named
by the ``RAY_ADDRESS`` environment variable when it is set. ``fedmaml simulate --ray-address
HOST:PORT`` (:func:`fedmaml.federated.simulation.simulate`) therefore sets ``RAY_ADDRESS`` for
the SuperLink it starts, which passes it to the simulation process; with ``flwr run`` start the
SuperLink with that variable set. The ClientApps then run as Ray actors on the cluster's
machines, one actor per ``client-resources-num-cpus`` (and ``-num-gpus``) the cluster has.

:func:`check_address` refuses an address no Ray head answers at, before Flower starts;
:func:`head_command` and :func:`worker_command` are the ``ray start`` command lines of a
cluster's processes (docs/scale.md gives the same steps as shell commands), each in the
foreground (``--block``) so that it can be stopped by its pid.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from fedmaml.errors import FedmamlError
from fedmaml.federated.flower_cli import check_address as check_host_port
from fedmaml.federated.processes import free_port

#: the environment variable ``ray.init()`` reads the cluster's address from
RAY_ADDRESS = "RAY_ADDRESS"


def check_address(address: str, timeout: float = 5.0) -> str:
    """``HOST:PORT`` of a Ray head (its GCS port) that accepts connections, else one error."""
    check_host_port(address)
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return address
    except OSError as exc:
        raise FedmamlError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start its head with "
            f"ray start --head --port {port} (docs/scale.md), or leave out --ray-address to run "
            "on this machine"
        ) from None


def ray_bin() -> str:
    """The ``ray`` executable beside this Python (its venv), else as found on PATH."""
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else "ray"


def _ports(host: str) -> list[str]:
    """Free ports for every service a Ray node opens (several nodes can share a host)."""
    return [
        "--node-ip-address",
        host,
        "--node-manager-port",
        str(free_port()),
        "--object-manager-port",
        str(free_port()),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--dashboard-agent-grpc-port",
        str(free_port()),
        "--runtime-env-agent-port",
        str(free_port()),
        "--metrics-export-port",
        str(free_port()),
    ]


def _node(
    role: list[str], host: str, num_cpus: int, num_gpus: int, object_store_mb: int
) -> list[str]:
    """``ray start ROLE... --block`` with the node's resources and free ports."""
    return [
        ray_bin(),
        "start",
        *role,
        "--block",
        "--disable-usage-stats",
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        "--object-store-memory",
        str(object_store_mb * 2**20),
        *_ports(host),
    ]


def head_command(
    port: int,
    *,
    host: str = "127.0.0.1",
    num_cpus: int = 1,
    num_gpus: int = 0,
    object_store_mb: int = 200,
) -> list[str]:
    """``ray start --head`` on ``host:port``, in the foreground, without a dashboard."""
    role = ["--head", "--port", str(port), "--ray-client-server-port", str(free_port())]
    role += ["--include-dashboard", "false"]
    return _node(role, host, num_cpus, num_gpus, object_store_mb)


def worker_command(
    address: str,
    *,
    host: str = "127.0.0.1",
    num_cpus: int = 1,
    num_gpus: int = 0,
    object_store_mb: int = 200,
) -> list[str]:
    """``ray start`` of a worker node joining the head at ``address``, in the foreground."""
    return _node(["--address", address], host, num_cpus, num_gpus, object_store_mb)
