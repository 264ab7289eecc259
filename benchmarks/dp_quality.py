"""Sinusoid MAML under client-level differential privacy: held-out MSE against ε.

Run from the repository root:

    .venv/bin/python benchmarks/dp_quality.py                     # about 10 min, 1 core
    .venv/bin/python benchmarks/dp_quality.py --rounds 50 --noise 0 4   # smoke run

The rounds are fedmaml's own, in this process and without Flower's transport (a simulation of
250 clients for hundreds of rounds per noise level would take hours here): each round samples
m of the N training clients without replacement (as Flower does), each computes its
meta-gradient (``Problem.client_meta_gradient``) and clips Δ = −g to C on its "device"
(``fedmaml.federated.privacy.clip_to_norm``, the ClientApp's function), the server averages the
m updates, adds N(0, (σC/m)²) (``privacy.add_noise``, the ServerApp's function) and steps Adam
(``MetaOptimizer``); ε at δ = 1e-5 comes from the ServerApp's ledger (``PrivacyAccount``).
These are the functions the federated run calls; the tests check that the federated run
applies exactly this update (``tests/test_secure_aggregation.py``, ``test_federated_simulation``).

Defaults: N = 250 training clients, m = 25 per round (q = 0.1), 300 rounds, MAML with 1 inner
step (α = 0.01), Adam β = 0.003, C = 1 (the median meta-gradient norm at θ_0 is about 3.5);
σ ∈ {0 (clipping only), 1, 4, 8, 16}, plus the run without clipping or noise. Quality: the
mean query MSE of 100 held-out tasks before adaptation (@0) and after 1 and 5 steps (@1, @5),
each task's support and query fixed (seeded), θ after the last round.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import pandas as pd
import torch

from fedmaml.config import RunConfig
from fedmaml.federated.privacy import PrivacyAccount, add_noise, clip_to_norm
from fedmaml.meta.evaluate import mean_curve
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.problem import Problem
from fedmaml.rundir.report import markdown_table


def train(cfg: RunConfig, clip: bool, rounds: int) -> tuple[dict, float]:
    """θ after ``rounds`` private rounds, and ε spent (∞ without noise, nan without clipping)."""
    work = Problem.from_config(cfg)
    optimizer = MetaOptimizer(work.initial_params(), cfg.meta_optimizer, cfg.meta_lr)
    account = PrivacyAccount(cfg) if cfg.dp_noise > 0 else None
    sampler = random.Random(cfg.seed)
    m, n = cfg.clients_per_round, cfg.num_train_clients
    for meta_round in range(1, rounds + 1):
        theta = optimizer.current()
        updates = []
        for i in sampler.sample(range(n), m):
            g, _ = work.client_meta_gradient(theta, work.source.client(i), i, meta_round)
            update = {k: -v for k, v in g.items()}
            if clip:
                update, _ = clip_to_norm(update, cfg.dp_clip)
            updates.append(update)
        mean = {k: torch.stack([u[k] for u in updates]).mean(0).numpy() for k in theta}
        if cfg.dp_noise > 0:
            add_noise(mean, m, cfg)
            account.compose(m, n)  # type: ignore[union-attr]
        optimizer.step({k: -torch.from_numpy(v) for k, v in mean.items()})
    epsilon = account.epsilon if account else (float("inf") if clip else float("nan"))
    return optimizer.current(), epsilon


def heldout_mse(cfg: RunConfig, theta: dict, tasks: int) -> list[float]:
    work = Problem.from_config(cfg)
    curves = [
        work.evaluation_curve(theta, work.source.client(i, "heldout"), i)[0] for i in range(tasks)
    ]
    mean = mean_curve(curves)
    return [mean[k]["loss"] for k in (0, 1, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--clients", type=int, default=250)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 1.0, 4.0, 8.0, 16.0])
    parser.add_argument("--heldout", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = RunConfig(
        num_train_clients=args.clients,
        num_heldout_clients=args.heldout,
        fraction_train=args.per_round / args.clients,
        min_train_nodes=2,
        eval_steps=5,
    )
    settings = [("no clipping, no noise", base, False)]
    for sigma in args.noise:
        cfg = base.replace(dp_clip=args.clip, dp_noise=sigma)
        settings.append((f"C = {args.clip:g}, σ = {sigma:g}", cfg, True))
    rows = []
    for name, cfg, clip in settings:
        started = time.monotonic()
        theta, epsilon = train(cfg, clip, args.rounds)
        mse = heldout_mse(cfg, theta, args.heldout)
        rows.append(
            {
                "setting": name,
                "noise std of the mean": cfg.dp_noise * cfg.dp_clip / cfg.clients_per_round,
                "ε (δ = 1e-5)": epsilon,
                "held-out MSE @0": mse[0],
                "@1": mse[1],
                "@5": mse[2],
                "s": time.monotonic() - started,
            }
        )
        print(rows[-1], flush=True)
    print(
        f"{args.clients} training clients, {cfg.clients_per_round} per round, "
        f"{args.rounds} rounds, MAML 1 step, Adam β={base.meta_lr}, {args.heldout} held-out tasks"
    )
    print(markdown_table(pd.DataFrame(rows).replace([np.inf], float("inf"))))


if __name__ == "__main__":
    main()
