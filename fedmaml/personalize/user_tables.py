"""Users read from tables: one table with a user column, a folder of one table per user, or one
user's table; the label and feature columns default to the checkpoint's."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.personalize.global_model import GlobalModel
from fedmaml.personalize.user_data import Pair

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class TableUsers:
    """Users read from tables: (x, y) per user, and the columns they came from."""

    users: dict[str, Pair]
    columns: dict[str, Any]


def load_table_users(
    g: GlobalModel,
    data: pd.DataFrame | str | os.PathLike,
    *,
    label_column: str | None,
    feature_columns: Sequence[str] | None = None,
    user_column: str | None = None,
) -> TableUsers:
    """Users of a table with a user column, of a folder of one table per user (the user is the
    file's name without suffix), or the single user of one table. The feature columns are
    resolved once and shared by every user; labels are class ids when the model has C > 1
    outputs (checked against 0..C-1), else regression targets."""
    import pandas as pd

    from fedmaml.tasks.tables import SUFFIXES, read_table, resolve_features, split_by_user

    label_column, feature_columns = _table_columns(g, label_column, feature_columns)
    outputs = g.num_outputs
    kinds = {"classification": outputs > 1, "num_classes": outputs} if outputs else {}
    if isinstance(data, str | os.PathLike) and Path(data).is_dir():
        if user_column:
            raise FedmamlError(
                f"{data} is a folder of one table per user; drop the user column or give one "
                "table with a user column"
            )
        files = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise FedmamlError(f"{data} holds no .csv or .parquet file; put one table per user")
        frames = {p.stem: read_table(p) for p in files}
        if len(frames) < len(files):
            raise FedmamlError(f"{data}: two files share a user name (e.g. a.csv and a.parquet)")
    else:
        name = str(data) if isinstance(data, str | os.PathLike) else "table"
        df = data if isinstance(data, pd.DataFrame) else read_table(data)
        df = df.reset_index(drop=True)
        frames = {name: df}
    exclude = [c for c in (user_column, g.run.user_column if g.run else "") if c]
    first_name, first = next(iter(frames.items()))
    features = resolve_features(first, label_column, feature_columns, exclude, first_name)
    users: dict[str, Pair] = {}
    for name, df in frames.items():
        x, y = _table_tensors(df, label_column, features, kinds, name)
        if user_column:
            for user, part in split_by_user(df, user_column).items():
                rows = torch.tensor(part.index.to_numpy())
                users[user] = (x[rows], y[rows])
        else:
            _refuse_mixed_users(df, (g.run or RunConfig()).user_column or "user", name)
            users[name] = (x, y)
    return TableUsers(users, {"label_column": label_column, "feature_columns": features})


def _refuse_mixed_users(df: pd.DataFrame, column: str, name: str) -> None:
    """A table read as one user must not hold several users' rows under a user column."""
    if column in df.columns and df[column].nunique() > 1:
        raise FedmamlError(
            f"{name} holds {df[column].nunique()} users in column {column!r} but is read as one "
            f"user; give --user-column {column} (user_column=) and an output folder, or one "
            "user's rows"
        )


def _table_columns(
    g: GlobalModel, label: str | None, features: Sequence[str] | None
) -> tuple[str, Sequence[str] | None]:
    """The label and feature columns: those given, else the checkpoint's (``label-column`` and
    ``feature-columns`` of a table run; ``y`` and ``x`` for the sinusoid task)."""
    run = g.run
    if run is not None and run.task == "sine":
        return label or "y", features or ["x"]
    if run is not None and run.task == "table":
        return label or run.label_column, features or run.feature_column_list
    if not label:
        raise FedmamlError("name the label column of the table (label_column / --label-column)")
    return label, features


def _table_tensors(
    df: pd.DataFrame, label: str, features: list[str], kinds: dict[str, Any], name: str
) -> Pair:
    from fedmaml.tasks.tables import table_to_tensors

    return table_to_tensors(df, label_column=label, feature_columns=features, source=name, **kinds)
