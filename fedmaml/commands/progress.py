"""What ``fedmaml simulate`` shows while it runs: its own start-up stages, fedmaml's messages from
the Flower processes as they come (stages, warnings, errors), a line per finished round read
from the run directory's ``rounds.csv``, and the closing results table."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedmaml.atomic import atomic_write
from fedmaml.config import RunConfig
from fedmaml.preflight import Ready
from fedmaml.rundir.names import CHECKPOINT, CLIENTS, FLOWER_LOG, ROUNDS, SUMMARY

#: a log line of fedmaml's own (stage, warning, error), from the Flower processes' output
_OURS = re.compile(r"^(INFO|WARNING|ERROR)\s*:\s+(fedmaml[: ].*)$")
_STYLE = {"INFO": "", "WARNING": "yellow", "ERROR": "bold red"}


class RoundProgress:
    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        # a log file or pipe gets lines wide enough for the results table
        wide = None if sys.stdout.isatty() else 140
        self.console = Console(highlight=False, width=wide)
        self.errors = Console(highlight=False, width=wide, stderr=True)
        self.out_dir = Path()
        self.num_rounds = 0
        self.shown = 0
        self.started = time.monotonic()
        self._mtime = 0.0

    def say(self, text: str) -> None:
        """A start-up stage of the command itself."""
        if not self.quiet:
            self.console.print(f"fedmaml: {escape(text)}", soft_wrap=True)

    def start(self, cfg: RunConfig, ready: Ready) -> None:
        """A new run: what it is, its preflight warnings, and where it resumes."""
        self.out_dir, self.num_rounds = Path(cfg.out_dir).resolve(), cfg.num_rounds
        self.shown, self._mtime, self.started = ready.round, 0.0, time.monotonic()
        for warning in ready.warnings:
            self.errors.print(
                f"fedmaml: warning: {escape(warning)}", style="yellow", soft_wrap=True
            )
        self.say(
            f"{cfg.algorithm} on {cfg.task}, {cfg.num_rounds} rounds, {cfg.num_train_clients} "
            f"training + {cfg.num_heldout_clients} held-out clients; run directory "
            f"{self.out_dir} (Flower's log: {FLOWER_LOG})"
        )
        if ready.resumed_from:
            self.say(
                f"resuming from {ready.resumed_from} at round {ready.round} of {cfg.num_rounds}"
            )
        self.say(
            f"starting Flower: a SuperLink, the simulation engine (Ray) and "
            f"{cfg.num_train_clients + cfg.num_heldout_clients} simulated clients"
        )

    def line(self, text: str) -> None:
        """One line of the Flower processes' output: fedmaml's own messages are shown (warnings
        and errors even with ``--quiet``), per-round lines come from ``rounds.csv`` instead."""
        match = _OURS.match(text)
        if not match or (match.group(2).startswith("fedmaml round") and match.group(1) == "INFO"):
            return
        level, message = match.groups()
        if level == "INFO" and self.quiet:
            return
        console = self.console if level == "INFO" else self.errors
        console.print(f"  {escape(message)}", style=_STYLE[level], soft_wrap=True)

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
            unseen = row.get("unseen-loss-1", row.get("central-loss-1"))
            extra = "" if unseen is None or unseen != unseen else f"  unseen@1 {unseen:.4f}"
            extra += _epsilon(row)
            self.console.print(
                f"round {self.shown:>4}/{self.num_rounds}  meta-loss "
                f"{row.get('train-loss-before', float('nan')):.4f} -> "
                f"{row.get('train-loss-after', float('nan')):.4f}{extra}  "
                f"ok {int(row.get('ok', 0))}/{int(row.get('sampled', 0))}  "
                f"{time.monotonic() - self.started:.1f}s"
            )

    def finish(self, out_dir: Path, seconds: float, *, plot: bool) -> None:
        """The run ended: record the whole wall time (start-up included) in its summary, print
        the results table, write the report."""
        from fedmaml.rundir.report import evaluation_table, load_run, metric_name, report

        self.poll()
        summary_path = out_dir / SUMMARY
        summary = json.loads(summary_path.read_text())
        summary["total_time_s"] = round(seconds, 2)
        atomic_write(summary_path, lambda f: json.dump(summary, f, indent=2, default=str))
        rounds, _, _ = load_run(out_dir)
        table = evaluation_table(rounds)
        rich_table = Table(
            title=f"held-out query {metric_name(rounds)} after k adaptation steps (column @k)",
            caption="seen: training clients' held-out data; unseen: clients never trained on",
        )
        for col in table.columns:
            rich_table.add_column(str(col), justify="right")
        for row in table.itertuples(index=False):
            rich_table.add_row(
                *("" if v != v else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
            )
        self.console.print(rich_table)
        if plot:
            written = ", ".join(str(p) for p in report(out_dir))
            self.console.print(f"wrote {written}", soft_wrap=True)
        self.console.print(
            f"checkpoint: {out_dir / CHECKPOINT}; tables: {ROUNDS}, {CLIENTS}; wall time "
            f"{seconds:.1f} s ({summary.get('wall_time_s', '?')} s in the ServerApp)"
        )

    def compare(self, out_dir: Path, run_dirs: list[Path], *, plot: bool) -> None:
        """Several runs on the same clients, side by side."""
        from fedmaml.rundir.report import compare

        table, written = compare(run_dirs, out_dir, plot=plot)
        rich_table = Table(title="comparison: unseen clients, the same episodes for every run")
        for col in table.columns:
            rich_table.add_column(str(col), justify="right")
        for row in table.itertuples(index=False):
            rich_table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        self.console.print(rich_table)
        self.console.print("wrote " + ", ".join(str(p) for p in written))


def _epsilon(row: dict) -> str:
    """The privacy spent so far, for a differentially private run's round line."""
    epsilon = row.get("epsilon")
    return "" if epsilon is None or epsilon != epsilon else f"  ε {epsilon:.3g}"
