"""How examples are divided: rows into clients, clients into train and held-out, and one
client's examples into a training pool and a held-out pool.

* :func:`partition_rows` splits the rows of a table without a user column into clients with
  flwr-datasets partitioners, run on an in-memory ``datasets.Dataset`` (never the network):
  ``iid`` (a seeded shuffle, then equal contiguous shards), ``dirichlet`` (per-class shares
  p_c ~ Dir(alpha), small alpha = skewed label mixes) and ``pathological`` (each client holds
  ``classes_per_partition`` classes).
* :func:`split_clients`: of a seeded permutation of the sorted ids, the first ``num_heldout``
  are the held-out (unseen, test) clients, the next ``num_val`` the validation clients, and the
  rest the training clients.
* :func:`holdout_split`: per group (per class when stratified), n_test = floor(f * n + 1/2), kept in
  [0, n - 1] so every group keeps a training example.
* :func:`support_query_split`: one client's examples (both pools) reshuffled, seeded by the run's
  seed and the client's id, into a support set of n_s = floor(f * n + 1/2) examples (kept in
  [1, n - 1]) and a query set of the rest (the FedMeta protocol's per-client split).
* :func:`keep_usable`: drops clients whose pools cannot give the requested episodes, with a
  logged count (and the reason per client in ``dropped``), and stops when none is left.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedmaml.config import PARTITIONS
from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData, EpisodeSpec, sample_episode

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

_ROW = "__fedmaml_row__"


def partition_rows(
    df: pd.DataFrame,
    num_partitions: int,
    *,
    scheme: str = "iid",
    label_column: str | None = None,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 0,
    min_rows: int = 1,
) -> list[np.ndarray]:
    """Row positions (into ``df``) of each of ``num_partitions`` clients. A Dirichlet partition
    is redrawn (by flwr-datasets) until every client has at least ``min_rows`` rows."""
    from datasets import Dataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if scheme not in PARTITIONS:
        raise FedmamlError(
            f"unknown partition scheme {scheme!r}; use one of {', '.join(PARTITIONS)}"
        )
    if num_partitions < 1 or num_partitions > len(df):
        raise FedmamlError(
            f"cannot split {len(df)} rows into {num_partitions} clients; "
            "use between 1 and the number of rows"
        )
    columns = {_ROW: np.arange(len(df))}
    if scheme != "iid":
        if label_column is None or label_column not in df.columns:
            raise FedmamlError(
                f"the {scheme} partition splits by label, but column {label_column!r} is missing"
            )
        columns[label_column] = df[label_column].to_numpy()
    ds = Dataset.from_dict(columns)
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        ds = ds.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=alpha,
            min_partition_size=min(min_rows, len(df) // num_partitions),
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            num_classes_per_partition=classes_per_partition,
            seed=seed,
        )
    partitioner.dataset = ds
    try:
        return [
            np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)
            for i in range(num_partitions)
        ]
    except ValueError as exc:
        raise FedmamlError(
            f"the {scheme} partition of {len(df)} rows into {num_partitions} clients failed "
            f"({exc}); use fewer clients, a larger alpha or more classes per client"
        ) from None


def split_clients(
    ids: Sequence[str],
    num_heldout: int,
    seed: int,
    num_train: int | None = None,
    *,
    num_val: int = 0,
    what: str = "clients",
    skipped: int = 0,
) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids) of :func:`split_groups` (which also draws the validation
    ids)."""
    groups = split_groups(
        ids, num_heldout, seed, num_train, num_val=num_val, what=what, skipped=skipped
    )
    return groups["train"], groups["heldout"]


def split_groups(
    ids: Sequence[str],
    num_heldout: int,
    seed: int,
    num_train: int | None = None,
    *,
    num_val: int = 0,
    what: str = "clients",
    skipped: int = 0,
) -> dict[str, list[str]]:
    """``{"train", "val", "heldout"}`` -> sorted ids. Of a seeded permutation of ``sorted(ids)``
    the first ``num_heldout`` are held out (test), the next ``num_val`` validation clients, and
    ``num_train`` of the rest (all without it) training clients: disjoint, and the same for the
    same ids and seed. Asking for more clients than there are (``skipped`` were dropped as too
    small before) is an error naming the counts."""
    ordered = sorted(ids)
    check_counts(what, num_train or 1, num_heldout, len(ordered), skipped=skipped, num_val=num_val)
    perm = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = num_heldout + num_val
    heldout = sorted(ordered[i] for i in perm[:num_heldout])
    val = sorted(ordered[i] for i in perm[num_heldout:cut])
    train = sorted(ordered[i] for i in perm[cut:])
    if num_train is not None and num_train < len(train):
        log.info("using %d of %d training %s (num-train-clients)", num_train, len(train), what)
        train = train[:num_train]
    return {"train": train, "val": val, "heldout": heldout}


def check_counts(
    what: str,
    num_train: int,
    num_heldout: int,
    available: int,
    *,
    heldout_available: int | None = None,
    skipped: int = 0,
    num_val: int = 0,
) -> None:
    """Refuse client counts the data cannot give, before any round: ``available`` usable
    clients for training, validation and held-out ones together, or ``available`` for training
    and ``heldout_available`` held out when the data fixes the two groups."""
    dropped = f" ({skipped} more were too small for the episodes)" if skipped else ""
    if heldout_available is None:
        asked = num_train + num_val + num_heldout
        if asked > available:
            others = num_heldout + num_val
            fit = max(available - others, 0)
            val = f", num-val-clients={num_val}" if num_val else ""
            raise FedmamlError(
                f"num-train-clients={num_train}{val} and num-heldout-clients={num_heldout} ask "
                f"for {asked} {what}, but the data has {available} usable{dropped}; "
                + (
                    f"lower num-train-clients to {fit}"
                    if fit
                    else f"lower num-heldout-clients{' and num-val-clients' if num_val else ''}"
                    f" below {available} in all"
                )
            )
        return
    for key, asked, have, group in (
        ("num-train-clients", num_train, available, "training"),
        ("num-heldout-clients", num_heldout, heldout_available, "held-out"),
    ):
        if asked > have:
            raise FedmamlError(
                f"{key}={asked} asks for {asked} {group} {what}, but the data has {have} usable"
                f"{dropped}; lower {key} to {have}"
            )


def holdout_split(
    y: Tensor, fraction: float, generator: torch.Generator, *, stratify: bool
) -> tuple[Tensor, Tensor]:
    """Indices (train, test) of a seeded split; per class when ``stratify``."""
    if not 0 <= fraction < 1:
        raise FedmamlError(f"held-out fraction must be in [0, 1) (got {fraction})")
    groups = _groups(y) if stratify else [torch.arange(len(y))]
    train, test = [], []
    for idx in groups:
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = min(int(fraction * len(idx) + 0.5), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    empty = torch.empty(0, dtype=torch.long)
    return (
        torch.sort(torch.cat(train or [empty])).values,
        torch.sort(torch.cat(test or [empty])).values,
    )


def fraction_sizes(n: int, fraction: float) -> tuple[int, int]:
    """(support, query) sizes of a client with ``n`` examples split at ``fraction``:
    n_s = floor(fraction * n + 1/2) kept in [1, n - 1] (for n >= 2), n_q = n - n_s."""
    n_support = min(max(int(fraction * n + 0.5), 1), max(n - 1, 1))
    return n_support, n - n_support


def support_query_split(client: ClientData, fraction: float, seed: int) -> ClientData:
    """The client's examples (training and held-out pools together) shuffled with a generator
    seeded by ``seed`` and the client's id, then cut into a support set of
    :func:`fraction_sizes` examples (the new training pool) and a query set of the rest (the new
    held-out pool). Not stratified: a class may be in one set only, as in the FedMeta protocol.
    """
    x, y = client.x, client.y
    if client.x_test is not None and client.y_test is not None:
        x, y = torch.cat([x, client.x_test]), torch.cat([y, client.y_test])
    key = (seed * 1_000_003 + zlib.crc32(client.client_id.encode())) % 2**64
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(key))
    n_support, _ = fraction_sizes(len(y), fraction)
    s, q = order[:n_support], order[n_support:]
    meta = {**client.meta, "support-fraction": f"{fraction:g}"}
    return ClientData(client.client_id, x[s], y[s], x[q], y[q], meta=meta)


def _groups(y: Tensor) -> list[Tensor]:
    return [(y == c).nonzero(as_tuple=True)[0] for c in torch.unique(y)]


def episode_problem(client_id: str, y: Tensor, y_test: Tensor | None, spec: EpisodeSpec) -> str:
    """Why a client with these labels cannot give ``spec``'s training and held-out episodes
    ("" when it can). It asks :func:`sample_episode` itself, on label-only pools (split into
    support and query sets first when ``spec.fraction`` is set)."""
    client = ClientData(
        client_id,
        torch.empty(len(y), 0),
        y,
        None if y_test is None else torch.empty(len(y_test), 0),
        y_test,
    )
    if spec.fraction is not None:
        client = support_query_split(client, spec.fraction, 0)  # sizes do not depend on seed
    generator = torch.Generator().manual_seed(0)
    try:
        sample_episode(client, spec, generator)
        if y_test is not None:
            sample_episode(client, spec, generator, held_out=True)
    except FedmamlError as exc:
        return str(exc)
    return ""


def keep_usable(
    ids: Sequence[str],
    labels: Callable[[str], tuple[Tensor, Tensor | None]],
    spec: EpisodeSpec | None,
    what: str,
    dropped: MutableMapping[str, str] | None = None,
) -> list[str]:
    """The ids whose pools (``labels(id)`` = train labels, held-out labels) fit ``spec``.

    Skipped clients are counted in the log (with the first reason) and, with ``dropped``,
    recorded there (id -> reason); none left is an error.
    """
    if spec is None:
        return list(ids)
    kept, reasons = [], []
    for cid in ids:
        y, y_test = labels(cid)
        problem = episode_problem(cid, y, y_test, spec)
        if problem:
            reasons.append(problem)
            if dropped is not None:
                dropped[cid] = problem
        else:
            kept.append(cid)
    if reasons:
        log.warning(
            "skipped %d of %d %s that cannot give the requested episodes (e.g. %s)",
            len(reasons),
            len(ids),
            what,
            reasons[0],
        )
    if not kept:
        raise FedmamlError(
            f"none of the {len(ids)} {what} has enough examples for episodes with "
            f"support={spec.support}, query={spec.query}, ways={spec.ways or 'natural'}"
            + (f", support fraction {spec.fraction:g}" if spec.fraction is not None else "")
            + " "
            f"({reasons[0] if reasons else 'no data'}); lower the shots or the ways"
        )
    return kept
