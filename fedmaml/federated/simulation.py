"""A managed local Flower simulation: what ``fedmaml simulate`` and the tests run.

It starts its own SuperLink in simulation mode (free ports, a private ``FLWR_HOME``, no
runtime dependency installation, no update check or telemetry), submits the app with
``flwr run`` and the run config as a TOML file, waits for the run to end, and stops the
SuperLink and everything it started (Ray included, unless it runs on an existing Ray cluster:
``ray_address``) by pid and by run token — also when it is
interrupted (Ctrl-C, SIGTERM, SIGHUP) or fails: nothing is left running, and the user's
``~/.flwr`` and pyproject.toml are never touched.

The processes' output goes, without colour codes, to ``flower.log`` in the run directory
(appended to when the run resumes), and each line to an optional ``on_line`` callback: the
command shows fedmaml's own messages (start-up stages, warnings, errors) as they come.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.flower_cli import (
    APP_DIR,
    CONNECTION,
    flower_bin,
    superlink_command,
    write_connection,
)
from fedmaml.federated.processes import (
    flower_env,
    free_port,
    new_token,
    stop_marked,
    stop_on_signals,
    stop_tree,
    strip_ansi,
    wait_healthy,
)
from fedmaml.federated.ray_cluster import RAY_ADDRESS, check_address
from fedmaml.rundir.names import FLOWER_LOG, SUMMARY


@dataclass(frozen=True)
class SimulationOptions:
    num_supernodes: int | None = None  # default: cfg.simulated_nodes
    client_cpus: int = 1
    client_gpus: float = 0.0
    timeout: float = 3600.0
    #: HOST:PORT of an existing Ray cluster to run the ClientApps on (None: a private Ray on
    #: this machine); see :mod:`fedmaml.federated.ray_cluster`
    ray_address: str | None = None


def simulate(
    cfg: RunConfig,
    options: SimulationOptions = SimulationOptions(),
    *,
    log_path: Path | None = None,
    on_poll: Callable[[], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    app_dir: Path = APP_DIR,
    app_config: Mapping[str, Any] | None = None,
) -> Path:
    """Run ``cfg`` as a Flower simulation; return the run directory (``cfg.out_dir``).

    ``on_poll`` is called about once a second while the run goes on, ``on_line`` with every
    line of the Flower processes' output. ``app_dir`` and ``app_config`` run another Flower app
    (a benchmark's baseline) the same way, with that run config; ``cfg`` then gives only the
    run directory and the number of nodes.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise FedmamlError(
            f"no Flower app found at {app_dir}: run fedmaml simulate from a fedmaml source "
            "checkout (pip install -e .)"
        )
    if app_config is None and cfg.task == "local":
        raise FedmamlError(
            "task 'local' trains on each device's own data and runs only in a deployment "
            "(fedmaml client on each device); simulate task sine, omniglot, femnist or table"
        )
    out_dir = Path(cfg.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cfg = cfg.replace(
        out_dir=str(out_dir),
        resume=cfg.resume if cfg.resume in ("", "auto") else str(Path(cfg.resume).resolve()),
        # the apps run in another working directory: local paths must be absolute
        data_path=str(Path(cfg.data_path).resolve())
        if Path(cfg.data_path).exists() and cfg.data_path
        else cfg.data_path,
    )
    log_path = log_path or out_dir / FLOWER_LOG
    nodes = options.num_supernodes or cfg.simulated_nodes
    token = new_token()
    with (
        stop_on_signals(),
        tempfile.TemporaryDirectory(prefix="fedmaml-flwr-") as home,
        _LogPump(log_path, append=bool(cfg.resume), on_line=on_line) as log,
    ):
        run_config = Path(home) / "run_config.toml"
        mapping = cfg.to_mapping() if app_config is None else dict(app_config)
        run_config.write_bytes(tomli_w.dumps(mapping).encode())
        port = free_port()
        env = flower_env(home, token)
        # Flower's ray.init() joins the cluster that RAY_ADDRESS or Ray's bootstrap file
        # (<RAY_TMPDIR or /tmp>/ray/ray_current_cluster, left by any `ray start`, also by a
        # head that died) names: the cluster asked for (--ray-address), else a Ray instance of
        # the simulation's own, never one found by chance.
        env[RAY_ADDRESS] = check_address(options.ray_address) if options.ray_address else "local"
        write_connection(Path(home), f"127.0.0.1:{port}")
        superlink = runner = None
        try:
            superlink = subprocess.Popen(
                superlink_command(port, simulation=True),
                env=env,
                cwd=home,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.follow(superlink)
            wait_healthy(f"http://127.0.0.1:{port}/health", superlink, 60, log_path)
            federation = (
                f"num-supernodes={nodes} client-resources-num-cpus={options.client_cpus} "
                f"client-resources-num-gpus={options.client_gpus}"
            )
            runner = subprocess.Popen(
                [
                    flower_bin("flwr"),
                    "run",
                    str(app_dir),
                    CONNECTION,
                    "--stream",
                    "--run-config",
                    str(run_config),
                    "--federation-config",
                    federation,
                ],
                env=env,
                cwd=home,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.follow(runner)
            _wait(runner, options.timeout, on_poll)
        finally:
            for process in (runner, superlink):
                if process is not None:
                    stop_tree(process)
            stop_marked(token)
    if app_config is None:
        _check_outcome(out_dir / SUMMARY, started, log_path)
    elif runner.returncode != 0:
        raise FedmamlError(f"the Flower run failed (exit {runner.returncode}); see {log_path}")
    return out_dir


def _check_outcome(summary: Path, started: float, log_path: Path) -> None:
    """Raise the ServerApp's own error when the run did not finish: from this run's
    ``summary.json``, else (it stopped before writing one) its last error line in the log."""
    if summary.is_file() and summary.stat().st_mtime >= started:
        outcome = json.loads(summary.read_text())
        if outcome.get("status") != "failed":
            return
        raise FedmamlError(f"{outcome.get('error')} (log: {log_path})")
    errors = re.findall(r"ERROR\W.*?fedmaml: (.+)", strip_ansi(log_path.read_text()))
    reason = errors[-1].strip() if errors else "the ServerApp stopped before the end of the run"
    raise FedmamlError(f"{reason} (log: {log_path})")


def _wait(process: subprocess.Popen, timeout: float, on_poll: Callable[[], None] | None) -> None:
    """Wait for ``process``, calling ``on_poll`` about once a second; stop it after ``timeout``."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            stop_tree(process)
            raise FedmamlError(f"the simulation did not finish within {timeout:.0f} s")
        if on_poll:
            on_poll()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)


class _LogPump:
    """The processes' output, line by line, into the log file (colour codes stripped) and to
    ``on_line``; one reader thread per process. Leaving the block waits for the readers (the
    processes are stopped by then), so the log is complete."""

    def __init__(self, path: Path, *, append: bool, on_line: Callable[[str], None] | None) -> None:
        self.path, self.append, self.on_line = path, append, on_line
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> _LogPump:
        self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")
        if self.append:
            self._file.write(f"\n===== resumed {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        return self

    def follow(self, process: subprocess.Popen) -> None:
        thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = strip_ansi(raw.decode("utf-8", errors="replace"))
            with self._lock:
                self._file.write(line)
                self._file.flush()
            if self.on_line is not None:
                self.on_line(line.rstrip("\n"))

    def __exit__(self, *exc: object) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        self._file.close()
