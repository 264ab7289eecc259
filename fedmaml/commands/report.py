"""``fedmaml report RUN_DIR [RUN_DIR ...]``: plots and a markdown summary of a finished (or
running) run; with several runs, also the runs side by side: the per-user gain from
personalization and the test users' metric after 0..K steps (from each run's
``test_users.csv``), and the learning curves when every run has them.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="plots and a markdown summary of one or several run directories",
        description=__doc__,
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, nargs="+", help="directory of a fedmaml run")
    p.add_argument(
        "--out",
        type=Path,
        help="several runs: where the comparison goes (default: the runs' common parent)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedmaml.rundir.names import ROUNDS, TEST_USERS
    from fedmaml.rundir.report import compare_runs, report

    several = len(args.run_dir) > 1
    for run_dir in args.run_dir:
        if several and not (run_dir / ROUNDS).is_file() and (run_dir / TEST_USERS).is_file():
            continue  # only test users (e.g. a benchmark's run): compared below
        for path in report(run_dir):
            print(path)
    if len(args.run_dir) > 1:
        for path in compare_runs(args.run_dir, args.out):
            print(path)
    return 0
