"""What glibc's habit of handing freed memory back to the OS costs a conv-net meta-gradient.

Run from the repository root (Linux with glibc):

    .venv/bin/python benchmarks/allocator.py [--rounds 7] [--calls 15] [--threads 1]

A conv4 5-way 1-shot meta-batch (4 tasks, 15 queries per class) makes and frees activations of
a few MiB per layer. glibc serves blocks that large with fresh ``mmap`` pages (or trims them off
the top of the heap after use), so every call page-faults its activations in again. Setting

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296

before the process starts keeps freed memory in the heap for reuse, at the price of the
process holding on to its peak memory. This script times ``fedmaml.meta.meta_gradient``
(default call, maml and fomaml, 1 and 5 inner steps) in fresh subprocesses, alternately with
the default and the tuned environment, ``--rounds`` times; each subprocess reports the median
CPU time of ``--calls`` calls after a warm-up, and the table gives the median over rounds of
default / tuned (the speed-up), the paired ratios of subprocesses run back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

TUNED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
CONFIGS = [("maml", 1), ("fomaml", 1), ("maml", 5), ("fomaml", 5)]


def probe(calls: int) -> None:
    """In a fresh process: median CPU seconds per call of each configuration, as JSON. The
    workload and the call (fedmaml's default, with pre-adaptation metrics) are core_speed's."""
    from core_speed import make_workload, runner

    work = make_workload("conv4", 4)
    out = {}
    for algorithm, steps in CONFIGS:
        call = runner(work, "fedmaml-full", algorithm, steps)
        call()
        times = []
        for _ in range(calls):
            start = time.process_time()
            call()
            times.append(time.process_time() - start)
        out[f"{algorithm}-{steps}"] = statistics.median(times)
    print(json.dumps(out))


def run_probe(tuned: bool, args: argparse.Namespace) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    env.update(TUNED if tuned else {})
    command = [sys.executable, __file__, "--probe", "--calls", str(args.calls)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="subprocess pairs (default, tuned)")
    p.add_argument("--calls", type=int, default=15, help="timed calls per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args.calls)
        return
    ratios: dict[str, list[float]] = {}
    seconds: dict[str, dict[bool, list[float]]] = {}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {tuned: run_probe(tuned, args) for tuned in order}
        for key in results[False]:
            ratios.setdefault(key, []).append(results[False][key] / results[True][key])
            for tuned in (False, True):
                seconds.setdefault(key, {False: [], True: []})[tuned].append(results[tuned][key])
    print(
        f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
        f"conv4 5-way 1-shot, 4 tasks, median of {args.rounds} subprocess pairs\n"
    )
    print("| algorithm | inner steps | default ms | tuned ms | speed-up tuned/default |")
    print("|---|---:|---:|---:|---:|")
    for algorithm, steps in CONFIGS:
        key = f"{algorithm}-{steps}"
        default, tuned = (1000 * statistics.median(seconds[key][t]) for t in (False, True))
        ratio = statistics.median(ratios[key])
        print(f"| {algorithm} | {steps} | {default:.1f} | {tuned:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
