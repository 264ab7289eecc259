"""The command lines and connection file of Flower's programs, as fedmaml starts them.

* :func:`superlink_command` and :func:`supernode_command`: the argv of ``flower-superlink`` and
  ``flower-supernode``: over TLS, optionally with SuperNode authentication
  (``--enable-supernode-auth`` on the SuperLink, ``--auth-supernode-private-key`` on each
  SuperNode, keys registered with ``flwr supernode register``), or insecure for local testing;
* :func:`node_config_text`: a ``--node-config`` string from a mapping (TOML values);
* :func:`write_connection`: a named SuperLink connection in ``$FLWR_HOME/config.toml``, the
  target of ``flwr run <app> <connection>``;
* :data:`APP_DIR`: fedmaml's own Flower app (the checkout holding its pyproject.toml).

``fedmaml simulate``, ``fedmaml client``, the deployment tests and the benchmarks all build
their command lines here; docs/deployment.md gives the same steps as shell commands.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedmaml.errors import FedmamlError
from fedmaml.federated.processes import free_port

APP_DIR = Path(__file__).resolve().parents[2]
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_host(host: str) -> str:
    """``host`` if it is an IP address or a DNS name (RFC 1123 labels), else one clear error."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise FedmamlError(
            f"{host!r} is not a host name or IP address; give e.g. 127.0.0.1, "
            "link.example.org or [::1]"
        )
    return host


def check_address(address: str) -> str:
    """``HOST:PORT`` (IPv6 as ``[::1]:9092``) checked, else one clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise FedmamlError(
            f"{address!r} is not HOST:PORT; give the SuperLink's address, e.g. 127.0.0.1:9092"
        )
    check_host(host)
    return address


def flower_bin(name: str) -> str:
    """The Flower executable ``name`` beside this Python (its venv), else as found on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


CONNECTION = "fedmaml"


def superlink_command(
    port: int,
    *,
    host: str = "127.0.0.1",
    ca_cert: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    supernode_auth: bool = False,
    database: Path | None = None,
    simulation: bool = False,
) -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs on ``host:port``: TLS when
    the certificate files are given, insecure otherwise (local testing only). ``database``
    keeps runs and registered SuperNodes across restarts; ``simulation`` runs the apps on
    Flower's simulation engine instead of real SuperNodes. Its gRPC health server takes a free
    port, so that several SuperLinks can run on one host."""
    tls = (ca_cert, cert, key)
    if any(tls) and not all(tls):
        raise FedmamlError("TLS needs all three of the CA certificate, certificate and key")
    if supernode_auth and not all(tls):
        raise FedmamlError("SuperNode authentication needs TLS: give the SuperLink certificates")
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--health-server-address",
        f"{host}:{free_port()}",
    ]
    if simulation:
        cmd += ["--simulation", "--isolation", "subprocess"]
    if all(tls):
        cmd += ["--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(cert)]
        cmd += ["--ssl-keyfile", str(key)]
    else:
        cmd.append("--insecure")
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def write_connection(
    home: Path, address: str, *, name: str = CONNECTION, root_certificates: Path | None = None
) -> Path:
    """``$FLWR_HOME/config.toml`` (created or replaced) with one connection ``name`` to
    ``address``, the default: TLS verified against ``root_certificates``, else insecure."""
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: entry}}))
    return path


def node_config_text(values: Mapping[str, Any]) -> str:
    """``key=value ...`` as ``flower-supernode --node-config`` parses it (strings quoted)."""
    parts = []
    for key, value in values.items():
        if not key or any(c.isspace() or c == "=" for c in key):
            raise FedmamlError(f"node config key {key!r} must be one word without '='")
        if isinstance(value, str) and '"' in value:
            raise FedmamlError(f"node config {key}={value!r}: values cannot hold double quotes")
        parts.append(f"{key}={tomli_w.dumps({'v': value}).partition('=')[2].strip()}")
    return " ".join(parts)


def supernode_command(
    superlink: str,
    *,
    port: int,
    node_config: Mapping[str, Any],
    insecure: bool = False,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port): insecure, or TLS verified
    against ``root_certificates`` (the system's CAs when None), authenticated with
    ``auth_key`` (an ECDSA private key in OpenSSH format) when given. ``port`` is the node's
    own local API (and its ``/health``); every SuperNode on a host needs its own."""
    check_address(superlink)
    if insecure and (root_certificates or auth_key):
        raise FedmamlError(
            "an insecure SuperNode takes no certificates or key: SuperNode authentication needs "
            "TLS; drop --insecure or the certificate and key"
        )
    for path in (root_certificates, auth_key):
        if path is not None and not Path(path).is_file():
            raise FedmamlError(f"{path}: no such file")
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    if root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    if node_config:
        cmd += ["--node-config", node_config_text(node_config)]
    return cmd
