"""The trivial ServerApp: Flower's FedAvg for ``num-rounds`` rounds over zero arrays of
``array-shapes``; the wall-clock time at the end of each round (and of the initial evaluation,
round 0) is appended to ``timings-path`` as ``round seconds-since-epoch``."""

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


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
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
