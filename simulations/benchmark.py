"""Personalization benchmark: every method under one protocol, several seeds, per-user evidence.

    .venv/bin/python simulations/benchmark.py femnist_fedmeta --seeds 0 1 2
    .venv/bin/python simulations/benchmark.py femnist_fedmeta --table-only   # rebuild the table

For each method and seed, with the ready config ``simulations/<config>.toml`` (its clients split
into training, validation and test groups, each client into support and query sets, by
``fedmaml.tasks.protocol``):

1. meta-train in-process with ``Problem.train_centrally`` (the centralized reference, equal to
   the federated update: tests/test_federated_simulation.py): ``num-rounds`` steps of
   ``clients_per_round`` training clients, the same for every method;
2. choose the personalization recipe on the validation clients
   (``fedmaml.personalize.run_recipe.fit_run_recipe``; 0 steps when nothing beats the global
   model) and store it in the checkpoint;
3. personalize every test client with it (``test_users``): its metric before (the global model)
   and after, and after 0..eval-steps steps.

Methods: the config's meta-learning algorithms; ``fedavg`` gives two rows, FedAvg (the global
model, no fine-tuning) and FedAvg + fine-tuning tuned on the validation clients exactly like
the meta-learners' recipes; ``local`` trains each test client from scratch on its own support set
(the same random initialisation, full-batch gradient steps; steps and step size chosen on the
validation clients the same way, up to ``--local-steps``).

Each (method, seed) goes to ``runs/benchmarks/<config>/<method>/seed<s>/`` (checkpoint with its
recipe, recipe.csv, test_users.csv, clients_split.csv, history.csv, timing.json) and is skipped
when already done; ``--refit`` chooses the recipes again from the trained checkpoints. The
table (``simulations/results/<config>.md``, or ``<name>.md`` after ``--out .../<name>``)
pools the test users of all seeds: mean with a 95% t-interval, the mean of each seed,
percentiles over users, the share of users helped and hurt by personalization, the metric after
0..K steps, each method's paired difference against the best FedAvg row, and the learning curve
(``history.csv``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from fedmaml.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fedmaml.config import RunConfig, column_names  # noqa: E402
from fedmaml.personalize.recipe import Recipe, fit_recipe  # noqa: E402
from fedmaml.personalize.run_recipe import (  # noqa: E402
    fit_run_recipe,
    run_checkpoint,
    test_users,
    write_candidates,
    write_test_users,
)
from fedmaml.problem import Problem  # noqa: E402
from fedmaml.rundir.names import CHECKPOINT, RECIPE, SPLIT  # noqa: E402
from fedmaml.rundir.report import markdown_table  # noqa: E402
from fedmaml.rundir.user_report import (  # noqa: E402
    compare_users,
    paired_difference,
    user_summary,
)
from fedmaml.tasks.protocol import group_table  # noqa: E402

sys.path.insert(0, str(HERE))
from run import load_config  # noqa: E402

NAMES = {
    "maml": "MAML",
    "fomaml": "FOMAML",
    "metasgd": "Meta-SGD",
    "reptile": "Reptile",
    "anil": "ANIL",
    "perfedavg": "Per-FedAvg (HF)",
    "fedavg": "FedAvg + tuned fine-tuning",
    "fedavg-global": "FedAvg (no fine-tuning)",
    "local": "local only (from scratch)",
}
BASELINES = ("fedavg", "fedavg-global")
#: the global model's row has no steps curve of its own (its at_k are FedAvg's fine-tuning)
GLOBAL_STEPS = {"fedavg-global": (0,)}


def run_method(
    values: dict, method: str, seed: int, out: Path, local_steps: int, local_lrs: list[float]
) -> None:
    """Train (unless ``local``), fit the recipe on the validation clients, measure the test
    clients; write everything into ``out``."""
    algorithm = "fedavg" if method == "local" else method
    cfg = RunConfig.from_mapping(
        {**values, "algorithm": algorithm, "seed": seed, "out-dir": str(out)}
    )
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    started = time.monotonic()
    work = Problem.from_config(cfg)
    pd.DataFrame(group_table(work.source)).to_csv(out / SPLIT, index=False)
    tests = [work.source.client(i, "heldout") for i in range(work.source.num_clients("heldout"))]
    timing["setup_s"] = time.monotonic() - started
    if method == "local":
        params = work.initial_params()
        vals = [work.source.client(i, "val") for i in range(work.source.num_clients("val"))]
        t = time.monotonic()
        recipe = fit_recipe(
            run_checkpoint(work, params),
            vals,
            max_steps=local_steps,
            lrs=local_lrs,
            adapts=["all"],
            seed=seed,
        )
        timing["recipe_s"] = time.monotonic() - t
        horizon = local_steps
    elif (out / "history.csv").is_file() and (out / CHECKPOINT).is_file():
        # trained before (e.g. the recipe's grid changed): reuse θ, choose the recipe again
        ckpt = load_checkpoint(out / CHECKPOINT)
        trained = (ckpt.config.get("algorithm"), ckpt.config.get("num-rounds"))
        if trained != (algorithm, cfg.num_rounds):
            raise SystemExit(f"{out} holds another run's checkpoint; remove it")
        params = ckpt.params
        before = (
            json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else {}
        )
        timing["train_s"] = before.get("train_s", math.nan)
        t = time.monotonic()
        recipe = fit_run_recipe(work, params)
        timing["recipe_s"] = time.monotonic() - t
        horizon = cfg.eval_steps
    else:
        t = time.monotonic()
        result = work.train_centrally(cfg.num_rounds)
        timing["train_s"] = time.monotonic() - t
        params = result.params
        pd.DataFrame(result.history).to_csv(out / "history.csv", index=False)
        t = time.monotonic()
        recipe = fit_run_recipe(work, params)
        timing["recipe_s"] = time.monotonic() - t
        horizon = cfg.eval_steps
    assert recipe is not None, "the config needs validation clients (num-val-clients)"
    ckpt = run_checkpoint(work, params)
    ckpt.round = cfg.num_rounds if method != "local" else 0
    ckpt.recipe = recipe.to_dict()
    save_checkpoint(out / CHECKPOINT, ckpt)
    write_candidates(recipe, out / RECIPE)
    t = time.monotonic()
    df = test_users(ckpt, tests, max_steps=horizon, seed=seed, batching=cfg.batching)
    timing["test_s"] = time.monotonic() - t
    write_test_users(df, out)
    if method == "fedavg":  # the same checkpoint without fine-tuning: the global model's row
        write_global_row(df, out.parent.parent / "fedavg-global" / out.name)
    timing["total_s"] = time.monotonic() - started
    (out / "timing.json").write_text(
        json.dumps({**timing, "recipe": recipe.describe(), "rounds": cfg.num_rounds}, indent=1)
    )
    print(f"{method} seed {seed}: {recipe.describe()}; {timing}", flush=True)


def write_global_row(df: pd.DataFrame, out: Path) -> None:
    """The test table of the recipe "0 steps" from a measured one (its k = 0 column)."""
    out.mkdir(parents=True, exist_ok=True)
    zero = df.assign(metric_after=df["metric_before"], gain=0.0)
    write_test_users(zero, out)
    (out / "timing.json").write_text(json.dumps({"recipe": Recipe(0, None, "all").describe()}))


#: windows of the learning curve (each a tenth of the run's rounds)
CURVE_WINDOWS = 10


def learning_curve(base: Path, methods: list[str], seeds: list[int]) -> str:
    """The training clients' query accuracy after adaptation (``history.csv``: 4 clients per
    round) as the run went on: its mean over each tenth of the rounds, pooled over the seeds;
    the column is the window's last round. A markdown table ("" when no run has a history)."""
    rows = []
    for method in methods:
        frames = [
            pd.read_csv(path)
            for s in seeds
            if (path := base / method / f"seed{s}" / "history.csv").is_file()
        ]
        if not frames:
            continue
        history = pd.concat(frames)
        rounds = int(history["step"].max())
        window = max(1, math.ceil(rounds / CURVE_WINDOWS))
        ends = range(window, rounds + window, window)
        means = {
            min(end, rounds): history.loc[
                (history["step"] > end - window) & (history["step"] <= end), "accuracy_after"
            ].mean()
            for end in ends
        }
        rows.append({"method": NAMES.get(method, method), "runs": len(frames), **means})
    if not rows:
        return ""
    df = pd.DataFrame(rows)
    df.columns = [f"≤ round {c}" if isinstance(c, int) else c for c in df.columns]
    return (
        "Learning curve: the training clients' query accuracy after adaptation during training "
        f"(history.csv), mean over each tenth of the rounds, pooled over seeds.\n\n"
        f"{markdown_table(df.round(4))}\n"
    )


def table(base: Path, methods: list[str], seeds: list[int]) -> tuple[pd.DataFrame, str]:
    """The results table and the paired comparisons, in markdown."""
    runs = {
        m: [base / m / f"seed{s}" for s in seeds]
        for m in [*methods, *(["fedavg-global"] if "fedavg" in methods else [])]
    }
    runs = {m: [d for d in dirs if (d / "test_users.csv").is_file()] for m, dirs in runs.items()}
    runs = {m: dirs for m, dirs in runs.items() if dirs}
    rows = [
        {"method": NAMES.get(m, m), **user_summary(dirs, steps=GLOBAL_STEPS.get(m, ()))}
        for m, dirs in runs.items()
    ]
    df = pd.DataFrame(rows)
    lines = []
    baselines = [m for m in BASELINES if m in runs]
    if baselines:
        best = max(baselines, key=lambda m: user_summary(runs[m])["mean"])
        for m, dirs in runs.items():
            if m in BASELINES:
                continue
            diff = paired_difference(dirs, runs[best])
            lines.append(
                f"| {NAMES.get(m, m)} − {NAMES[best]} | {diff['mean']:+.4f} | "
                f"[{diff['low']:+.4f}, {diff['high']:+.4f}] | {diff['pairs']} | "
                f"{diff['better']:.0%} |"
            )
    md = ""
    if lines:
        md = (
            "| paired difference (same test users, same seeds) | mean | 95% interval | pairs | "
            "users better |\n|---|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n"
        )
    return df, md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a simulations/*.toml name, e.g. femnist_fedmeta")
    p.add_argument("--methods", nargs="+", default=["maml", "fomaml", "metasgd", "reptile",
                                                     "fedavg", "local"])  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local-steps", type=int, default=30, help="most steps of local training")
    p.add_argument(
        "--local-lrs", type=column_names, default=["0.1", "0.3"], help="local training step sizes"
    )
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the runs")
    p.add_argument(
        "--refit",
        action="store_true",
        help="choose the recipes again (e.g. after changing recipe-lrs) from the trained "
        "checkpoints, then measure the test users again; runs not trained yet are trained",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="runs folder (default runs/benchmarks/CONFIG); its name names the results file",
    )
    p.add_argument("--results", type=Path, help="results folder (default simulations/results)")
    args = p.parse_args()
    torch.set_num_threads(1)
    values = load_config(args.config, args.overrides)
    base = args.out or ROOT / "runs" / "benchmarks" / args.config
    stem = base.name  # the results' name: the config's, or that of the --out folder
    if not args.table_only:
        for seed in args.seeds:
            for method in args.methods:
                out = base / method / f"seed{seed}"
                refit = args.refit and method != "local"
                if (out / "test_users.csv").is_file() and not refit:
                    continue
                lrs = [float(r) for r in args.local_lrs]
                run_method(values, method, seed, out, args.local_steps, lrs)
    df, paired = table(base, args.methods, args.seeds)
    done = {
        m: [base / m / f"seed{s}" for s in args.seeds
            if (base / m / f"seed{s}" / "test_users.csv").is_file()]
        for m in [*args.methods, "fedavg-global"]
    }  # fmt: skip
    figures = compare_users(
        {NAMES.get(m, m): dirs for m, dirs in done.items() if dirs and m not in GLOBAL_STEPS},
        args.results or HERE / "results",
        stem=stem,
    )
    command = " ".join(
        [".venv/bin/python simulations/benchmark.py", args.config, "--seeds",
         *map(str, args.seeds), "--methods", *args.methods, "--local-steps",
         str(args.local_steps), "--local-lrs", ",".join(args.local_lrs),
         *(f"--set {o}" for o in args.overrides),
         *([f"--out {args.out}"] if args.out else [])]
    )  # fmt: skip
    cfg = RunConfig.from_mapping({**values, "out-dir": str(base)})
    md = (
        f"# {stem}: personalization on test users\n\n"
        f"{len(args.seeds)} seeds x {cfg.num_heldout_clients} test users; "
        f"{cfg.num_train_clients} training, {cfg.num_val_clients} validation clients; "
        f"{cfg.num_rounds} rounds of {cfg.clients_per_round} clients, inner-steps "
        f"{cfg.inner_steps}, inner-lr {cfg.inner_lr}, {cfg.meta_optimizer} {cfg.meta_lr}; "
        f"recipe on the validation clients: steps 0..{cfg.eval_steps}, lr in "
        f"{cfg.recipe_lr_list}, adapt {cfg.recipe_adapt_list}.\n\n"
        f"{markdown_table(df)}\n\n{paired}\n"
        + (f"{curve}\n" if (curve := learning_curve(base, args.methods, args.seeds)) else "")
        + "".join(f"![{f.stem}]({f.name})\n" for f in figures)
        + f"\nReproduce (2 shared CPU cores, torch 2.13 CPU, 1 thread): `{command}`\n"
    )
    notes = HERE / f"{stem}.notes.md"  # hand-written reading of the numbers, if any
    if notes.is_file():
        md += "\n" + notes.read_text()
    (args.results or HERE / "results").joinpath(f"{stem}.md").write_text(md)
    print(md)
    if not math.isfinite(float(df["mean"].iloc[0])):
        sys.exit(1)


if __name__ == "__main__":
    main()
