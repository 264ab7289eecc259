"""What secure aggregation (SecAgg+) costs a round: the same sinusoid MAML rounds in real Flower
simulations, without and with ``secure-aggregation``, at 10 and 50 clients per round.

Run from the repository root:

    .venv/bin/python benchmarks/secagg_overhead.py                      # about 10 min, 2 cores
    .venv/bin/python benchmarks/secagg_overhead.py --clients 10 --rounds 4   # smoke run

Each run: N training clients, all sampled every round (fraction-train 1), no held-out client,
MAML with 1 inner step, SGD, every update clipped to norm 10 on its device; evaluation only at
round 0 and at the last round. A round's time is the gap between the ends of consecutive
training rounds 2..R (``elapsed_s`` in rounds.csv), so start-up, round 1 (which also asks every
node who it is) and the last round's evaluation fall outside it. Modes:

* **plain**: the server receives each client's update (the per-reply checks, FedAvg);
* **secagg, all**: SecAgg+ with every sampled client in every client's neighbourhood
  (``secagg-shares`` = 0: SecAgg), threshold a majority;
* **secagg, k=5**: SecAgg+ with neighbourhoods of 5 (threshold 3): each client shares keys,
  masks and answers for 4 others only.

A SecAgg+ round is four round trips instead of one (setup, share-keys, collect-masked, unmask)
plus the key agreements, Shamir shares and mask expansions on the clients and the server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedmaml.config import RunConfig
from fedmaml.federated.simulation import SimulationOptions, simulate
from fedmaml.rundir.report import markdown_table

MODES = {
    "plain": {},
    "secagg, all": {"secure_aggregation": True},
    "secagg, k=5": {"secure_aggregation": True, "secagg_shares": 5},
}


def round_times(out: Path) -> list[float]:
    elapsed = pd.read_csv(out / "rounds.csv").set_index("round")["elapsed_s"].dropna()
    return [b - a for a, b in zip(elapsed.iloc[:-1], elapsed.iloc[1:], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmaml-secagg-bench-") as tmp:
        for n in args.clients:
            for mode in args.modes:
                changes = MODES[mode]
                if changes.get("secagg_shares", 0) >= n:
                    continue
                cfg = RunConfig(
                    num_train_clients=n,
                    num_heldout_clients=0,
                    fraction_train=1.0,
                    min_train_nodes=2,
                    num_rounds=args.rounds,
                    eval_every=10**6,
                    meta_optimizer="sgd",
                    meta_lr=0.1,
                    max_update_norm=10.0,
                    round_timeout=600.0,
                    out_dir=str(Path(tmp) / f"{n}-{mode}"),
                    **changes,
                )
                load = os.getloadavg()[0]
                started = time.monotonic()
                out = simulate(cfg, SimulationOptions(timeout=3600))
                times = round_times(out)
                rows.append(
                    {
                        "clients/round": n,
                        "mode": mode,
                        "round s (mean)": statistics.mean(times),
                        "round s (min)": min(times),
                        "rounds timed": len(times),
                        "run s": time.monotonic() - started,
                        "load (1 min)": load,
                    }
                )
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    plain = table[table["mode"] == "plain"].set_index("clients/round")["round s (mean)"]
    table["x plain"] = [
        r["round s (mean)"] / plain.get(r["clients/round"], float("nan"))
        for _, r in table.iterrows()
    ]
    text = markdown_table(table.round(2))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
