"""Where a federated round's time goes at scale: fedmaml (one user per node, and many users per
node) against the trivial Flower app, interleaved, with the same meta-gradients timed in one
process beside them.

Run from the repository root (one torch thread; check ``free -g`` first for the large
populations):

    .venv/bin/python benchmarks/scale_breakdown.py --quick          # ~10 min: 1,000 users
    .venv/bin/python benchmarks/scale_breakdown.py                  # 1,000 / 10,000 / 100,000
    .venv/bin/python benchmarks/scale_breakdown.py --populations 1000 --per-round 10,100,1000

**Workload.** Sinusoid MAML (MLP 1-40-40-1, 1 inner step, Adam), a population of N training
users (no held-out users, evaluation off in the timed rounds), k users sampled per round, R
rounds. For every (N, k) four simulations run one after the other, each launched by
``fedmaml.federated.simulation.simulate`` (own SuperLink, Ray backend, 1 CPU per actor = 2
actors on 2 cores):

* ``fedmaml 1/node``: fedmaml's ServerApp and ClientApp, N simulated nodes, one user each;
* ``fedmaml U/node``: ``users-per-node`` = N / ``--nodes``: ``--nodes`` simulated nodes (default
  2, one per actor), each round one message per node listing its share of the k users, whose
  meta-gradients it computes in one vmap batch;
* ``trivial``: ``benchmarks/trivial_app`` (FedAvg over clients that echo the arrays they get,
  Flower's own ``send_and_receive`` and its 0.1 s polling), N nodes, k sampled per round;
* ``trivial, 2 nodes`` (``trivial-nodes``): the same app on as many nodes as the many-users
  runs have, each sent one message per round: Flower's floor for those runs (its dispatcher's
  wait and a Ray call, from the push to the last reply's creation), listed under their (N, k).

**The split** (means over rounds 2..R; round 1 is part of the start-up):

* *start-up*: from calling ``simulate`` to the end of round 1, of which *before the ServerApp*
  (SuperLink, ``flwr run``, Ray, the ServerApp's imports and model) and, for fedmaml, *role
  discovery* (round 1's ``configure-s``: waiting for the first node's answer, which includes
  Ray's actors starting and importing the app);
* *round*: the gap between consecutive round ends, split into *configure* (sampling, building
  the messages), *first reply* and *last reply* (from the push to the creation of the
  first / last reply on its node: Flower's node-side dispatch, which polls every 0.1 s
  (``vce_api.add_messages_to_queue``), the Ray calls and the clients' work), *pickup* (from the
  last reply's creation to the server holding it: the server's polling), *aggregate* (reply
  checks, aggregation, meta-step) and *other* (tables, checkpoint hand-off, logging; the rest);
* *per client*: the last reply's time divided by k (the wall time a sampled client adds);
* *overhead beyond compute* (one user per node, per client): fedmaml's *per client* minus the
  echo app's of the same N and k (Flower's own cost per message, measured in the same run)
  minus fedmaml's compute per client: the clients' mean ``train-compute-s`` (the seconds each
  meta-gradient took in its Ray actor, as the client reports it) divided by the actors that
  run clients side by side (one per CPU core); what is left is fedmaml's ClientApp around the
  meta-gradient (decoding θ, building the reply) and the larger messages' transport;
* *in-process*: the same k meta-gradients in this process, one call per user (``loop``) and all
  users in one ``meta_gradients`` batch (``batched``); and the ClientApp handlers called
  directly: fedmaml's ``train`` per user, its many-users ``train`` for k users, the trivial
  app's ``train``;
* *peak memory*: the largest sum over the run's processes (everything ``simulate`` started:
  SuperLink, simulation, Ray and its actors) of their proportional set size (PSS, shared pages
  split between their users), sampled every 0.5 s.

fedmaml's timings come from its ``rounds.csv`` (``configure-s``, ``first-s``, ``wait-s``,
``pickup-s``, ``aggregate-s``, ``elapsed_s``), the trivial app's from its round stamps and its
recorded ``send_and_receive`` calls (``exchanges-path``). A population is skipped, with the
reason printed, when the memory available before a run is under ``--min-free-gb``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "trivial_app"))

from federated_overhead import TRIVIAL_APP, shapes_of
from trivialapp import client_app as trivial_client

from fedmaml.config import RunConfig
from fedmaml.federated.processes import descendants
from fedmaml.federated.simulation import SimulationOptions, simulate
from fedmaml.problem import Problem
from fedmaml.rundir.names import ROUNDS, SUMMARY

NO_EVAL = 10**9


# ---------------------------------------------------------------------- memory


def pss_mib(pid: int) -> float:
    """A process's proportional set size in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


class PeakMemory:
    """The peak of the summed PSS of this process's descendants, sampled in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self.processes = every, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.every):
            pids = descendants(me)
            total = sum(pss_mib(p) for p in pids)
            if total > self.peak:
                self.peak, self.processes = total, len(pids)


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# ---------------------------------------------------------------------- runs


@dataclass
class Run:
    """One simulation's split (seconds; per round: means over rounds 2..R)."""

    name: str
    users: int
    per_round: int
    nodes: int
    startup: float = 0.0
    before_server: float = 0.0
    discovery: float = float("nan")
    round: float = 0.0
    configure: float = float("nan")
    first: float = 0.0
    last: float = 0.0
    pickup: float = 0.0
    aggregate: float = float("nan")
    compute: float = float("nan")
    peak_mib: float = 0.0
    processes: int = 0
    load: float = 0.0
    rounds: list[float] = field(default_factory=list)

    @property
    def other(self) -> float:
        parts = [self.configure, self.last, self.pickup, self.aggregate]
        return self.round - sum(p for p in parts if p == p)

    @property
    def per_client_ms(self) -> float:
        return 1e3 * self.last / self.per_round


def config(users: int, per_round: int, rounds: int, out: Path, users_per_node: int = 1):
    return RunConfig(
        num_rounds=rounds,
        num_train_clients=users,
        num_heldout_clients=0,
        fraction_train=per_round / users,
        min_train_nodes=min(2, per_round),
        eval_every=NO_EVAL,
        eval_clients=1,
        device="cpu",
        users_per_node=users_per_node,
        round_timeout=1800,
        out_dir=str(out),
    )


def run_fedmaml(cfg: RunConfig, name: str) -> Run:
    run = Run(name, cfg.num_train_clients, cfg.clients_per_round, 0, load=os.getloadavg()[0])
    start = time.time()
    with PeakMemory() as memory:
        out = simulate(cfg, SimulationOptions(timeout=7200))
    rows = pd.read_csv(out / ROUNDS).set_index("round").loc[1 : cfg.num_rounds]
    summary = out / SUMMARY
    server_start = summary.stat().st_mtime - json.loads(summary.read_text())["wall_time_s"]
    ends = rows["elapsed_s"].astype(float).tolist()
    clients = pd.read_csv(out / "clients.csv")
    run.nodes = int(clients["node_id"].nunique())
    run.startup = server_start + ends[0] - start
    run.before_server = server_start - start
    run.discovery = float(rows.loc[1, "configure-s"])
    run.rounds = [b - a for a, b in itertools.pairwise(ends)]
    later = rows.iloc[1:]
    run.round = statistics.fmean(run.rounds)
    run.configure = float(later["configure-s"].mean())
    run.first = float(later["first-s"].mean())
    run.last = float(later["wait-s"].mean())
    run.pickup = float(later["pickup-s"].mean())
    run.aggregate = float(later["aggregate-s"].mean())
    run.compute = float(later["train-compute-s"].mean())
    run.peak_mib, run.processes = memory.peak, memory.processes
    return run


def run_trivial(cfg: RunConfig, shapes: str, name: str = "trivial") -> Run:
    nodes = cfg.num_train_clients
    run = Run(name, nodes, cfg.clients_per_round, nodes, load=os.getloadavg()[0])
    stamps = Path(cfg.out_dir).resolve() / "round_ends.txt"
    exchanges = Path(cfg.out_dir).resolve() / "exchanges.jsonl"
    app_config = {
        "num-rounds": cfg.num_rounds,
        "fraction-train": cfg.clients_per_round / nodes,
        "min-train-nodes": cfg.clients_per_round,
        "array-shapes": shapes,
        "timings-path": str(stamps),
        "exchanges-path": str(exchanges),
    }
    start = time.time()
    with PeakMemory() as memory:
        simulate(
            cfg,
            SimulationOptions(timeout=7200),
            app_dir=TRIVIAL_APP,
            app_config=app_config,
        )
    stamp = dict(line.split() for line in stamps.read_text().splitlines())
    ends = [float(stamp[str(r)]) for r in range(0, cfg.num_rounds + 1)]
    calls = [json.loads(line) for line in exchanges.read_text().splitlines()]
    train = [c for c in calls if c["sent"]]
    run.startup = ends[1] - start
    run.before_server = ends[0] - start
    run.rounds = [b - a for a, b in itertools.pairwise(ends[1:])]
    run.round = statistics.fmean(run.rounds)
    later = train[1:]
    run.first = statistics.fmean(c["first_created"] - c["begin"] for c in later)
    run.last = statistics.fmean(c["last_created"] - c["begin"] for c in later)
    run.pickup = statistics.fmean(c["end"] - c["last_created"] for c in later)
    run.peak_mib, run.processes = memory.peak, memory.processes
    return run


# ---------------------------------------------------------------------- in process


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process(users: int, per_round: int, repeats: int) -> dict[str, float]:
    """Seconds for k meta-gradients in this process, and the ClientApp handlers called
    directly (fedmaml per user, fedmaml many-users for k users, trivial per call)."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmaml.federated import client_app as fedmaml_client
    from fedmaml.federated import keys
    from fedmaml.federated.records import to_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = config(users, per_round, 1, Path(tempfile.gettempdir()))
    work = Problem.from_config(cfg)
    theta = work.initial_params()
    g = torch.Generator().manual_seed(per_round)
    sampled = torch.randperm(users, generator=g)[:per_round].tolist()
    clients = [(work.source.client(i), i) for i in sampled]
    loop = median_s(
        lambda: [work.client_meta_gradient(theta, c, i, 1) for c, i in clients], repeats
    )
    batched = median_s(lambda: work.users_meta_gradients(theta, clients, 1), repeats)
    arrays = to_record(theta)
    config_map = cfg.to_mapping()

    def message(users_listed: list[str] | None) -> Message:
        values = {keys.META_ROUND: 1}
        if users_listed is not None:
            values[keys.USERS] = users_listed
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord(values)})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    context = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), config_map)
    one = [message([f"train-{i}"]) for i in sampled]
    everyone = message([f"train-{i}" for i in sampled])
    handler_one = median_s(lambda: [fedmaml_client.train(m, context) for m in one], repeats)
    handler_many = median_s(lambda: fedmaml_client.train(everyone, context), repeats)
    trivial_msg = message(None)
    handler_trivial = median_s(
        lambda: [trivial_client.train(trivial_msg, context) for _ in range(per_round)], repeats
    )
    return {
        "loop": loop,
        "batched": batched,
        "handler_one": handler_one,
        "handler_many": handler_many,
        "handler_trivial": handler_trivial,
    }


# ---------------------------------------------------------------------- report


def fmt(x: float, digits: int = 3) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def table(runs: list[Run], inproc: dict[tuple[int, int], dict[str, float]]) -> str:
    lines = [
        "| users | per round | run | nodes | start-up to end of round 1 (s) | of which before "
        "the ServerApp | role discovery | round (s) | configure | first reply | last reply | "
        "pickup | aggregate | other | per client (ms) | round / in-process batched | peak "
        "memory (MiB) | load |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ref = inproc[(r.users, r.per_round)]["batched"]
        floor = r.name.startswith("trivial, ")  # not k clients: no per-client time or ratio
        per_client = "–" if floor else f"{r.per_client_ms:.2f}"
        ratio = "–" if floor else f"{r.round / ref:.1f}x"
        lines.append(
            f"| {r.users:,} | {r.per_round:,} | {r.name} | {r.nodes:,} | {r.startup:.1f} | "
            f"{r.before_server:.1f} | {fmt(r.discovery, 1)} | {r.round:.3f} | "
            f"{fmt(r.configure)} | {r.first:.3f} | {r.last:.3f} | {r.pickup:.3f} | "
            f"{fmt(r.aggregate)} | {r.other:.3f} | {per_client} | {ratio} | "
            f"{r.peak_mib:,.0f} | {r.load:.1f} |"
        )
    return "\n".join(lines)


def overhead_table(runs: list[Run], inproc: dict[tuple[int, int], dict[str, float]]) -> str:
    """One user per node against the echo app of the same (N, k), per sampled client."""
    actors = os.cpu_count() or 1
    lines = [
        "| users | per round | fedmaml 1/node (ms) | trivial (ms) | fedmaml's compute in the "
        f"actors (ms, ÷ {actors} actors) | fedmaml overhead beyond compute (ms) | compute in "
        "this process (ms, loop ÷ k) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    trivial = {(r.users, r.per_round): r for r in runs if r.name == "trivial"}
    for r in runs:
        echo = trivial.get((r.users, r.per_round))
        if r.name != "fedmaml 1/node" or echo is None:
            continue
        compute = 1e3 * r.compute / actors
        overhead = r.per_client_ms - echo.per_client_ms - compute
        alone = 1e3 * inproc[(r.users, r.per_round)]["loop"] / r.per_round
        lines.append(
            f"| {r.users:,} | {r.per_round:,} | {r.per_client_ms:.2f} | "
            f"{echo.per_client_ms:.2f} | {compute:.2f} | {overhead:.2f} | {alone:.2f} |"
        )
    return "\n".join(lines)


def many_users_table(runs: list[Run], inproc: dict[tuple[int, int], dict[str, float]]) -> str:
    """Many users per node against Flower's floor: the echo app on as many nodes, one message
    each, from the push to its last reply's creation (dispatch and a Ray call)."""
    lines = [
        "| users | per round | round (s) | in-process batched (s) | round / in-process | "
        "Flower's floor: echo on the same nodes, push → last reply (s) | round − floor (s) | "
        "(round − floor) / in-process |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floors = {(r.users, r.per_round): r for r in runs if r.name.startswith("trivial, ")}
    for r in runs:
        floor = floors.get((r.users, r.per_round))
        if not r.name.startswith("fedmaml ") or r.name == "fedmaml 1/node":
            continue
        ref = inproc[(r.users, r.per_round)]["batched"]
        rest = r.round - floor.last if floor else float("nan")
        lines.append(
            f"| {r.users:,} | {r.per_round:,} | {r.round:.3f} | {ref:.3f} | {r.round / ref:.1f}x "
            f"| {fmt(floor.last if floor else float('nan'))} | {fmt(rest)} | "
            f"{'–' if rest != rest else f'{rest / ref:.1f}x'} |"
        )
    return "\n".join(lines)


def inproc_table(inproc: dict[tuple[int, int], dict[str, float]]) -> str:
    lines = [
        "| users | per round | k meta-gradients, loop (ms) | batched (ms) | fedmaml ClientApp "
        "train, one message per user (ms) | many-users train, one message (ms) | trivial "
        "train × k (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (users, k), t in inproc.items():
        lines.append(
            f"| {users:,} | {k:,} | {1e3 * t['loop']:.1f} | {1e3 * t['batched']:.1f} | "
            f"{1e3 * t['handler_one']:.1f} | {1e3 * t['handler_many']:.1f} | "
            f"{1e3 * t['handler_trivial']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--populations", default="1000,10000,100000")
    parser.add_argument("--per-round", default="10,100,1000", help="at population 1,000")
    parser.add_argument(
        "--large-per-round", default="100", help="per-round sizes at the larger populations"
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=2, help="nodes in the many-users runs")
    parser.add_argument(
        "--one-node-max", type=int, default=10000, help="largest population run 1 user/node"
    )
    parser.add_argument("--runs", default="fedmaml-1,trivial,fedmaml-many,trivial-nodes")
    parser.add_argument("--min-free-gb", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="population 1,000 only")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    populations = [1000] if args.quick else [int(n) for n in args.populations.split(",")]
    wanted = args.runs.split(",")
    runs: list[Run] = []
    inproc: dict[tuple[int, int], dict[str, float]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedmaml-scale-") as tmp:
        shapes = shapes_of(config(2, 2, 1, Path(tmp) / "shapes"))
        for users in populations:
            sizes = args.per_round if users == 1000 else args.large_per_round
            for k in [int(x) for x in sizes.split(",")]:
                inproc[(users, k)] = in_process(users, k, args.repeats)
                print(f"in-process N={users} k={k}: {inproc[(users, k)]}", flush=True)
                rounds = args.rounds if k < 1000 else max(3, args.rounds // 2)
                for name in wanted:
                    if name in ("fedmaml-1", "trivial") and users > args.one_node_max:
                        skipped.append(f"{name} at {users:,} users: above --one-node-max")
                        continue
                    free = available_gb()
                    if free < args.min_free_gb:
                        skipped.append(f"{name} at {users:,} users: {free:.1f} GB available")
                        continue
                    out = Path(tmp) / f"{name}-{users}-{k}"
                    per_node = -(-users // args.nodes) if name == "fedmaml-many" else 1
                    cfg = config(users, k, rounds, out, per_node)
                    if name == "trivial":
                        run = run_trivial(cfg, shapes)
                    elif name == "trivial-nodes":
                        # Flower's floor for the many-users runs: one echo message to each of
                        # their nodes per round; reported under (N, k) it stands for
                        cfg = config(args.nodes, args.nodes, rounds, out)
                        run = run_trivial(cfg, shapes, f"trivial, {args.nodes} nodes")
                        run.users, run.per_round = users, k
                    else:
                        label = "fedmaml 1/node" if per_node == 1 else f"fedmaml {per_node}/node"
                        run = run_fedmaml(cfg, label)
                    runs.append(run)
                    print(
                        f"{run.name} N={users} k={k}: start-up {run.startup:.1f} s, round "
                        f"{run.round:.3f} s, last reply {run.last:.3f}, pickup {run.pickup:.3f}, "
                        f"peak {run.peak_mib:.0f} MiB, load {run.load:.1f}",
                        flush=True,
                    )
    report = "\n".join(
        [
            table(runs, inproc),
            "",
            "Many users per node against Flower's floor:",
            "",
            many_users_table(runs, inproc),
            "",
            "One user per node, per sampled client:",
            "",
            overhead_table(runs, inproc),
            "",
            f"In this process (median of {args.repeats}):",
            "",
            inproc_table(inproc),
            "",
            *(f"- skipped: {s}" for s in skipped),
            f"{os.cpu_count()} CPU cores, 1 torch thread, {args.rounds} rounds "
            f"(rounds 2..R averaged), {args.nodes} nodes in the many-users runs.",
        ]
    )
    print()
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
