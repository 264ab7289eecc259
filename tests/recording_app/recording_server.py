"""A Flower ServerApp for the tests: fedmaml's own ServerApp, whose Grid writes down every
message it receives from the nodes (``received/*.npz`` in the run directory), so that a test
can look at exactly what the server was sent. Nothing else differs from the real app."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmaml.federated.records import run_config
from fedmaml.federated.server_app import run

app = ServerApp()


class RecordingGrid:
    """The real Grid; every reply pulled is saved, record by record, before it is returned."""

    def __init__(self, grid: Grid, folder: Path) -> None:
        self._grid, self._folder = grid, folder
        self._count = itertools.count()
        folder.mkdir(parents=True, exist_ok=True)

    def _save(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            payload: dict[str, Any] = {"src": np.array(reply.metadata.src_node_id, dtype=np.uint64)}
            if not reply.has_error():
                for name, record in reply.content.array_records.items():
                    for key, array in record.items():
                        payload[f"array/{name}/{key}"] = array.numpy()
                for name, record in reply.content.config_records.items():
                    for key, value in record.items():
                        payload[f"config/{name}/{key}"] = np.array(value, dtype=object)
                for name, record in reply.content.metric_records.items():
                    for key, value in record.items():
                        payload[f"metric/{name}/{key}"] = np.array(value)
            np.savez(self._folder / f"{next(self._count):06d}.npz", **payload)
        return replies

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return self._save(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return self._save(self._grid.send_and_receive(messages, timeout=timeout))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(context)
    run(RecordingGrid(grid, Path(cfg.out_dir) / "received"), cfg)  # type: ignore[arg-type]
