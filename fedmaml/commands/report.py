"""``fedmaml report RUN_DIR``: plots and a markdown summary of a finished (or running) run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="plots and a markdown summary of a run directory", description=__doc__
    )
    p.add_argument("run_dir", type=Path, help="directory of a fedmaml run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedmaml.rundir.report import report

    for path in report(args.run_dir):
        print(path)
    return 0
