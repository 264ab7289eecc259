"""Users read from files for personalization and prediction: tables, LEAF JSON, ``.npz`` and
folders of images by class, each prepared for the model by the checkpoint's own input
preprocessing (:func:`fedmaml.tasks.inputs.model_inputs`).

=====================================  =================================================
``--data``                             users
=====================================  =================================================
``.csv`` / ``.parquet``                one user, or many with a user column (tables.py);
                                       an image model's pixel columns are reshaped to its
                                       input shape (e.g. 784 columns -> 1 x 28 x 28)
``.json`` (LEAF)                       every user of the file, by LEAF id (``users``
                                       selects some)
``.npz`` with ``x``, ``y``             one user (the file's name)
folder of class folders of images      one user (the folder's name); ``<root>/<class>/``
folder of ``.csv``/``.parquet``/       one user per file (the file's name) or, for LEAF
``.npz``/``.json`` files               files, per LEAF id
=====================================  =================================================

Files are read by the device's own reader (:func:`fedmaml.tasks.local.read_examples`); a file
that fits none of these is one error naming the formats.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmaml.errors import FedmamlError
from fedmaml.personalize.global_model import GlobalModel
from fedmaml.personalize.user_data import Pair
from fedmaml.personalize.user_tables import TableUsers, load_table_users
from fedmaml.tasks.inputs import model_inputs

if TYPE_CHECKING:
    import pandas as pd

TABLES = (".csv", ".parquet", ".pq")
PER_USER_FILES = (*TABLES, ".npz", ".json")
FORMATS_HELP = (
    "a table (.csv/.parquet; many users with --user-column), a LEAF .json file, an .npz file "
    "with arrays x and y, a folder of class folders of images, or a folder of one such file "
    "per user"
)


def load_users(
    g: GlobalModel,
    data: pd.DataFrame | str | os.PathLike,
    *,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    user_column: str | None = None,
    users: Sequence[str] | None = None,
) -> TableUsers:
    """The users of ``data`` (see the module docstring) as (x, y) prepared for the model, and
    the table columns they came from (tables only). ``users``: keep these ids only (an id that
    is absent is an error)."""
    columns = {"label_column": label_column, "feature_columns": feature_columns}
    if not isinstance(data, str | os.PathLike):
        return _prepared(g, load_table_users(g, data, user_column=user_column, **columns), users)
    path = Path(data).expanduser()
    if not path.exists():
        raise FedmamlError(f"{path}: no such file or folder; give {FORMATS_HELP}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        classes = [p for p in path.iterdir() if p.is_dir()]
        if classes and not [f for f in files if f.suffix.lower() in PER_USER_FILES]:
            return _prepared(g, _examples(g, path, "images", path.name), users)
        per_user = [f for f in files if f.suffix.lower() in PER_USER_FILES]
        if not per_user:
            raise FedmamlError(f"{path}: holds no data files; give {FORMATS_HELP}")
        kinds = {f.suffix.lower() in TABLES for f in per_user}
        if kinds == {True}:  # one table per user: columns resolved once for all of them
            return _prepared(
                g, load_table_users(g, path, user_column=user_column, **columns), users
            )
        found: dict[str, Pair] = {}
        for f in per_user:
            for name, pair in _file_users(g, f, label_column, feature_columns).items():
                if name in found:
                    raise FedmamlError(f"{path}: user {name!r} appears twice; give each once")
                found[name] = pair
        return _prepared(g, TableUsers(found, {}), users)
    suffix = path.suffix.lower()
    if suffix in TABLES:
        return _prepared(g, load_table_users(g, path, user_column=user_column, **columns), users)
    if suffix in (".json", ".npz"):
        found = _file_users(g, path, label_column, feature_columns)
        return _prepared(g, TableUsers(found, {}), users)
    raise FedmamlError(f"{path}: cannot read a {suffix or 'suffix-less'} file; give {FORMATS_HELP}")


def _file_users(
    g: GlobalModel, path: Path, label_column: str | None, features: Sequence[str] | None
) -> dict[str, Pair]:
    """The users of one per-user file: a table or ``.npz`` is one user (its name), a LEAF file
    all of its users."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        from fedmaml.tasks.femnist import read_leaf_file

        return read_leaf_file(path)
    if suffix == ".npz":
        return {path.stem: _examples(g, path, "npz", path.stem).users[path.stem]}
    tables = load_table_users(g, path, label_column=label_column, feature_columns=features)
    return {path.stem: next(iter(tables.users.values()))}


def _examples(g: GlobalModel, path: Path, fmt: str, name: str) -> TableUsers:
    """One user's examples of an ``.npz`` file or an image folder, read at the model's input
    shape with class ids when the model is a classifier."""
    from fedmaml.tasks.local import read_examples

    spec = g.inputs
    outputs = g.num_outputs
    x, y = read_examples(
        path,
        fmt=fmt,
        input_shape=spec.shape if spec is not None else (),
        num_classes=outputs if outputs and outputs > 1 else 0 if outputs else None,
    )
    return TableUsers({name: (x, y)}, {})


def _prepared(g: GlobalModel, tables: TableUsers, users: Sequence[str] | None) -> TableUsers:
    """Keep the ``users`` asked for, and prepare every user's inputs for the model."""
    found = tables.users
    if users:
        missing = [u for u in users if u not in found]
        if missing:
            shown = ", ".join(list(found)[:5]) + (" ..." if len(found) > 5 else "")
            raise FedmamlError(
                f"no user {missing[0]!r} in the data (it holds {len(found)} users: {shown}); "
                "give ids the data has"
            )
        found = {u: found[u] for u in users}
    if not found:
        raise FedmamlError("the data holds no users; give at least one user's examples")
    spec = g.inputs
    columns: dict[str, Any] = dict(tables.columns)
    if spec is None or (not spec.ink and len(spec.shape) <= 1):  # features: checked as they are
        return TableUsers(dict(found), columns)
    prepared = {u: (model_inputs(x, spec, f"user {u!r}"), y) for u, (x, y) in found.items()}
    return TableUsers(prepared, columns)
