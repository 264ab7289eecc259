"""A run's tables on disk: per-round and per-client metrics pandas reads, and a summary.

Files in the run directory (rewritten atomically after every round, so a crash keeps them):
``rounds.csv`` (one row per round), ``clients.csv`` (one row per client reply or failure),
``summary.json`` (configuration, final metrics, wall time).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedmaml.atomic import atomic_write

ROUNDS = "rounds.csv"
CLIENTS = "clients.csv"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"


class RunRecorder:
    """Collects rows during a run and keeps the tables on disk current."""

    def __init__(self, out_dir: str | Path, config: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.clients: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self._load_existing()

    def _load_existing(self) -> None:
        """Keep the rows of an earlier part of this run (resume) instead of overwriting them."""
        import pandas as pd

        if (self.out_dir / ROUNDS).is_file():
            for row in pd.read_csv(self.out_dir / ROUNDS).to_dict("records"):
                self.rounds[int(row["round"])] = row
        if (self.out_dir / CLIENTS).is_file():
            self.clients = pd.read_csv(self.out_dir / CLIENTS).to_dict("records")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def round_values(self, round_: int, **values: Any) -> None:
        row = self.rounds.setdefault(round_, {"round": round_})
        row.update(values)

    def client_row(self, **row: Any) -> None:
        self.clients.append(row)

    def truncate_after(self, round_: int) -> None:
        """Drop rows of rounds after ``round_`` (a resumed run redoes them)."""
        self.rounds = {r: v for r, v in self.rounds.items() if r <= round_}
        self.clients = [c for c in self.clients if int(c.get("round", 0)) <= round_]

    def flush(self) -> None:
        import pandas as pd

        rounds = pd.DataFrame([self.rounds[r] for r in sorted(self.rounds)])
        clients = pd.DataFrame(self.clients)
        atomic_write(self.out_dir / ROUNDS, lambda f: rounds.to_csv(f, index=False))
        atomic_write(self.out_dir / CLIENTS, lambda f: clients.to_csv(f, index=False))

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        last = self.rounds[max(self.rounds)] if self.rounds else {}
        summary = {
            "config": self.config,
            "rounds": len(self.rounds),
            "wall_time_s": round(self.elapsed(), 2),
            "final": {k: v for k, v in last.items() if isinstance(v, int | float)},
            **extra,
        }
        atomic_write(self.out_dir / SUMMARY, lambda f: json.dump(summary, f, indent=2, default=str))
        return summary
