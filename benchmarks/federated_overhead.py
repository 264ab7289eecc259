"""What Flower and fedmaml's federated layer cost per round, on the sinusoid MAML workload.

Run from the repository root:

    .venv/bin/python benchmarks/federated_overhead.py            # default: about 4 min, 2 cores
    .venv/bin/python benchmarks/federated_overhead.py --rounds 10 --repeats 1   # smoke run
    .venv/bin/python benchmarks/federated_overhead.py --out results.md

Three ways of doing the same rounds: 100 training + 20 held-out clients (120 nodes), 10
training clients sampled per round, MAML with 1 inner step, Adam:

* **in-process**: the round's 10 sampled clients' meta-gradients computed one after the other
  in this process (``Problem.client_meta_gradient``), averaged, one ``MetaOptimizer`` step.
* **fedmaml**: a real Flower simulation of fedmaml's ServerApp and ClientApp, launched by
  ``fedmaml.federated.simulation.simulate`` (its own SuperLink, Ray backend, 1 CPU per client:
  two Ray actors on two cores). Evaluation is off for the timed rounds (``eval-every`` = 10^6):
  the initial central evaluation (round 0) and the final round's evaluation fall outside them.
* **trivial**: ``benchmarks/trivial_app``, a Flower app with FedAvg whose clients send back the
  arrays they receive (the sinusoid MLP's shapes, 1,761 floats), launched by the same
  ``simulate`` with the same nodes, clients per round and rounds.

Per round (simulations): the gaps between the ends of consecutive training rounds 1..R
(fedmaml: ``elapsed_s`` in rounds.csv, stamped when a round's aggregation is done; trivial:
wall-clock stamps its ServerApp writes after each round). A gap holds one whole round: sampling,
sending, the clients' work, Flower's polling, aggregation, the meta-update, the tables and the
checkpoint. Flower's simulation polls for messages every 0.1 s (``InMemoryGrid.pull_interval``
on the server, the same period in the node-side dispatcher), so round times come in steps of
about 0.1 s: a round whose last reply misses the server's first pull takes about twice as long.
The median of such a two-valued distribution jumps from one value to the other, so the
comparison uses the **mean** (the expected round time) and shows the median and the share of
"slow" rounds (over 1.5 × the run's fastest) beside it.

Start-up: from calling ``simulate`` to the end of round 1 (SuperLink, ``flwr run``, packaging,
Ray and its actors, imports, workload, fedmaml's round-0 central evaluation and its one-off
``describe`` query to every node). fedmaml's round-1 end in wall-clock time is the run's start
(``summary.json``'s modification time minus its ``wall_time_s``) plus round 1's ``elapsed_s``.
After the last round: the final evaluation (fedmaml), the summary and stopping every process.

fedmaml's overhead beyond Flower's = (fedmaml per round − trivial per round) / trivial per
round; the target is ≤ 10 %. Runs alternate (fedmaml, trivial, trivial, fedmaml, ...) so load
from other processes hits both alike; the 1-minute load average is recorded before each.

**Where the time goes** (in this process, no Flower runtime): per round, the ServerApp's work
after the replies arrive — ``MetaStrategy.aggregate_train`` on 10 real replies (reply checks,
Flower's FedAvg, the meta-update, rounds.csv/clients.csv rewritten) and the checkpoint hand-off
to the background writer — against FedAvg's ``aggregate_train`` alone on the trivial app's
replies; per call, fedmaml's ClientApp ``train`` against the trivial app's.

Threads: ``OMP_NUM_THREADS=1`` (inherited by the SuperLink, the simulation and Ray's actors) and
``torch.set_num_threads(1)`` here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "trivial_app"))

from trivialapp import client_app as trivial_client

from fedmaml.checkpoint import Checkpoint, CheckpointSaver, save_checkpoint
from fedmaml.config import RunConfig
from fedmaml.federated import client_app as fedmaml_client
from fedmaml.federated.records import to_record
from fedmaml.federated.server_app import build_aggregator
from fedmaml.federated.simulation import SimulationOptions, simulate
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.problem import Problem
from fedmaml.rundir.names import CHECKPOINT, ROUNDS, SUMMARY
from fedmaml.rundir.recorder import RunRecorder

TRIVIAL_APP = Path(__file__).resolve().parent / "trivial_app"
NO_EVAL = 10**6
SLOW = 1.5


@dataclass
class Timing:
    """One run: the wall time of each round, time to the end of round 1, time after the last."""

    name: str
    rounds: list[float]
    startup: float
    after_last: float
    total: float
    load: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rounds)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    @property
    def slow_share(self) -> float:
        fastest = min(self.rounds)
        return sum(r > SLOW * fastest for r in self.rounds) / len(self.rounds)


def load_average() -> float:
    return os.getloadavg()[0]


def bench_config(args: argparse.Namespace, out_dir: Path) -> RunConfig:
    return RunConfig(
        num_rounds=args.rounds,
        num_train_clients=args.clients,
        num_heldout_clients=args.heldout,
        fraction_train=args.per_round / args.clients,
        eval_every=NO_EVAL,
        device="cpu",
        out_dir=str(out_dir),
    )


def in_process(cfg: RunConfig) -> Timing:
    """The rounds' computation without Flower: sampled clients' meta-gradients, mean, step."""
    load = load_average()
    start = time.perf_counter()
    work = Problem.from_config(cfg)
    clients = [work.source.client(i, "train") for i in range(cfg.num_train_clients)]
    optimizer = MetaOptimizer(work.initial_params(), cfg.meta_optimizer, cfg.meta_lr)
    params = optimizer.current()
    rng = random.Random(cfg.seed)
    setup = time.perf_counter() - start
    times = []
    for meta_round in range(1, cfg.num_rounds + 1):
        t = time.perf_counter()
        sampled = rng.sample(range(cfg.num_train_clients), cfg.clients_per_round)
        grads = [work.client_meta_gradient(params, clients[i], i, meta_round)[0] for i in sampled]
        mean = {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}
        params = optimizer.step(mean)
        times.append(time.perf_counter() - t)
    return Timing("in-process", times, setup + times[0], 0.0, time.perf_counter() - start, load)


def run_fedmaml(cfg: RunConfig) -> Timing:
    load = load_average()
    start = time.time()
    out = simulate(cfg, SimulationOptions(timeout=1800))
    done = time.time()
    rounds = pd.read_csv(out / ROUNDS).set_index("round")
    ends = [float(rounds.loc[r, "elapsed_s"]) for r in range(1, cfg.num_rounds + 1)]
    summary = out / SUMMARY
    run_start = summary.stat().st_mtime - json.loads(summary.read_text())["wall_time_s"]
    return Timing(
        "fedmaml",
        [b - a for a, b in itertools.pairwise(ends)],
        run_start + ends[0] - start,
        done - (run_start + ends[-1]),
        done - start,
        load,
    )


def run_trivial(cfg: RunConfig, array_shapes: str) -> Timing:
    load = load_average()
    stamps = Path(cfg.out_dir).resolve() / "round_ends.txt"
    nodes = cfg.num_train_clients + cfg.num_heldout_clients
    per_round = cfg.clients_per_round
    app_config = {  # FedAvg samples max(int(nodes × fraction), min-train-nodes) = per_round
        "num-rounds": cfg.num_rounds,
        "fraction-train": per_round / nodes,
        "min-train-nodes": per_round,
        "array-shapes": array_shapes,
        "timings-path": str(stamps),
    }
    start = time.time()
    simulate(cfg, SimulationOptions(timeout=1800), app_dir=TRIVIAL_APP, app_config=app_config)
    done = time.time()
    stamp = dict(line.split() for line in stamps.read_text().splitlines())
    ends = [float(stamp[str(r)]) for r in range(1, cfg.num_rounds + 1)]
    return Timing(
        "trivial",
        [b - a for a, b in itertools.pairwise(ends)],
        ends[0] - start,
        done - ends[-1],
        done - start,
        load,
    )


def shapes_of(cfg: RunConfig) -> str:
    """fedmaml's meta-parameter shapes in the trivial app's ``array-shapes`` form."""
    params = Problem.from_config(cfg).initial_params()
    return ",".join("x".join(str(d) for d in p.shape) for p in params.values())


# ---------------------------------------------------------------------- where the time goes


def median_ms(fn: Callable[[int], object], n: int, before: Callable[[], object] = list) -> float:
    """Median milliseconds of ``fn(i)``, i = 0..n-1, each after an untimed ``before()``."""
    times = []
    for i in range(n):
        before()
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def breakdown(cfg: RunConfig, rounds: int) -> list[tuple[str, float]]:
    """Median ms of the server's per-round work and of one ClientApp ``train`` call."""
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are made inside a ServerApp process, whose run and node ids Flower sets.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round log lines here
    work = Problem.from_config(cfg)
    optimizer = MetaOptimizer(work.initial_params(), cfg.meta_optimizer, cfg.meta_lr)
    arrays = to_record(optimizer.current())
    config = cfg.to_mapping()
    per_round = cfg.clients_per_round

    def train_call(handler: Callable, node: int, meta_round: int) -> Message:
        sent = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"meta-round": meta_round})}),
            dst_node_id=node + 1,
            message_type=MessageType.TRAIN,
        )
        context = Context(1, node + 1, {"partition-id": node}, RecordDict(), config)
        return handler(sent, context)

    def replies(handler: Callable, meta_round: int) -> list[Message]:
        nodes = random.Random(meta_round).sample(range(cfg.num_train_clients), per_round)
        return [train_call(handler, n, meta_round) for n in nodes]

    recorder = RunRecorder(cfg.out_dir, config)
    strategy = MetaStrategy(
        build_aggregator(cfg), optimizer, cfg, recorder, num_rounds=rounds, timeout=60
    )
    saver = CheckpointSaver(Path(cfg.out_dir) / CHECKPOINT)

    def checkpoint(meta_round: int) -> Checkpoint:
        return Checkpoint(
            params=optimizer.current(),
            model=cfg.model_name,
            config=config,
            round=meta_round,
            optimizer_state=optimizer.state_dict(),
        )

    fed = [replies(fedmaml_client.train, r) for r in range(1, rounds + 1)]
    triv = [replies(trivial_client.train, r) for r in range(1, rounds + 1)]
    fedavg = FedAvg(fraction_evaluate=0.0)  # as the trivial ServerApp builds it
    rows = [
        ("server: MetaStrategy.aggregate_train (checks, FedAvg, meta-step, tables)", 0.0),
        ("server: checkpoint hand-off to the background writer", 0.0),
        ("server: trivial app's FedAvg.aggregate_train", 0.0),
        ("(off the critical path) checkpoint write with fsync", 0.0),
        ("(inside aggregate_train) rounds.csv + clients.csv rewritten", 0.0),
        ("client: fedmaml ClientApp train, per call", 0.0),
        ("client: trivial ClientApp train, per call", 0.0),
    ]
    timings = [
        median_ms(lambda i: strategy.aggregate_train(i + 1, fed[i]), rounds),
        median_ms(lambda i: saver.save(checkpoint(i + 1)), rounds, saver.wait),  # idle writer
        median_ms(lambda i: fedavg.aggregate_train(i + 1, triv[i]), rounds),
        median_ms(lambda i: save_checkpoint(Path(cfg.out_dir) / "sync.pt", checkpoint(i)), rounds),
        median_ms(lambda i: recorder.flush(), rounds),
        median_ms(lambda i: train_call(fedmaml_client.train, i % 100, i), 10 * rounds),
        median_ms(lambda i: train_call(trivial_client.train, i % 100, i), 10 * rounds),
    ]
    saver.close()
    return [(name, ms) for (name, _), ms in zip(rows, timings, strict=True)]


# ---------------------------------------------------------------------- report


def runs_table(runs: list[Timing], trivial_mean: float) -> str:
    lines = [
        "| run | load (1 min) | per round: mean (s) | median (s) | slow rounds "
        "| start-up to end of round 1 (s) | after last round (s) | total (s) "
        "| mean vs trivial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in runs:
        lines.append(
            f"| {t.name} | {t.load:.2f} | {t.mean:.3f} | {t.median:.3f} "
            f"| {100 * t.slow_share:.0f} % | {t.startup:.1f} | {t.after_last:.1f} "
            f"| {t.total:.1f} | {100 * (t.mean - trivial_mean) / trivial_mean:+.1f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clients", type=int, default=100, help="training clients")
    parser.add_argument("--heldout", type=int, default=20, help="held-out clients (nodes too)")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the SuperLink, simulation, Ray actors
    torch.set_num_threads(1)

    runs: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="fedmaml-overhead-") as tmp:
        shapes = shapes_of(bench_config(args, Path(tmp) / "shapes"))
        for repeat in range(args.repeats):
            order = ("fedmaml", "trivial") if repeat % 2 == 0 else ("trivial", "fedmaml")
            for name in order:
                cfg = bench_config(args, Path(tmp) / f"{name}-{repeat}")
                timing = run_fedmaml(cfg) if name == "fedmaml" else run_trivial(cfg, shapes)
                runs.append(timing)
                print(
                    f"{name} #{repeat + 1}: mean {timing.mean:.3f} s/round, median "
                    f"{timing.median:.3f}, start-up {timing.startup:.1f} s, load {timing.load:.2f}",
                    flush=True,
                )
            runs.append(in_process(bench_config(args, Path(tmp) / f"inproc-{repeat}")))
        parts = breakdown(bench_config(args, Path(tmp) / "breakdown"), min(args.rounds, 50))

    def pooled(name: str) -> list[float]:
        return [r for t in runs if t.name == name for r in t.rounds]

    fed, triv, inproc = pooled("fedmaml"), pooled("trivial"), pooled("in-process")
    mean = statistics.fmean
    overhead = (mean(fed) - mean(triv)) / mean(triv)
    by_median = (statistics.median(fed) - statistics.median(triv)) / statistics.median(triv)
    report = "\n".join(
        [
            runs_table(runs, mean(triv)),
            "",
            f"Pooled over the repeats, per round: fedmaml mean {mean(fed):.3f} s (median "
            f"{statistics.median(fed):.3f}), trivial Flower app mean {mean(triv):.3f} s (median "
            f"{statistics.median(triv):.3f}), in-process mean {mean(inproc):.3f} s.",
            f"**fedmaml's overhead beyond Flower's: {100 * overhead:+.1f} %** of a trivial round "
            f"by the means ({'within' if overhead <= 0.10 else 'over'} the 10 % target); "
            f"{100 * by_median:+.1f} % by the medians.",
            "",
            "| where the time goes (in-process, median) | ms |",
            "|---|---|",
            *(f"| {name} | {ms:.2f} |" for name, ms in parts),
            "",
            f"{args.rounds} rounds × {args.repeats} repeats, {args.clients} training + "
            f"{args.heldout} held-out clients ({args.clients + args.heldout} nodes), "
            f"{args.per_round} per round; {os.cpu_count()} CPU cores, 1 thread per process.",
        ]
    )
    print()
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
