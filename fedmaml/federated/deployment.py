"""A Flower deployment of fedmaml on this machine: :class:`LocalFederation`, a SuperLink and
SuperNodes (free ports, readiness on ``/health``, one log per process, stops by pid and run
token), and ``flwr`` commands against it. What the deployment tests and the latency benchmark
share; the command lines themselves come from :mod:`fedmaml.federated.flower_cli`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tomli_w

from fedmaml.errors import FedmamlError
from fedmaml.federated.flower_cli import (
    APP_DIR,
    CONNECTION,
    flower_bin,
    superlink_command,
    supernode_command,
    write_connection,
)
from fedmaml.federated.processes import (
    descendants,
    flower_env,
    free_port,
    new_token,
    stop_marked,
    stop_tree,
    wait_healthy,
)


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, under ``root`` (logs, ``FLWR_HOME``, state).

    Use it as a context manager: leaving it stops every process it started, by pid, even when
    the body raised. TLS when ``ca_cert``, ``cert`` and ``key`` are given (SuperNodes then get
    ``ca_cert`` as their root certificate), with SuperNode authentication if
    ``supernode_auth``. The SuperLink keeps its state in ``root/state.db``, so a restarted
    SuperLink (:meth:`restart_superlink`) still knows the SuperNodes.
    """

    def __init__(
        self,
        root: Path,
        *,
        ca_cert: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        supernode_auth: bool = False,
        app_dir: Path = APP_DIR,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.token = new_token()
        self.env = flower_env(self.home, self.token)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ca_cert, self.app_dir = ca_cert, app_dir
        self._superlink_cmd = superlink_command(
            self.port,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            supernode_auth=supernode_auth,
            database=self.root / "state.db",
        )
        write_connection(self.home, self.address, root_certificates=ca_cert)
        self.processes: dict[str, subprocess.Popen] = {}
        self._health: dict[str, str] = {}

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start_superlink(self, timeout: float = 60.0) -> subprocess.Popen:
        scheme = "https" if self.ca_cert else "http"
        return self._start(
            "superlink", self._superlink_cmd, f"{scheme}://{self.address}/health", timeout
        )

    def restart_superlink(self, timeout: float = 60.0) -> subprocess.Popen:
        """Stop the SuperLink (and the ServerApp it runs) and start it again on the same port
        and state."""
        stop_tree(self.processes["superlink"])
        return self.start_superlink(timeout)

    def add_node(
        self,
        name: str,
        node_config: Mapping[str, Any],
        *,
        auth_key: Path | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.Popen:
        """Start SuperNode ``name``; with ``wait``, return once its ``/health`` answers (else
        see :meth:`wait_ready`, to start several nodes at once)."""
        port = free_port()
        cmd = supernode_command(
            self.address,
            port=port,
            node_config=node_config,
            insecure=self.ca_cert is None,
            root_certificates=self.ca_cert,
            auth_key=auth_key,
        )
        self._health[name] = f"http://127.0.0.1:{port}/health"
        return self._start(name, cmd, self._health[name] if wait else "", timeout)

    def wait_ready(self, *names: str, timeout: float = 60.0) -> None:
        """Wait until the SuperNodes ``names`` answer on ``/health``."""
        for name in names:
            wait_healthy(self._health[name], self.processes[name], timeout, self.log(name))

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and everything it started, at once: a device that dies,
        with no goodbye to the SuperLink."""
        process = self.processes[name]
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=10)

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this federation (FLWR_HOME under ``root``), output captured."""
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        return self.flwr("supernode", "register", str(public_key), CONNECTION)

    def submit(
        self, run_config: Mapping[str, Any], name: str = "run", app_dir: Path | None = None
    ) -> subprocess.Popen:
        """``flwr run <app> fedmaml --stream`` with ``run_config`` (a TOML file under ``root``)
        in the background, its output in ``root/<name>.log``; the app is fedmaml's unless
        ``app_dir`` names another."""
        config = self.root / f"{name}.toml"
        config.write_text(tomli_w.dumps(dict(run_config)))
        app = str(app_dir or self.app_dir)
        cmd = [flower_bin("flwr"), "run", app, CONNECTION, "--stream"]
        return self._start(name, [*cmd, "--run-config", str(config)], "", 0)

    def run(
        self,
        run_config: Mapping[str, Any],
        *,
        timeout: float = 600.0,
        name: str = "run",
        app_dir: Path | None = None,
    ) -> int:
        """Submit a run and wait for it to end; its exit code."""
        process = self.submit(run_config, name, app_dir)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise FedmamlError(
                f"the run did not finish within {timeout:.0f} s; see {self.log(name)}"
            ) from None

    def close(self) -> None:
        """Stop every process still running (all at once: SuperNodes take seconds to leave)."""
        running = [p for p in self.processes.values() if p.poll() is None]
        with ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:
            list(pool.map(stop_tree, running))
        stop_marked(self.token)

    def _start(self, name: str, cmd: list[str], health: str, timeout: float) -> subprocess.Popen:
        """Start ``cmd`` in its own session, output appended to ``root/<name>.log``."""
        if name in self.processes and self.processes[name].poll() is None:
            raise FedmamlError(f"{name} is already running; stop it first or use another name")
        with open(self.log(name), "a") as log:
            process = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        if health:
            wait_healthy(health, process, timeout, self.log(name), ca_file=self.ca_cert)
        return process
