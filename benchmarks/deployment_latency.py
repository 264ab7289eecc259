"""Round latency of a Flower 1.42 deployment: fedmaml's ClientApp against trivial ClientApps.

Flower's deployment runtime starts a new ``flwr-clientapp`` process for every message, so a
ClientApp pays its imports every round. The set-up is the same for every app: one SuperLink and
``--nodes`` SuperNodes on 127.0.0.1 (insecure), each SuperNode with its own small CSV file
(task ``local``). A benchmark ServerApp sends ``--rounds`` rounds of one train message to every
node and records, per round, the wall time from sending to the last reply, and per message the
time from the message's creation on the server to its reply's creation in the ClientApp
(``reply.created_at - msg.created_at``: the SuperNode's poll, the process start, the imports and
the handler). ClientApps compared:

* ``trivial``: replies at once (Flower's own floor: 3 s polls, process start, flwr imports);
* ``trivial+torch``: imports torch, then replies (the floor of any PyTorch ClientApp);
* ``trivial+arrays``: replies at once with the arrays it received (θ: what a reply carrying an
  update costs Flower's transport);
* ``fedmaml``: fedmaml's ClientApp ``train`` (reads its CSV, one MAML meta-gradient).

Each app runs with each of ``--grids``: ``flower``, the ServerApp's ``Grid.send_and_receive`` as
Flower ships it (a pull, then a fixed 3 s sleep, ``flwr/superlink/grid/http_grid.py``), and
``prompt``, fedmaml's :class:`~fedmaml.federated.collect.PromptGrid` (the grid fedmaml's
ServerApp uses: pulls after waits of 10 % of the time waited, at most 0.2 s). *pickup* is a
round's wall time minus its last reply's message->reply time: what the server's own collection
adds after the last reply exists (one machine, one clock).

It also times, in fresh processes (median of ``--repeat``), what a node pays per message
without Flower's transport: the imports of Flower's ClientApp alone, with torch, and with what a
fedmaml train message imports (ClientApp module, node, workload, local data loader); and one
whole fedmaml train message (imports, building the model, reading the device's file as CSV,
cached CSV or NPZ, one MAML meta-gradient) as ``flwr-clientapp`` runs it. Prints tables;
``--json`` writes the numbers.

    .venv/bin/python benchmarks/deployment_latency.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedmaml.federated.deployment import LocalFederation

IMPORTS = {
    "flwr.clientapp": "import flwr.clientapp",
    "+ torch": "import flwr.clientapp, torch",
    "+ torch + fedmaml": (
        "import flwr.clientapp, torch; import fedmaml.federated.client_app, "
        "fedmaml.federated.node, fedmaml.problem, fedmaml.tasks.local"
    ),
}
RUN_CONFIG = {
    "task": "local",
    "input-shape": "8",
    "num-classes": 4,
    "label-column": "y",
    "support-size": 5,
    "query-size": 5,
    "device": "cpu",
}
#: each trivial ClientApp's train body, and the records of its reply besides its metrics
CLIENTS = {
    "trivial": ("", ""),
    "trivial+torch": ("import torch  # noqa: F401", ""),
    "trivial+arrays": ("", '"arrays": msg.content["arrays"], '),
}

HANDLER = """
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.config import RunConfig
from fedmaml.federated.client_app import app
from fedmaml.federated.records import to_record
from fedmaml.problem import Problem

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
run_config = {run_config!r}
theta = Problem.from_config(RunConfig.from_mapping(run_config)).initial_params()
content = RecordDict({{"arrays": to_record(theta), "config": ConfigRecord({{"meta-round": 1}})}})
message = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
node_config = {{"data-path": sys.argv[1], "cache-dir": sys.argv[2], "client-index": 0}}
context = Context(1, 0, node_config, RecordDict(), run_config)
reply = app(message, context)
assert not reply.has_error(), reply.error
"""

SERVER = """
import json, time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmaml.config import RunConfig
from fedmaml.federated.collect import PromptGrid
from fedmaml.federated.records import to_record
from fedmaml.problem import Problem

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    grid = {grid}
    work = Problem.from_config(RunConfig.from_mapping(context.run_config))
    arrays = to_record(work.initial_params())
    while len(grid.get_node_ids()) < {nodes}:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    rounds = []
    for r in range(1, {rounds} + 1):
        content = RecordDict({{"arrays": arrays, "config": ConfigRecord({{"meta-round": r}})}})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
        created = {{m.metadata.dst_node_id: m.metadata.created_at for m in messages}}
        start = time.time()
        replies = list(grid.send_and_receive(messages, timeout=300))
        rounds.append({{
            "wall_s": time.time() - start,
            "reply_s": [m.metadata.created_at - created[m.metadata.src_node_id] for m in replies],
            "errors": [m.error.reason for m in replies if m.has_error()],
        }})
    Path({out!r}).write_text(json.dumps(rounds))
"""

CLIENT = """
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    {body}
    metrics = MetricRecord({{"num-examples": 1}})
    return Message(RecordDict({{{reply}"metrics": metrics}}), reply_to=msg)
"""


GRIDS = {"flower": "grid", "prompt": "PromptGrid(grid)"}


def write_app(root: Path, name: str, grid: str, rounds: int, nodes: int, out: Path) -> Path:
    """A Flower app dir whose ServerApp is the benchmark's (collecting with ``grid``) and
    ClientApp is ``name``'s."""
    app = root / f"{name.replace('+', '-')}-{grid}"
    app.mkdir(parents=True)
    server = SERVER.format(nodes=nodes, rounds=rounds, out=str(out), grid=GRIDS[grid])
    (app / "bench_server.py").write_text(server)
    if name == "fedmaml":
        client_ref = "fedmaml.federated.client_app:app"
    else:
        body, reply = CLIENTS[name]
        (app / "bench_client.py").write_text(CLIENT.format(body=body or "pass", reply=reply))
        client_ref = "bench_client:app"
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in RUN_CONFIG.items())
    (app / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "bench-{app.name}"
        version = "0.1.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "fedmaml"

        [tool.flwr.app.components]
        serverapp = "bench_server:app"
        clientapp = "{client_ref}"

        [tool.flwr.app.config]
        """)
        + config
        + "\n"
    )
    return app


def process_seconds(code: str, repeat: int, *args: str) -> float:
    """Median wall time of a fresh ``python -c code args``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *args], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def node_side(root: Path, csv: Path, repeat: int) -> dict[str, float]:
    """Fresh-process seconds: imports, and one whole fedmaml train message per data format."""
    times = {name: process_seconds(code, repeat) for name, code in IMPORTS.items()}
    df = pd.read_csv(csv)
    npz = root / "device.npz"
    np.savez(npz, x=df.drop(columns="y").to_numpy(), y=df["y"].to_numpy())
    handler = HANDLER.format(run_config=RUN_CONFIG)
    cache = str(root / "cache")
    for name, path, cache_dir in (("csv", csv, ""), ("csv, cached", csv, cache), ("npz", npz, "")):
        seconds = process_seconds(handler, repeat, str(path), cache_dir)
        times[f"train message ({name})"] = seconds
    return times


def device_data(root: Path, nodes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(nodes):
        x = rng.normal(size=(60, 8))
        df = pd.DataFrame(x, columns=[f"f{j}" for j in range(8)])
        df["y"] = (x @ rng.normal(size=(8, 4))).argmax(1)
        files.append(root / f"device-{i}.csv")
        df.to_csv(files[-1], index=False)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="import timing repetitions")
    parser.add_argument("--apps", default="trivial,trivial+torch,fedmaml")
    parser.add_argument("--grids", default="flower,prompt", help=f"of {', '.join(GRIDS)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    runs = [(a, g) for a in args.apps.split(",") for g in args.grids.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedmaml-bench-") as tmp:
        root = Path(tmp)
        files = device_data(root, args.nodes)
        results["node_side_s"] = node_side(root, files[0], args.repeat)
        with LocalFederation(root / "federation") as fed:
            fed.start_superlink()
            for i, file in enumerate(files):
                config = {"client-index": i, "data-path": str(file), "cache-dir": str(root)}
                fed.add_node(f"node-{i}", config)
            for name, grid in runs:
                out = root / f"{name}-{grid}.json"
                app = write_app(root / "apps", name, grid, args.rounds, args.nodes, out)
                code = fed.run({}, timeout=900, name=f"run-{app.name}", app_dir=app)
                if code or not out.is_file():
                    raise SystemExit(f"{name}: the run failed; see {fed.log(f'run-{app.name}')}")
                results[f"{name} / {grid}"] = {"rounds": json.loads(out.read_text())}
    print(f"node side, fresh process, median of {args.repeat}:")
    for name, seconds in results["node_side_s"].items():
        print(f"  {name:<28}{seconds:6.2f} s")
    print(
        f"{'app / grid':<24}{'round wall s (median)':>24}{'message->reply s (median)':>28}"
        f"{'pickup s (median)':>20}  errors"
    )
    for name, grid in runs:
        result = results[f"{name} / {grid}"]
        rounds = result["rounds"]
        walls = [r["wall_s"] for r in rounds]
        replies = [s for r in rounds for s in r["reply_s"]]
        pickups = [r["wall_s"] - max(r["reply_s"]) for r in rounds if r["reply_s"]]
        errors = sum(len(r["errors"]) for r in rounds)
        result["median_round_s"] = statistics.median(walls)
        result["median_reply_s"] = statistics.median(replies)
        result["median_pickup_s"] = statistics.median(pickups)
        print(
            f"{name + ' / ' + grid:<24}{statistics.median(walls):>24.2f}"
            f"{statistics.median(replies):>28.2f}{statistics.median(pickups):>20.2f}"
            f"  {errors}   rounds: {', '.join(f'{w:.1f}' for w in walls)}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
