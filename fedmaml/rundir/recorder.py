"""Writing a run's tables: per-round and per-client metrics pandas reads, and a summary.

``rounds.csv`` (one row per round) is rewritten atomically after every round, so a crash keeps
it; ``summary.json`` (configuration, how the run ended, final metrics, wall time) is written at
the end.

``clients.csv`` (one row per client reply or failure) only grows: after a round its new rows
are appended, and the file is rewritten (atomically) only when a row brings a new column, after
a resume's truncation, or when the file on disk is not the one last written. Rewriting it
every round cost the whole table's bytes each round: 47 ms a round after 1,000 rounds of 100
clients, and growing. A crash in the middle of an append can leave a last line cut short; a
resumed run drops it (:meth:`RunRecorder._load_existing`).

The CSV files are written as pandas writes a DataFrame of the rows (columns in order of first
appearance, a missing or NaN value an empty field) and ``pd.read_csv`` reads back the same
table; each row is formatted once and kept.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmaml.atomic import atomic_write
from fedmaml.rundir.names import CLIENTS, ROUNDS, SUMMARY

log = logging.getLogger(__name__)


class CsvTable:
    """Rows of a CSV file and their formatted lines, kept between writes.

    A row is formatted when it is added and again only after it changed (``touch``) or a new
    column appeared; ``text()`` joins the kept lines.
    """

    def __init__(self) -> None:
        self.columns: dict[str, None] = {}
        self._lines: dict[Any, str] = {}

    def reset(self, rows: Iterable[dict[str, Any]]) -> None:
        """Forget every formatted line; the columns become those of ``rows``."""
        self.columns = {k: None for row in rows for k in row}
        self._lines = {}

    def touch(self, key: Any, row: dict[str, Any]) -> None:
        """Row ``key`` was added or changed: format it again at the next ``text()``."""
        self._lines.pop(key, None)
        if any(k not in self.columns for k in row):
            self.columns.update(dict.fromkeys(row))
            self._lines = {}

    def text(self, rows: Iterable[tuple[Any, dict[str, Any]]]) -> str:
        """The CSV text of ``(key, row)`` pairs, in that order."""
        if not self.columns:
            return "\n"  # pandas' text for a table without columns
        return ",".join(_quote(c) for c in self.columns) + "\n" + self.lines(rows)

    def lines(self, rows: Iterable[tuple[Any, dict[str, Any]]]) -> str:
        """The CSV lines of ``(key, row)`` pairs without the header, each ending a line."""
        out = []
        for key, row in rows:
            line = self._lines.get(key)
            if line is None:
                line = self._lines[key] = ",".join(_field(row.get(c)) for c in self.columns)
            out.append(line + "\n")
        return "".join(out)


def _field(value: Any) -> str:
    """One value as pandas writes it (floats at full precision, NaN and None empty)."""
    if value is None or isinstance(value, bool):
        return "" if value is None else str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "" if math.isnan(value) else repr(float(value))
    return _quote(str(value))


def _quote(text: str) -> str:
    """Quote a field the way Python's csv module does (QUOTE_MINIMAL)."""
    if any(c in text for c in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


class RunRecorder:
    """Collects rows during a run and keeps the tables on disk current."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.clients: list[dict[str, Any]] = []
        #: what the run found out about itself (e.g. the clients it has), for summary.json
        self.facts: dict[str, Any] = {}
        self.started = time.monotonic()
        self._load_existing()
        self._rounds_csv = CsvTable()
        self._clients_csv = CsvTable()
        self._reset_tables()

    def _load_existing(self) -> None:
        """Keep the rows of an earlier part of this run (resume) instead of overwriting them.
        (pandas is imported only then: a new run's server starts faster without it.)"""
        rounds, clients = self.out_dir / ROUNDS, self.out_dir / CLIENTS
        if not (rounds.is_file() or clients.is_file()):
            return
        import pandas as pd

        def rows(path: Path) -> list[dict[str, Any]]:
            """The table's rows; none for a missing file or one without columns (a run that
            stopped before its first round). A last line without its end (an append cut
            short by a crash) is dropped, and said."""
            if not path.is_file():
                return []
            text = path.read_text()
            if text and not text.endswith("\n"):
                cut = text.rfind("\n") + 1
                log.warning("%s: its last line was cut short (a crash?): dropped", path)
                text = text[:cut]
            try:
                return pd.read_csv(io.StringIO(text)).to_dict("records")
            except pd.errors.EmptyDataError:
                return []

        self.rounds = {int(row["round"]): row for row in rows(rounds)}
        self.clients = rows(clients)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def round_values(self, round_: int, **values: Any) -> None:
        row = self.rounds.setdefault(round_, {"round": round_})
        row.update(values)
        self._rounds_csv.touch(round_, row)

    def client_row(self, **row: Any) -> None:
        self.clients.append(row)
        self._clients_csv.touch(len(self.clients) - 1, row)

    def truncate_after(self, round_: int) -> None:
        """Drop rows of rounds after ``round_`` (a resumed run redoes them)."""
        self.rounds = {r: v for r, v in self.rounds.items() if r <= round_}
        self.clients = [c for c in self.clients if int(c.get("round", 0)) <= round_]
        self._reset_tables()

    def _reset_tables(self) -> None:
        self._rounds_csv.reset(self.rounds[r] for r in sorted(self.rounds))
        self._clients_csv.reset(self.clients)
        #: what clients.csv on disk holds: its first rows, under these columns, in these bytes
        #: (none yet: the next flush writes the file whole)
        self._clients_written: tuple[int, tuple[str, ...], int] = (0, (), -1)

    def flush(self) -> None:
        rounds = self._rounds_csv.text((r, self.rounds[r]) for r in sorted(self.rounds))
        atomic_write(self.out_dir / ROUNDS, lambda f: f.write(rounds))
        self._flush_clients()

    def _flush_clients(self) -> None:
        """Append the rows added since the last write to ``clients.csv``, or rewrite it when
        its columns changed or the file is not the one last written (module docstring)."""
        path = self.out_dir / CLIENTS
        written, columns, size = self._clients_written
        now = tuple(self._clients_csv.columns)
        try:
            same_file = path.stat().st_size == size
        except OSError:
            same_file = False
        if written and columns == now and same_file:
            new = self._clients_csv.lines(
                (i, self.clients[i]) for i in range(written, len(self.clients))
            )
            data = new.encode()
            with path.open("ab") as f:
                f.write(data)
            size += len(data)
        else:
            data = self._clients_csv.text(enumerate(self.clients)).encode()
            atomic_write(path, lambda f: f.write(data), mode="wb")
            size = len(data)
        self._clients_written = (len(self.clients), now, size)

    def updated_rounds(self, after: int = 0) -> int:
        """How many rounds after ``after`` updated θ."""
        return sum(
            1 for r, row in self.rounds.items() if r > after and row.get("updated") in (True,)
        )

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        last = self.rounds[max(self.rounds)] if self.rounds else {}
        summary = {
            "config": self.config,
            "rounds": max(self.rounds, default=0),
            "wall_time_s": round(self.elapsed(), 2),
            "final": {k: v for k, v in last.items() if isinstance(v, int | float)},
            **self.facts,
            **extra,
        }
        atomic_write(self.out_dir / SUMMARY, lambda f: json.dump(summary, f, indent=2, default=str))
        return summary
