"""The trivial ServerApp: Flower's FedAvg for ``num-rounds`` rounds over zero arrays of
``array-shapes``; the wall-clock time at the end of each round (and of the initial evaluation,
round 0) is appended to ``timings-path`` as ``round seconds-since-epoch``. With
``exchanges-path`` set, every ``send_and_receive`` (Flower's own, with its fixed polling) is
also recorded there as one JSON line: when it began, how many messages it sent and replies it
got, the first and last reply's creation time on its node, and when it returned."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"40x1,40"`` → ``[(40, 1), (40,)]``."""
    return [tuple(int(d) for d in item.split("x")) for item in text.split(",")]


class RecordingGrid:
    """Flower's grid, with each ``send_and_receive`` timed (nothing else changes)."""

    def __init__(self, grid: Grid, path: Path) -> None:
        self.grid, self.path = grid, path

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        begin = time.time()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        end = time.time()
        created = [m.metadata.created_at for m in replies]
        record = {
            "begin": begin,
            "sent": len(messages),
            "received": len(replies),
            "first_created": min(created, default=0.0),
            "last_created": max(created, default=0.0),
            "end": end,
        }
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if str(cfg.get("exchanges-path", "")):
        grid = RecordingGrid(grid, Path(str(cfg["exchanges-path"])))  # type: ignore[assignment]
    arrays = ArrayRecord(
        {
            f"a{i}": Array(np.zeros(shape, dtype=np.float32))
            for i, shape in enumerate(parse_shapes(str(cfg["array-shapes"])))
        }
    )
    min_nodes = int(cfg["min-train-nodes"])
    strategy = FedAvg(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    path = Path(str(cfg["timings-path"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as stamps:

        def stamp(server_round: int, _: ArrayRecord) -> MetricRecord | None:
            stamps.write(f"{server_round} {time.time():.6f}\n")
            return None

        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=int(cfg["num-rounds"]),
            evaluate_fn=stamp,
        )
