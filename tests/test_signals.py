"""Signals stop ``fedmaml simulate`` cleanly: SIGTERM (timeout, systemd, Docker, CI, schedulers)
and SIGHUP (a closed terminal) as Ctrl-C does. The checkpoint stays intact and no process the
command started survives, Ray's daemons included (found by a marker in their environment, so a
process that left the tree is found too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from fedmaml.checkpoint import load_checkpoint
from fedmaml.federated.processes import descendants

pytestmark = pytest.mark.timeout(300)

FEDMAML = str(Path(sys.executable).with_name("fedmaml"))


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def carrying(marker: str) -> list[int]:
    """Live processes whose environment holds the test's marker."""
    needle = f"FEDMAML_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [p for p in found if alive(p)]


def wait_for_round(out: Path, process: subprocess.Popen, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the simulation ended before it was signalled"
        try:
            done = pd.read_csv(out / "rounds.csv").dropna(subset=["updated"])
            if len(done) and done["round"].max() >= at_least:
                return int(done["round"].max())
        except (FileNotFoundError, KeyError, pd.errors.EmptyDataError, pd.errors.ParserError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no round {at_least} within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_whole_simulation_and_keeps_the_checkpoint(tmp_path, signum):
    out = tmp_path / "run"
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [
            FEDMAML,
            "simulate",
            "--rounds",
            "500",
            "--clients",
            "4",
            "--heldout-clients",
            "1",
            "--out",
            str(out),
            "--quiet",
            "--no-plot",
        ],
        env={**os.environ, "FEDMAML_TEST_MARKER": marker},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_round(out, process, 3, 240)
        started = set(descendants(process.pid)) | set(carrying(marker))
        assert len(started) > 5  # SuperLink, SuperExec, flwr run, flwr-simulation, Ray, ...
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, err
    assert signal.Signals(signum).name in err and "Traceback" not in err
    survivors = [p for p in started if alive(p)] + carrying(marker)
    assert not survivors, f"still running: {survivors}"
    ckpt = load_checkpoint(out / "checkpoint.pt")  # intact, and not advanced after the stop
    assert ckpt.round >= 3
    time.sleep(2.0)
    assert load_checkpoint(out / "checkpoint.pt").round == ckpt.round
