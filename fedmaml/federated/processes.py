"""Processes fedmaml starts (SuperLink, SuperNodes): their environment, free ports, readiness,
clean stops by pid, and signals turned into the same clean stop.

Every process fedmaml starts carries a run token in its environment (``FEDMAML_RUN_TOKEN``),
inherited by everything it starts in turn (Flower's SuperExec, ``flwr-simulation``, Ray's
daemons and workers, ``flwr-clientapp``). :func:`stop_marked` stops them by that token, so a
process that left the tree (re-parented to init when its parent died first) is stopped too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from fedmaml.errors import FedmamlError

#: no update check, telemetry or per-run dependency installation (nothing needs the network)
QUIET_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


TOKEN = "FEDMAML_RUN_TOKEN"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (Flower colours its log lines)."""
    return _ANSI.sub("", text)


def new_token() -> str:
    """A fresh run token, to mark every process one launch starts (:func:`stop_marked`)."""
    return uuid.uuid4().hex


def flower_env(
    home: str | os.PathLike[str] | None = None, token: str | None = None
) -> dict[str, str]:
    """This environment, quiet (:data:`QUIET_ENV`), with this venv's executables first on PATH
    (Flower starts ``flower-superexec`` and ``flwr-clientapp`` by name), ``FLWR_HOME`` set
    when ``home`` is given and the run token when ``token`` is."""
    env = {
        **os.environ,
        **QUIET_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if home is not None:
        env["FLWR_HOME"] = str(home)
    if token is not None:
        env[TOKEN] = token
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(
    url: str,
    process: subprocess.Popen,
    timeout: float,
    log: Path | None,
    ca_file: str | os.PathLike[str] | None = None,
) -> None:
    """Poll ``url`` until it answers 200; fail early if ``process`` exits. An ``https`` URL is
    verified against ``ca_file`` (the system's CAs when None)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https") else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedmamlError(
                f"{process.args[0]} exited with code {process.returncode} before it was ready"
                + (f"; see {log}" if log else "")
            )
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(url, timeout=1, context=context) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise FedmamlError(
        f"{url} did not answer within {timeout:.0f} s" + (f"; see {log}" if log else "")
    )


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def marked(token: str) -> list[int]:
    """The live processes whose environment holds ``FEDMAML_RUN_TOKEN=token`` (Linux /proc;
    processes of other users are not readable and not listed)."""
    needle = f"{TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def stop_pids(pids: list[int], timeout: float = 10.0, wait: subprocess.Popen | None = None) -> None:
    """SIGTERM every pid, then SIGKILL those still alive after ``timeout`` (Ray's agents ignore
    SIGTERM); ``wait`` is reaped as it exits."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    if wait is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait.wait(timeout=timeout)
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    if wait is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait.wait(timeout=2)


def stop_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop ``process`` and every process it started: SIGTERM, then SIGKILL after ``timeout``.
    A process that has already exited is left alone (its pid may belong to another by now)."""
    if process.poll() is not None:
        return
    pids = [process.pid, *descendants(process.pid)] if Path("/proc").is_dir() else [process.pid]
    stop_pids(pids, timeout, wait=process)


def stop_marked(token: str, timeout: float = 10.0) -> None:
    """Stop every process still carrying the run token (after the trees were stopped: what
    left them)."""
    stop_pids(marked(token), timeout)


class Stopped(KeyboardInterrupt):
    """The command was stopped by a signal (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` (in the main
    thread), so that the block's ``finally`` clauses stop what it started, for a scheduler's or
    ``timeout``'s SIGTERM as for Ctrl-C. Further signals are ignored until the block has
    cleaned up; the previous handlers are restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: object) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True
