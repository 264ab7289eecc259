"""What writing a run's tables costs after a round, as a run gets long: ``RunRecorder.flush``
(``clients.csv`` appended, ``rounds.csv`` rewritten) against rewriting both files whole after
every round (what fedmaml did before), in the same run.

    .venv/bin/python benchmarks/tables_flush.py [--rounds 1000] [--clients 100]

Each round records ``--clients`` client rows like a sinusoid run's (round, phase, node, client,
data identity, status, five metrics) and one round row, then flushes; the table gives the
median of the flushes around rounds 1, 10, 100, 300 and 1,000 (a window of 5 rounds) for both
ways, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmaml.atomic import atomic_write
from fedmaml.rundir.names import CLIENTS, ROUNDS
from fedmaml.rundir.recorder import RunRecorder


def rewrite_whole(recorder: RunRecorder) -> None:
    """Both tables rewritten whole and atomically (the way before the append)."""
    tables = {ROUNDS: recorder._rounds_csv, CLIENTS: recorder._clients_csv}
    rows = {
        ROUNDS: [(r, recorder.rounds[r]) for r in sorted(recorder.rounds)],
        CLIENTS: list(enumerate(recorder.clients)),
    }
    for name, table in tables.items():
        text = table.text(rows[name])
        atomic_write(recorder.out_dir / name, lambda f, text=text: f.write(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    marks = [m for m in (1, 10, 100, 300, 1000, 3000) if m <= args.rounds]
    times: dict[str, dict[int, list[float]]] = {"append": {}, "rewrite": {}}
    with tempfile.TemporaryDirectory(prefix="fedmaml-tables-") as tmp:
        for way, flush in (("append", RunRecorder.flush), ("rewrite", rewrite_whole)):
            recorder = RunRecorder(Path(tmp) / way, {})
            for r in range(1, args.rounds + 1):
                for u in range(args.clients):
                    recorder.client_row(
                        round=r,
                        phase="train",
                        node_id=123456789012345678 + u,
                        client=u,
                        client_id=f"sine-train-{u}",
                        status="ok",
                        **{"num-examples": 10, "loss-before": 1 / (r + u + 1)},
                        **{"loss-after": 1 / (r + u + 2), "num-episodes": 1.0},
                        **{"compute-s": 0.0025 + 1e-7 * u, "clipped": False},
                    )
                recorder.round_values(r, ok=args.clients, elapsed_s=0.1 * r)
                started = time.perf_counter()
                flush(recorder)
                took = time.perf_counter() - started
                for m in marks:
                    if max(1, m - 2) <= r <= m + 2:
                        times[way].setdefault(m, []).append(took)
    print("| after round | flush: append (ms) | rewrite whole (ms) | rewrite / append |")
    print("|---:|---:|---:|---:|")
    for m in marks:
        a, w = (statistics.median(times[k][m]) for k in ("append", "rewrite"))
        print(f"| {m:,} | {1e3 * a:.1f} | {1e3 * w:.1f} | {w / a:.1f}x |")
    print(f"\n{args.clients} client rows per round; median of the flushes in rounds m-2..m+2.")


if __name__ == "__main__":
    main()
