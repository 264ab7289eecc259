"""One run at a time in a run directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from fedmaml.errors import FedmamlError
from fedmaml.rundir.names import LOCK


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the run directory for one run: a second run into it (the same ``flwr run``
    submitted twice) stops with a clear error instead of writing the same checkpoint and
    tables. The lock is the kernel's (``flock``), so a killed run never leaves it held."""
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            raise FedmamlError(
                f"run directory {out_dir} is in use by another run (pid {owner}); wait for it "
                "to finish, stop it, or choose another out-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
