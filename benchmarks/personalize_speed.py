"""Users personalized per second: ``torch.vmap`` over users versus a per-user loop.

    .venv/bin/python benchmarks/personalize_speed.py [--users 1000] [--steps 5] [--threads 1]

1,000 unseen sinusoid users (K = 10 support points, 50 held-out points each) are personalized
from one sine_mlp checkpoint with ``personalize_many(batching="vmap")`` and
``personalize_many(batching="loop")`` (each user through ``adaptation_curve``); both include
splitting and checking every user's data. Runs are interleaved, after one warm-up call of each
(the first vmap call in a process also pays torch.func's one-time imports, reported apart);
the median of ``--repeats`` runs is reported, with the torch thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedmaml.checkpoint import Checkpoint
from fedmaml.meta import model_params
from fedmaml.models import build_model
from fedmaml.personalize import personalize_many
from fedmaml.tasks.sine import SineFamily


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--support", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt = Checkpoint(model_params(build_model("sine_mlp")), "sine_mlp")
    family = SineFamily(seed=0, num_heldout=args.users)
    users = [family.client(i, "heldout") for i in range(args.users)]

    def run(batching: str, subset: list) -> float:
        start = time.perf_counter()
        personalize_many(
            ckpt, subset, support_size=args.support, steps=args.steps, batching=batching
        )
        return time.perf_counter() - start

    first = run("vmap", users[:8])
    run("loop", users[:8])
    times: dict[str, list[float]] = {"vmap": [], "loop": []}
    for _ in range(args.repeats):
        for batching in times:
            times[batching].append(run(batching, users))
    a = personalize_many(ckpt, users[:50], support_size=args.support, steps=args.steps)
    b = personalize_many(
        ckpt, users[:50], support_size=args.support, steps=args.steps, batching="loop"
    )
    gap = float((a["metric_after"] - b["metric_after"]).abs().max())
    rate = {k: args.users / statistics.median(v) for k, v in times.items()}
    print(
        f"{args.users} sinusoid users, K={args.support}, {args.steps} steps, "
        f"torch threads={torch.get_num_threads()}, median of {args.repeats}"
    )
    print(f"  vmap: {rate['vmap']:8.0f} users/s   (first vmap call in the process: {first:.2f} s)")
    print(f"  loop: {rate['loop']:8.0f} users/s")
    print(f"  vmap / loop = {rate['vmap'] / rate['loop']:.1f}x   (max |MSE gap| {gap:.1e})")


if __name__ == "__main__":
    main()
