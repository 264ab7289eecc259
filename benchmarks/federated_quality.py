"""Quality of federated MAML on held-out sinusoid tasks, against centralized MAML and FedAvg.

Three runs with the same budget (rounds x tasks per round), the same 100 training tasks and the
same held-out tasks, all evaluated by the one evaluation function the server uses
(``Problem.evaluation_curve``: support from the task's training pool, query from its held-out
pool, K=10, 1 adaptation step with α):

* centralized MAML (``fedmaml.centralized.meta_train``, one process);
* federated MAML (a real Flower simulation: ServerApp + ClientApps on Ray);
* federated FedAvg + the same fine-tuning (``algorithm=fedavg``: clients run local SGD on all
  their data, the server applies the same optimizer to the averaged update).

    python benchmarks/federated_quality.py --rounds 3000 --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.federated.simulation import simulate
from fedmaml.problem import Problem
from fedmaml.rundir.names import CHECKPOINT


def heldout_mse(cfg: RunConfig, params: dict[str, torch.Tensor], n: int) -> list[float]:
    work = Problem.from_config(cfg)
    return [
        work.evaluation_curve(params, work.source.client(i, "heldout"), i)[0][1]["loss"]
        for i in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--meta-lr", type=float, default=0.003)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = p.parse_args()
    torch.set_num_threads(1)
    base = RunConfig(
        num_rounds=args.rounds,
        num_train_clients=args.clients,
        num_heldout_clients=args.heldout,
        fraction_train=args.per_round / args.clients,
        meta_lr=args.meta_lr,
        eval_steps=1,
        eval_every=max(args.rounds // 4, 1),
        eval_clients=min(args.heldout, 20),
    )
    rows = []

    t = time.monotonic()
    central = Problem.from_config(base).train_centrally(args.rounds)
    rows.append(
        ("centralized MAML", heldout_mse(base, central.params, args.heldout), time.monotonic() - t)
    )
    for name, algorithm in (
        ("federated MAML (Flower)", "maml"),
        ("federated FedAvg + fine-tune", "fedavg"),
    ):
        cfg = base.replace(algorithm=algorithm, out_dir=str(args.out / algorithm))
        t = time.monotonic()
        out = simulate(cfg)
        params = load_checkpoint(out / CHECKPOINT).params
        rows.append((name, heldout_mse(cfg, params, args.heldout), time.monotonic() - t))

    central_mse = statistics.mean(rows[0][1])
    fedavg_mse = statistics.mean(rows[2][1])
    print(
        f"\nheld-out sinusoid tasks: {args.heldout}, K=10, 1 step (α={base.inner_lr}); "
        f"{args.rounds} rounds x {args.per_round} of {args.clients} tasks; Adam β={args.meta_lr}"
    )
    print("| run | post-adaptation MSE (mean ± sd) | vs centralized | FedAvg / this | wall s |")
    print("|---|---|---|---|---|")
    results = []
    for name, mses, wall in rows:
        mean, sd = statistics.mean(mses), statistics.stdev(mses)
        print(
            f"| {name} | {mean:.3f} ± {sd:.3f} | {mean / central_mse:.3f} | "
            f"{fedavg_mse / mean:.2f} | {wall:.0f} |"
        )
        results.append({"run": name, "mse": mean, "sd": sd, "wall_s": wall})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
