"""Per-round progress and the closing results table of ``fedmaml simulate``, read from the run
directory's tables while Flower runs (the Flower processes' own log goes to ``flower.log``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmaml.config import RunConfig
from fedmaml.rundir.names import CHECKPOINT, CLIENTS, FLOWER_LOG, ROUNDS


class RoundProgress:
    def __init__(self, out_dir: Path, num_rounds: int, *, quiet: bool = False) -> None:
        self.out_dir = out_dir.resolve()
        self.num_rounds = num_rounds
        self.quiet = quiet
        # a log file or pipe gets lines wide enough for the results table
        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
        self.shown = 0
        self.started = time.monotonic()
        self._mtime = 0.0

    def start(self, cfg: RunConfig) -> None:
        if not self.quiet:
            self.console.print(
                f"fedmaml: {cfg.algorithm} on {cfg.task}, {cfg.num_rounds} rounds, "
                f"{cfg.num_train_clients} training + {cfg.num_heldout_clients} held-out clients; "
                f"run directory {self.out_dir} (Flower log: {FLOWER_LOG})"
            )

    def poll(self) -> None:
        """Print the rounds finished since the last call."""
        path = self.out_dir / ROUNDS
        if self.quiet or not path.is_file() or path.stat().st_mtime == self._mtime:
            return
        self._mtime = path.stat().st_mtime
        import pandas as pd

        try:
            rounds = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError):
            return
        done = rounds[rounds.get("updated").notna()] if "updated" in rounds else rounds.iloc[0:0]
        for row in done[done["round"] > self.shown].to_dict("records"):
            self.shown = int(row["round"])
            unseen = row.get("central-loss-1", row.get("unseen-loss-1"))
            extra = "" if unseen is None or unseen != unseen else f"  unseen@1 {unseen:.4f}"
            self.console.print(
                f"round {self.shown:>4}/{self.num_rounds}  meta-loss "
                f"{row.get('train-loss-before', float('nan')):.4f} -> "
                f"{row.get('train-loss-after', float('nan')):.4f}{extra}  "
                f"ok {int(row.get('ok', 0))}/{int(row.get('sampled', 0))}  "
                f"{time.monotonic() - self.started:.1f}s"
            )

    def finish(self, out_dir: Path, *, plot: bool) -> None:
        from fedmaml.rundir.report import evaluation_table, load_run, metric_name, report

        rounds, _, summary = load_run(out_dir)
        table = evaluation_table(rounds)
        metric = metric_name(rounds)
        rich_table = Table(
            title=f"held-out query {metric} after k adaptation steps (column @k)",
            caption="seen: training clients' held-out data; unseen: held-out clients; "
            "central: held-out tasks on the server",
        )
        for col in table.columns:
            rich_table.add_column(str(col), justify="right")
        for row in table.itertuples(index=False):
            rich_table.add_row(
                *("" if v != v else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
            )
        self.console.print(rich_table)
        if plot:
            written = report(out_dir)
            self.console.print("wrote " + ", ".join(str(p) for p in written))
        self.console.print(
            f"checkpoint: {out_dir / CHECKPOINT}; tables: {ROUNDS}, {CLIENTS}; "
            f"wall time {summary.get('wall_time_s', '?')} s"
        )
