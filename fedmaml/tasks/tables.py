"""Tabular data (CSV or Parquet) read through pandas: one user's table or many users' table.

* :func:`read_table` reads a ``.csv`` or ``.parquet`` file (by suffix).
* :func:`table_to_tensors` turns feature columns and a label column into x float32 [n, d] and
  y long [n] (classification, labels 0..C-1) or float32 [n, 1] (regression).
* :func:`split_by_user` groups rows by a user column.
* :class:`TableSource` is a TaskSource: one client per user (or, without a user column, rows
  partitioned into clients by :mod:`fedmaml.tasks.partition`), each client's rows split into a
  training pool and a held-out pool, and a seeded share of clients held out as unseen clients.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData, EpisodeSpec
from fedmaml.tasks.partition import holdout_split, keep_usable, partition_rows, split_groups

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".parquet", ".pq")


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The table at ``path`` (CSV or Parquet by suffix), with at least one row."""
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise FedmamlError(
            f"{path}: unsupported table format {suffix or '(no suffix)'!r}; "
            "save it as .csv or .parquet"
        )
    if not path.is_file():
        raise FedmamlError(f"{path}: no such file; check the path of the table")
    if path.stat().st_size == 0:
        raise FedmamlError(f"{path}: the file is empty; write a header row and data rows")
    try:
        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedmamlError(
            f"{path}: cannot read it as {suffix[1:]} ({reason}); "
            f"check that the file is a valid {suffix[1:]} table"
        ) from None
    if df.empty:
        raise FedmamlError(f"{path}: the table has no data rows; add rows below the header")
    return df


def table_to_tensors(
    df: pd.DataFrame,
    *,
    label_column: str,
    feature_columns: Sequence[str] | None = None,
    classification: bool | None = None,
    num_classes: int | None = None,
    exclude_columns: Sequence[str] = (),
    source: str = "table",
) -> tuple[Tensor, Tensor]:
    """(x float32 [n, d], y) from ``df``.

    ``feature_columns=None`` takes every numeric column other than the label and
    ``exclude_columns`` (e.g. the user column). ``classification=None`` infers it: integer or
    boolean labels mean classification (y long [n]), others regression (y float32 [n, 1]).
    """
    features = resolve_features(df, label_column, feature_columns, exclude_columns, source)
    x = np.stack([_numeric(df, c, source) for c in features], axis=1).astype(np.float32)
    labels = _numeric(df, label_column, source)
    if classification is None:
        classification = _integer_labels(df, label_column)
    if not classification:
        return torch.from_numpy(x), torch.from_numpy(labels.astype(np.float32)).unsqueeze(1)
    return torch.from_numpy(x), class_labels(labels, num_classes, label_column, source)


def resolve_features(
    df: pd.DataFrame,
    label_column: str,
    feature_columns: Sequence[str] | None,
    exclude_columns: Sequence[str] = (),
    source: str = "table",
) -> list[str]:
    """The feature columns: those named, or every numeric column but the label and excluded."""
    import pandas as pd

    if df.empty:
        raise FedmamlError(f"{source}: the table has no rows; give it data rows")
    wanted = [label_column, *(feature_columns or ())]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise FedmamlError(
            f"{source}: missing column(s) {missing}; the table has {list(df.columns)}; "
            "fix the column names in the configuration or the file"
        )
    if feature_columns:
        return list(feature_columns)
    skip = {label_column, *exclude_columns}
    others = [c for c in df.columns if c not in skip]
    numeric = [
        c
        for c in others
        if pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    ]
    if len(numeric) < len(others):
        log.info(
            "%s: ignoring non-numeric columns %s", source, [c for c in others if c not in numeric]
        )
    if not numeric:
        raise FedmamlError(
            f"{source}: no numeric feature column besides {sorted(skip)} in {list(df.columns)}; "
            "name the feature columns (feature-columns) or encode them as numbers"
        )
    return numeric


def split_by_user(df: pd.DataFrame, user_column: str) -> dict[str, pd.DataFrame]:
    """Rows of each user, keyed by the user id as text, in sorted order of the ids."""
    if user_column not in df.columns:
        raise FedmamlError(
            f"user column {user_column!r} is missing; the table has {list(df.columns)}; "
            "name the user column (user-column) or leave it empty to partition the rows"
        )
    users = df[user_column]
    if users.isna().any():
        raise FedmamlError(
            f"{int(users.isna().sum())} rows have no value in user column {user_column!r}; "
            "fill or drop them"
        )
    groups = {key: part for key, part in df.groupby(user_column, sort=True)}
    return {str(key): groups[key] for key in groups}


def _numeric(df: pd.DataFrame, column: str, source: str) -> np.ndarray:
    import pandas as pd

    series = df[column]
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        converted = pd.to_numeric(series, errors="coerce")
        bad = converted.isna() & series.notna()
        if bad.any():
            row = series.index[int(np.flatnonzero(bad.to_numpy())[0])]
            raise FedmamlError(
                f"{source}: column {column!r} has {int(bad.sum())} non-numeric value(s) (first "
                f"at row {row}); encode them as numbers or drop the column"
            )
        series = converted
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    not_finite = ~np.isfinite(values)
    if not_finite.any():
        first = series.index[int(np.flatnonzero(not_finite)[0])]
        raise FedmamlError(
            f"{source}: column {column!r} has {int(not_finite.sum())} rows with a missing, NaN "
            f"or infinite value (first at row {first}); fill or drop them"
        )
    return values


def _integer_labels(df: pd.DataFrame, column: str) -> bool:
    import pandas as pd

    series = df[column]
    return bool(pd.api.types.is_integer_dtype(series) or pd.api.types.is_bool_dtype(series))


def class_labels(labels: np.ndarray, num_classes: int | None, column: str, source: str) -> Tensor:
    whole = labels == np.round(labels)
    limit = np.inf if num_classes is None else num_classes
    bad = np.flatnonzero(~whole | (labels < 0) | (labels >= limit))
    if bad.size:
        allowed = "integers >= 0" if num_classes is None else f"integers 0..{num_classes - 1}"
        raise FedmamlError(
            f"{source}: label column {column!r} has {bad.size} row(s) whose label is not a class "
            f"id (first at row {int(bad[0])}); classification labels must be {allowed}"
        )
    return torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class RowPartition:
    """How rows become clients when a table has no user column (see :func:`partition_rows`);
    ``num_partitions=None`` means num_train_clients + num_heldout_clients clients."""

    scheme: str = "iid"
    num_partitions: int | None = None
    alpha: float = 0.5
    classes_per_partition: int = 2


class TableSource:
    """Any table by user, as a TaskSource.

    Clients: one per user of ``user_column`` (ids sorted as text); with ``user_column=""`` the
    rows are partitioned into clients as ``partition`` says (iid, dirichlet or pathological).
    Clients that cannot give ``spec``'s episodes are skipped (logged; reasons in ``dropped``).
    ``num_heldout_clients`` of the rest are held out as unseen clients and ``num_val_clients``
    kept for validation (:func:`split_groups`), and every client's rows
    are split into a training pool and a held-out pool of share ``heldout_fraction`` (stratified
    by class for classification). The whole table is validated and converted once, so
    ``client(i)`` only indexes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | pd.DataFrame,
        *,
        label_column: str = "label",
        user_column: str = "user",
        feature_columns: Sequence[str] | None = None,
        heldout_fraction: float = 0.2,
        seed: int = 0,
        num_heldout_clients: int = 0,
        num_train_clients: int | None = None,
        num_val_clients: int = 0,
        spec: EpisodeSpec | None = None,
        classification: bool | None = None,
        num_classes: int | None = None,
        partition: RowPartition | None = None,
    ) -> None:
        import pandas as pd

        df = path if isinstance(path, pd.DataFrame) else read_table(path)
        df = df.reset_index(drop=True)
        self.name = "table" if isinstance(path, pd.DataFrame) else str(path)
        self.spec, self.heldout_fraction = spec, heldout_fraction
        exclude = [user_column] if user_column else []
        self.feature_columns = resolve_features(
            df, label_column, feature_columns, exclude, self.name
        )
        if classification is None:
            classification = _integer_labels(df, label_column)
        self._x, self._y = table_to_tensors(
            df,
            label_column=label_column,
            feature_columns=self.feature_columns,
            classification=classification,
            num_classes=num_classes,
            source=self.name,
        )
        self.loss = "cross_entropy" if classification else "mse"
        self.num_classes = (num_classes or int(self._y.max()) + 1) if classification else None
        if user_column:
            rows = {
                u: np.array(p.index, dtype=np.int64)
                for u, p in split_by_user(df, user_column).items()
            }
        else:
            how = partition or RowPartition()
            rows = self._partition(
                df, label_column, how, num_train_clients, num_heldout_clients + num_val_clients,
                seed,
            )  # fmt: skip
        self._pools = {
            cid: self._pools_of(torch.from_numpy(idx), (seed * 1_000_003 + k) % 2**64)
            for k, (cid, idx) in enumerate(rows.items())
        }
        #: clients too small for the episodes, with the reason, dropped before the counts
        self.dropped: dict[str, str] = {}
        usable = keep_usable(list(rows), self._pool_labels, spec, "clients", self.dropped)
        self._ids = split_groups(
            usable,
            num_heldout_clients,
            seed,
            num_train_clients,
            num_val=num_val_clients,
            skipped=len(self.dropped),
        )
        self._clients: dict[tuple[str, int], ClientData] = {}

    def _partition(
        self,
        df: pd.DataFrame,
        label_column: str,
        how: RowPartition,
        num_train: int | None,
        num_heldout: int,
        seed: int,
    ) -> dict[str, np.ndarray]:
        n = how.num_partitions or (num_train or 0) + num_heldout
        if n < 1:
            raise FedmamlError(
                f"{self.name}: without a user column give the number of clients to split the "
                "rows into (num_partitions, or num-train-clients + num-heldout-clients)"
            )
        parts = partition_rows(
            df,
            n,
            scheme=how.scheme,
            label_column=label_column,
            alpha=how.alpha,
            classes_per_partition=how.classes_per_partition,
            seed=seed,
            min_rows=self._rows_needed(),
        )
        width = len(str(n - 1))
        return {f"part-{i:0{width}d}": idx for i, idx in enumerate(parts)}

    def _rows_needed(self) -> int:
        """Rows a client needs for one training episode in its training pool (and one held-out
        row): the least a Dirichlet partition gives each client."""
        if self.spec is None:
            return 1
        if self.spec.fraction is not None:  # whole sets: both must reach their sizes
            f = self.spec.fraction
            return math.ceil(max(self.spec.support / f, self.spec.query / (1 - f))) + 1
        per_episode = (self.spec.support + self.spec.query) * (self.spec.ways or 1)
        return math.ceil(per_episode / (1 - self.heldout_fraction)) + 1

    def _pool_labels(self, cid: str) -> tuple[Tensor, Tensor | None]:
        train, test = self._pools[cid]
        return self._y[train], self._y[test] if self.heldout_fraction else None

    def _pools_of(self, rows: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        train, test = holdout_split(
            self._y[rows],
            self.heldout_fraction,
            torch.Generator().manual_seed(seed),
            stratify=self.loss == "cross_entropy",
        )
        return rows[train], rows[test]

    def client_ids(self, split: str = "train") -> list[str]:
        return list(self._split(split))

    def num_clients(self, split: str) -> int:
        return len(self._split(split))

    def model_kwargs(self) -> dict[str, int]:
        if self.num_classes is None:
            out = 1
        else:
            out = self.spec.ways if self.spec is not None and self.spec.ways else self.num_classes
        return {"in_features": int(self._x.shape[1]), "out_features": out}

    def client(self, index: int, split: str = "train") -> ClientData:
        ids = self._split(split)
        if not 0 <= index < len(ids):
            raise FedmamlError(
                f"{self.name}: {split} client {index} does not exist (0..{len(ids) - 1})"
            )
        key = (split, index)
        if key not in self._clients:
            cid = ids[index]
            train, test = self._pools[cid]
            self._clients[key] = ClientData(
                client_id=cid,
                x=self._x[train],
                y=self._y[train],
                x_test=self._x[test],
                y_test=self._y[test],
                meta={"source": self.name, "user": cid},
            )
        return self._clients[key]

    def _split(self, split: str) -> list[str]:
        if split not in self._ids:
            raise FedmamlError(f"unknown split {split!r}; use 'train', 'val' or 'heldout'")
        return self._ids[split]
