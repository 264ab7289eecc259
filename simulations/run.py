"""Run one ready simulation config for each algorithm and write its results table.

    .venv/bin/python simulations/run.py sine
    .venv/bin/python simulations/run.py omniglot_5way_1shot --algorithms maml fedavg \
        --set num-rounds=100

Each algorithm runs as a real Flower simulation (``fedmaml.federated.simulation.simulate``)
into ``runs/simulations/<config>/<algorithm>/``; the table in
``simulations/results/<config>.md`` reports the personalized metric (after eval-steps adaptation
steps) at the final round over every evaluated client, seen and unseen, with the budget and wall
time, and the exact command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import pandas as pd

from fedmaml.commands.simulate import parse_value, tomllib
from fedmaml.config import RunConfig
from fedmaml.federated.simulation import simulate
from fedmaml.meta.algorithms import ALGORITHMS
from fedmaml.rundir.report import markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_config(name: str, overrides: list[str]) -> dict:
    path = HERE / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in HERE.glob("*.toml")))
        sys.exit(f"no simulation config {name!r}; known: {known}")
    values = tomllib.loads(path.read_text())
    if values.get("data-path"):
        values["data-path"] = str((ROOT / values["data-path"]).resolve())
    for item in overrides:
        key, _, value = item.partition("=")
        values[key.strip()] = parse_value(value.strip())
    return values


def personalized(run_dir: Path, trained_steps: int) -> dict[str, float | str]:
    """Mean (and spread over clients) of the metric at the final evaluation: before adaptation,
    after the number of steps used in training, and after all eval-steps K. Clients whose
    evaluation failed (e.g. a NaN after K steps) are counted apart."""
    clients = pd.read_csv(run_dir / "clients.csv")
    ev = clients[clients["phase"] == "evaluate"]
    ev = ev[ev["round"] == ev["round"].max()]
    ok = ev[ev["status"] == "ok"]
    metric = "accuracy" if "accuracy-0" in ok else "loss"
    k = max(int(m.group(1)) for c in ok.columns if (m := re.match(rf"{metric}-(\d+)$", c)))
    out: dict[str, float | str] = {"metric": metric, "k": k}
    for group, heldout in (("seen", 0), ("unseen", 1)):
        part = ok[ok["heldout"] == heldout]
        out[f"{group} @0"] = part[f"{metric}-0"].mean()
        out[f"{group} @{trained_steps}"] = part[f"{metric}-{trained_steps}"].mean()
        out[f"{group} @K"] = part[f"{metric}-{k}"].mean()
        out[f"{group} sd@K"] = part[f"{metric}-{k}"].std()
        out[f"{group} clients"] = len(part)
    out["failed evals"] = int((ev["status"] != "ok").sum())
    return out


def earlier_rows(path: Path, skip: list[str]) -> list[dict]:
    """The rows of an earlier results table for the algorithms not run this time, so that a run
    of some algorithms adds to the table instead of replacing it."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    if len(lines) < 2:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = dict(zip(header, (parse_value(c) for c in cells), strict=True))
        if row["algorithm"] not in skip:
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a simulations/*.toml name, e.g. sine")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="rebuild the table from the run directories of an earlier call",
    )
    args = p.parse_args()
    values = load_config(args.config, args.overrides)
    rows = []
    for algorithm in args.algorithms:
        out = ROOT / "runs" / "simulations" / args.config / algorithm
        cfg = RunConfig.from_mapping(
            {**values, "algorithm": algorithm, "out-dir": str(out), "overwrite": True}
        )
        started = time.monotonic()
        if not args.table_only:
            simulate(cfg)
        summary = json.loads((out / "summary.json").read_text())
        wall = summary["wall_time_s"] if args.table_only else time.monotonic() - started
        per_round = cfg.clients_per_round
        result = personalized(out, cfg.inner_steps)
        rows.append(
            {
                "algorithm": algorithm,
                "rounds": cfg.num_rounds,
                "clients/round": per_round,
                "tasks": cfg.num_rounds * per_round * cfg.local_episodes,
                **{k: v for k, v in result.items() if k not in ("metric", "k")},
                "wall s": round(wall),
            }
        )
        print(rows[-1], flush=True)
    results = HERE / "results"
    earlier = earlier_rows(results / f"{args.config}.md", skip=args.algorithms)
    table = pd.DataFrame([*earlier, *rows])
    command = " ".join(
        [
            ".venv/bin/python simulations/run.py",
            args.config,
            *(f"--set {o}" for o in args.overrides),
            "--algorithms",
            *table["algorithm"],
        ]
    )
    md = (
        f"# {args.config}\n\nPersonalized {result['metric']} at the final round, mean over "
        f"clients, after k adaptation steps on each client's support data (@0: the global "
        f"model; @{cfg.inner_steps}: the steps used in training; @K: K={result['k']} steps; "
        f"sd@K: spread over clients). Seen: the training clients' held-out data; unseen: "
        f"clients never trained on. tasks = rounds x clients/round x local episodes; "
        f"wall s: the simulation's wall time on 2 shared CPU cores.\n\n"
        f"{markdown_table(table)}\n\nReproduce (2 shared CPU cores, torch 2.13 CPU): "
        f"`{command}`\n"
    )
    results.mkdir(exist_ok=True)
    (results / f"{args.config}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
