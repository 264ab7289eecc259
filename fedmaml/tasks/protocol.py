"""The evaluation protocol: which clients train, which choose the personalization recipe, which
measure it, and each client's support and query sets.

* **Client groups.** The usable clients (those that can give the requested episodes; the others
  are dropped first, with their reason) are split, seeded, into training clients (meta-training
  sees only them), validation clients (never trained on; the personalization recipe is chosen
  on them, :mod:`fedmaml.personalize.recipe`) and held-out clients (never trained on, never
  used to choose anything: the test group, the unseen users every reported number is about),
  by :func:`~fedmaml.tasks.partition.split_groups`.
* **Support and query sets.** With a support fraction f (the FedMeta protocol: f = 0.2), each
  client's examples are split once, seeded by the run's seed and the client's id, into a
  support set (n_s = floor(f n + 1/2) examples) and a query set (the rest):
  :class:`SupportQuerySource` serves every client so split, as its training pool (support) and
  held-out pool (query), to training, evaluation, the recipe and on-device personalization
  alike. Without it, episodes draw support-size + query-size examples from the client's pools.

:func:`group_table` lists every client with its group (and the dropped ones with the reason):
the run directory's record of the split (``clients_split.csv``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedmaml.tasks.episodes import ClientData
from fedmaml.tasks.partition import support_query_split
from fedmaml.tasks.source import SPLITS, TaskSource

#: the name of each client group in tables
GROUP_NAMES = {"train": "train", "val": "validation", "heldout": "test"}


class SupportQuerySource:
    """``source`` with every client split into a support set and a query set (its training and
    held-out pools) by :func:`~fedmaml.tasks.partition.support_query_split`."""

    def __init__(self, source: TaskSource, fraction: float, seed: int) -> None:
        self.source, self.fraction, self.seed = source, fraction, seed
        self.loss = source.loss

    def num_clients(self, split: str) -> int:
        return self.source.num_clients(split)

    def client(self, index: int, split: str = "train") -> ClientData:
        return support_query_split(self.source.client(index, split), self.fraction, self.seed)

    def model_kwargs(self) -> dict[str, int]:
        return self.source.model_kwargs()

    def __getattr__(self, name: str) -> Any:  # client_ids, dropped, ... of the wrapped source
        return getattr(self.source, name)


def group_table(source: TaskSource, *, sizes: bool = True) -> list[dict[str, Any]]:
    """One row per client: ``client_id``, ``group`` (train, validation, test), ``index`` (within
    its group) and, with ``sizes``, ``n_support`` and ``n_query`` (the client's two pools); then
    one row per dropped client with group ``dropped`` and its ``reason``."""
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        for index in range(source.num_clients(split)):
            client = source.client(index, split)
            row: dict[str, Any] = {
                "client_id": client.client_id,
                "group": GROUP_NAMES[split],
                "index": index,
            }
            if sizes:
                row["n_support"] = len(client)
                row["n_query"] = 0 if client.y_test is None else int(client.y_test.shape[0])
            rows.append(row)
    dropped: dict[str, str] = getattr(source, "dropped", {}) or {}
    rows += [
        {"client_id": cid, "group": "dropped", "reason": reason}
        for cid, reason in sorted(dropped.items())
    ]
    return rows


def group_counts(source: TaskSource) -> dict[str, int]:
    """Clients per group, and how many were dropped as too small before the counts were fixed."""
    counts = {GROUP_NAMES[s]: source.num_clients(s) for s in SPLITS}
    counts["dropped"] = len(getattr(source, "dropped", {}) or {})
    return counts


def write_groups(source: TaskSource, path: str | os.PathLike[str]) -> Path:
    """The run directory's record of the split (:func:`group_table`, sizes included when the
    clients are split into support and query sets), written atomically as CSV."""
    import pandas as pd

    from fedmaml.atomic import atomic_path

    rows = group_table(source, sizes=isinstance(source, SupportQuerySource))
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return Path(path)
