"""Atomic file output: write beside the target, then ``os.replace`` it into place.

A crash or an error mid-write leaves the previous file intact (or no file), never a partial
one. Every file fedmaml writes (checkpoints, result tables, plots, personalized models,
predictions, certificates) goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from fedmaml.errors import FedmamlError

#: the process's umask, read once (reading it means setting it, which must not race a thread)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike, *, private: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` only on success. The
    file gets the mode ``open`` would give it (0666 less the umask), or 0600 when ``private``
    (keys)."""
    path = Path(path)
    if path.is_dir():
        raise FedmamlError(f"{path} is a folder; give the path of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise FedmamlError(
            f"cannot write {path} ({exc.strerror}); choose a writable location"
        ) from None
    os.close(fd)
    if not private:
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would create it; mkstemp makes it 0600
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[Any]], object],
    mode: str = "w",
    *,
    fsync: bool = False,
    private: bool = False,
) -> Path:
    """Call ``write(file)`` on a temporary file opened with ``mode``, then move it to ``path``;
    ``fsync`` flushes it to disk first (checkpoints); ``private`` keeps it readable by its owner
    only (keys)."""
    with atomic_path(path, private=private) as tmp, open(tmp, mode) as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
