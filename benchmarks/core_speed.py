"""Meta-gradient speed and peak memory: ``fedmaml.meta.meta_gradient`` against a plain reference.

Run from the repository root:

    .venv/bin/python benchmarks/core_speed.py                 # full run (about 4-6 min, 2 cores)
    .venv/bin/python benchmarks/core_speed.py --quick         # smoke run (1-3 min)
    .venv/bin/python benchmarks/core_speed.py --out benchmarks/results.md

Workloads (MAML paper settings): the sinusoid MLP, K=10 support + 10 query, 25 tasks per
meta-batch, α=0.01; MAML's conv4 on 5-way 1-shot episodes with 15 queries per class (28x28,
synthetic pixels: speed does not depend on their values), α=0.4. Each is run second order (maml)
and first order (fomaml), with 1 and 5 inner steps.

Speed: each configuration runs in a fresh subprocess (the heap that earlier configurations
left behind moved conv4 ratios by up to 10 % when all ran in one process), in which the
implementations are timed alternately (A B, B A, A B, ...), so that load from other processes
hits them alike; the table gives median tasks per second (wall clock), and each ratio is the
median of the ratios of samples taken back to back, on the wall clock and on this process's
CPU time (``time.process_time``), with a 95% percentile-bootstrap
interval; "verdict" says "faster" or "slower" only when the whole interval lies above or below
1. With 1 torch thread the CPU-time ratio is the steadier one on a shared machine: time the
process spends descheduled while other jobs run does not count. Each sample runs enough
meta-batches to last about 30 ms. Before timing, both gradients are checked to agree, so the
benchmark never compares wrong code. Two like-for-like comparisons: the meta-gradient
(fedmaml with ``metrics_before=False``, which still returns the query loss and accuracy after
adaptation, against the bare reference), and fedmaml's default call, which also returns the
query loss and accuracy *before* adaptation (a no-grad forward of every query set at θ), against
the reference computing the same metrics the plain way (``with_metrics=True``; the two sets of
metrics are checked to agree). A last ratio prices those pre-adaptation metrics: fedmaml's
default call against the bare reference. A second table times fedmaml's two engines (vmap and loop)
against each other, with conv4 and the LEAF FEMNIST CNN on the same episodes: the numbers
behind ``prefers_vmap``.

Memory: every (configuration, implementation) runs in a fresh subprocess. After one warm-up
call, the process's resident-set high-water mark is reset (``/proc/self/clear_refs``) and one more
call is made; "peak extra" is the high-water mark minus the resident set before the call: what
the call itself adds to the process at its peak (tensors, autograd graph, allocator slack).
glibc's adaptive mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors go
back to the OS and are not silently reused from a warm heap.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_maml import reference_meta_gradient

from fedmaml.atomic import atomic_write
from fedmaml.meta import meta_gradient, prefers_vmap
from fedmaml.models import build_model
from fedmaml.tasks.episodes import EpisodeSpec, episode_generator, sample_episode
from fedmaml.tasks.sine import SineFamily

Pair = tuple[Tensor, Tensor]
Grads = dict[str, Tensor]
ALGORITHMS = ("maml", "fomaml")
SAMPLE_SECONDS = 0.03


@dataclass
class Problem:
    """A model, its loss and inner step size, and one meta-batch of (support, query) tasks."""

    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inner_lr: float
    tasks: list[tuple[Pair, Pair]]


def make_workload(name: str, n_tasks: int) -> Problem:
    """The same seeded meta-batch in every process (the memory probes rebuild it)."""
    torch.manual_seed(0)
    if name == "sine":
        family = SineFamily(seed=0, points=20, num_train=n_tasks)
        spec = EpisodeSpec(support=10, query=10)
        episodes = [
            sample_episode(family.client(i), spec, episode_generator(0, 1, i))
            for i in range(n_tasks)
        ]
        tasks = [(e.support, e.query) for e in episodes]
        return Problem(name, build_model("sine_mlp"), F.mse_loss, 0.01, tasks)
    model, lr = {
        "conv4": (lambda: build_model("conv4", ways=5), 0.4),
        "femnist_cnn": (lambda: build_model("femnist_cnn"), 0.05),
    }[name]
    g = torch.Generator().manual_seed(1)

    def images(per_class: int) -> Pair:
        y = torch.arange(5).repeat(per_class)
        return torch.rand(len(y), 1, 28, 28, generator=g), y

    return Problem(
        name, model(), F.cross_entropy, lr, [(images(1), images(15)) for _ in range(n_tasks)]
    )


def meta_call(
    work: Problem, impl: str, algorithm: str, steps: int, *, full: bool
) -> Callable[[], tuple[Grads, dict[str, float]]]:
    """A no-argument call returning (meta-gradient, metrics) of the whole meta-batch. ``impl`` is
    "reference" or a fedmaml ``batching`` ("auto", "loop", "vmap"); ``full``: with the
    pre-adaptation metrics (fedmaml's default), else without (the reference: no metrics)."""
    params = {k: v.detach() for k, v in work.model.named_parameters()}
    if impl == "reference":

        def reference() -> tuple[Grads, dict[str, float]]:
            out = reference_meta_gradient(
                work.model,
                params,
                work.tasks,
                loss_fn=work.loss_fn,
                inner_steps=steps,
                inner_lr=work.inner_lr,
                first_order=algorithm == "fomaml",
                with_metrics=full,
            )
            return out if full else (out, {})  # type: ignore[return-value]

        return reference
    return lambda: meta_gradient(
        work.model,
        params,
        [s for s, _ in work.tasks],
        [q for _, q in work.tasks],
        loss_fn=work.loss_fn,
        algorithm=algorithm,
        inner_steps=steps,
        inner_lr=work.inner_lr,
        batching=impl,
        metrics_before=full,
    )


def runner(work: Problem, impl: str, algorithm: str, steps: int) -> Callable[[], Grads]:
    """The meta-gradient alone: "reference" / "fedmaml" without pre-adaptation metrics,
    "reference-full" / "fedmaml-full" with them; "loop" / "vmap" force fedmaml's engine."""
    base, _, suffix = impl.partition("-")
    engine = {"fedmaml": "auto"}.get(base, base)
    call = meta_call(work, engine, algorithm, steps, full=suffix == "full")
    return lambda: call()[0]


def check_agree(a: Grads, b: Grads, what: str) -> None:
    """Both implementations give the same meta-gradient (tolerance scaled to its size)."""
    scale = max(float(v.abs().max()) for v in b.values())
    for k in b:
        try:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5 * scale)
        except AssertionError as exc:
            raise SystemExit(
                f"{what}: gradients differ in {k!r}; not timing wrong code\n{exc}"
            ) from None


@dataclass
class Samples:
    """Seconds per call, one entry per repeat: wall clock, and this process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def interleaved(calls: list[Callable[[], object]], repeats: int) -> list[Samples]:
    """``repeats`` samples of each callable, taken back to back in alternating order (A B, B A,
    A B, ...) so that neighbouring samples see the same load from other processes."""
    for call in calls:
        call()
    numbers = []
    for call in calls:
        start = time.perf_counter()
        call()
        numbers.append(max(1, math.ceil(SAMPLE_SECONDS / (time.perf_counter() - start))))
    samples = [Samples() for _ in calls]
    gc.disable()
    try:
        for r in range(repeats):
            for i in range(len(calls)) if r % 2 == 0 else reversed(range(len(calls))):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(numbers[i]):
                    calls[i]()
                samples[i].wall.append((time.perf_counter() - wall) / numbers[i])
                samples[i].cpu.append((time.process_time() - cpu) / numbers[i])
    finally:
        gc.enable()
    return samples


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repeats of num_r / den_r: each ratio compares samples taken back to back,
    which is steadier on a loaded machine than a ratio of medians."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def ratio_interval(num: list[float], den: list[float], level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval (2,000 resamples, seeded) of ``paired_ratio``."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    tail = (1 - level) / 2
    return medians[int(tail * len(medians))], medians[int((1 - tail) * len(medians)) - 1]


def speed_cell(num: list[float], den: list[float]) -> str:
    """The paired median ratio and its 95% bootstrap interval, e.g. "1.02x (0.97-1.06)"."""
    low, high = ratio_interval(num, den)
    return f"{paired_ratio(num, den):.2f}x ({low:.2f}-{high:.2f})"


def verdict(num: list[float], den: list[float]) -> str:
    """faster / slower when the whole 95% interval is above / below 1, else "same"."""
    low, high = ratio_interval(num, den)
    return "faster" if low > 1 else "slower" if high < 1 else "same"


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(workload: str, tasks: int, impl: str, algorithm: str, steps: int) -> None:
    """(Child process) print the peak extra resident memory of one call, in bytes."""
    call = runner(make_workload(workload, tasks), impl, algorithm, steps)
    call()
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    call()
    print(json.dumps({"peak_extra_bytes": (_status_kib("VmHWM") - before) * 1024}))


def peak_extra_mib(
    workload: str, tasks: int, impl: str, algorithm: str, steps: int, threads: int
) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    args = [workload, str(tasks), impl, algorithm, str(steps)]
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--memory-probe", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"memory probe {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"] / 2**20


# --------------------------------------------------------------------------- tables


def memory_ratio(a: float | None, b: float | None) -> str:
    """a / b, where both are at least 1 MiB (below that, RSS pages and noise dominate)."""
    if a is None or b is None:
        return "-"
    return f"{a / b:.2f}x" if min(a, b) >= 1 else "n/a"


def mib(x: float | None) -> str:
    return "-" if x is None else ("<1" if x < 1 else f"{x:.1f}")


def memory_pair(
    args: argparse.Namespace, name: str, n: int, impls: tuple[str, str], algorithm: str, steps: int
) -> list[float | None]:
    if not args.memory:
        return [None, None]
    return [peak_extra_mib(name, n, impl, algorithm, steps, args.threads) for impl in impls]


IMPLS = ("fedmaml", "reference", "fedmaml-full", "reference-full")


def speed_probe(workload: str, tasks: int, algorithm: str, steps: int, repeats: int) -> None:
    """(Child process) check that the implementations agree, time them interleaved and print
    the samples as JSON."""
    work = make_workload(workload, tasks)
    calls = [runner(work, impl, algorithm, steps) for impl in IMPLS]
    check_agree(calls[0](), calls[1](), f"{workload} {algorithm} K={steps}")
    check_same_metrics(work, algorithm, steps)
    samples = interleaved(calls, repeats)
    print(json.dumps({impl: vars(s) for impl, s in zip(IMPLS, samples, strict=True)}))


def speed_samples(
    args: argparse.Namespace, workload: str, tasks: int, algorithm: str, steps: int
) -> dict[str, Samples]:
    """``speed_probe`` in a fresh process: the heap that earlier configurations left behind
    moved conv4 ratios by up to 10 % when every configuration ran in one process."""
    probe = [workload, str(tasks), algorithm, str(steps)]
    options = ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run(
        [sys.executable, __file__, *options, "--speed-probe", *probe],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"speed probe {' '.join(probe)} failed:\n{out.stderr}{out.stdout}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {impl: Samples(**data[impl]) for impl in IMPLS}


def against_reference(args: argparse.Namespace, plan: list[tuple[str, int]]) -> list[str]:
    rows = [
        "| workload | algorithm | inner steps | tasks | fedmaml engine | fedmaml tasks/s "
        "| reference tasks/s | meta-gradient: fedmaml/ref (CPU time, 95% CI) | verdict "
        "| meta-gradient: fedmaml/ref (wall) "
        "| with pre-adaptation metrics, both: fedmaml/ref (CPU time, 95% CI) | verdict "
        "| fedmaml default call / bare reference (CPU time) "
        "| fedmaml peak MiB | reference peak MiB | memory fedmaml/ref |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, n in plan:
        engine = "vmap" if prefers_vmap(make_workload(name, 1).model) else "loop"
        for steps in args.steps:
            for algorithm in ALGORITHMS:
                got = speed_samples(args, name, n, algorithm, steps)
                s_ours, s_ref = got["fedmaml"], got["reference"]
                s_full, s_ref_full = got["fedmaml-full"], got["reference-full"]
                t_ours, t_ref = statistics.median(s_ours.wall), statistics.median(s_ref.wall)
                mem = memory_pair(args, name, n, ("fedmaml", "reference"), algorithm, steps)
                row = (
                    f"| {name} | {algorithm} | {steps} | {n} | {engine} | {n / t_ours:.1f} "
                    f"| {n / t_ref:.1f} | {speed_cell(s_ref.cpu, s_ours.cpu)} "
                    f"| {verdict(s_ref.cpu, s_ours.cpu)} "
                    f"| {paired_ratio(s_ref.wall, s_ours.wall):.2f}x "
                    f"| {speed_cell(s_ref_full.cpu, s_full.cpu)} "
                    f"| {verdict(s_ref_full.cpu, s_full.cpu)} "
                    f"| {paired_ratio(s_ref.cpu, s_full.cpu):.2f}x "
                    f"| {mib(mem[0])} | {mib(mem[1])} | {memory_ratio(mem[0], mem[1])} |"
                )
                print(row, flush=True)
                rows.append(row)
    return rows


def check_same_metrics(work: Problem, algorithm: str, steps: int) -> None:
    """fedmaml's default metrics equal the plain ones the full reference computes."""
    _, ours = meta_call(work, "auto", algorithm, steps, full=True)()
    _, plain = meta_call(work, "reference", algorithm, steps, full=True)()
    for key, value in plain.items():
        if not math.isclose(ours[key], value, rel_tol=1e-4, abs_tol=1e-6):
            raise SystemExit(f"{work.name} {algorithm} K={steps}: {key} {ours[key]} != {value}")


def engines(args: argparse.Namespace, plan: list[tuple[str, int]]) -> list[str]:
    rows = [
        "| model | algorithm | inner steps | tasks | loop tasks/s | vmap tasks/s "
        "| speed vmap/loop (wall) | speed vmap/loop (CPU time) | loop peak MiB | vmap peak MiB "
        "| auto picks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, n in plan:
        work = make_workload(name, n)
        for algorithm in ALGORITHMS:
            loop = runner(work, "loop", algorithm, 1)
            vmap = runner(work, "vmap", algorithm, 1)
            check_agree(vmap(), loop(), f"{name} {algorithm} vmap vs loop")
            s_loop, s_vmap = interleaved([loop, vmap], args.repeats)
            t_loop, t_vmap = statistics.median(s_loop.wall), statistics.median(s_vmap.wall)
            mem = memory_pair(args, name, n, ("loop", "vmap"), algorithm, 1)
            auto = "vmap" if prefers_vmap(work.model) else "loop"
            row = (
                f"| {name} | {algorithm} | 1 | {n} | {n / t_loop:.1f} | {n / t_vmap:.1f} "
                f"| {paired_ratio(s_loop.wall, s_vmap.wall):.2f}x "
                f"| {paired_ratio(s_loop.cpu, s_vmap.cpu):.2f}x | {mib(mem[0])} | {mib(mem[1])} "
                f"| {auto} |"
            )
            print(row, flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed samples per implementation")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--conv-tasks", type=int, default=4, help="conv meta-batch size")
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats, 1 inner step, 2 conv tasks, no FEMNIST CNN"
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip memory")
    parser.add_argument("--no-engines", dest="engines", action="store_false", help="skip vmap/loop")
    parser.add_argument("--out", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--memory-probe", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--speed-probe", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        workload, tasks, impl, algorithm, steps = args.memory_probe
        memory_probe(workload, int(tasks), impl, algorithm, int(steps))
        return
    if args.speed_probe:
        workload, tasks, algorithm, steps = args.speed_probe
        speed_probe(workload, int(tasks), algorithm, int(steps), args.repeats)
        return
    if args.repeats < 1 or args.threads < 1 or args.conv_tasks < 1:
        parser.error("--repeats, --threads and --conv-tasks must be >= 1")
    if args.memory and not Path("/proc/self/clear_refs").exists():
        print("no /proc/self/clear_refs (Linux only): memory is not measured")
        args.memory = False
    args.steps = (1,) if args.quick else (1, 5)
    if args.quick:
        args.repeats, args.conv_tasks = 3, 2
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"{os.cpu_count()} CPUs, median of {args.repeats} interleaved samples"
    )
    print(header, flush=True)
    lines = ["## fedmaml.meta.meta_gradient (batching='auto') vs the per-task reference", ""]
    lines += against_reference(args, [("sine", 25), ("conv4", args.conv_tasks)])
    if args.engines:
        plan = [("sine", 25), ("conv4", args.conv_tasks)]
        plan += [] if args.quick else [("femnist_cnn", args.conv_tasks)]
        lines += ["", "## vmap vs loop engine (fedmaml, 1 inner step)", ""]
        lines += engines(args, plan)
    text = "\n".join([header, "", *lines, ""])
    if args.out:
        atomic_write(args.out, lambda f: f.write(text))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
