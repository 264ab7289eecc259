"""One device's own data (task ``local``): a deployed SuperNode trains on the file it names.

Formats (``fmt``, inferred from the path by :func:`infer_format` when not given):

* ``csv`` / ``parquet``: a table read with pandas (:func:`~fedmaml.tasks.tables.read_table`):
  feature columns (named, or every numeric column but the label) and a label column;
* ``npz``: numpy arrays ``x`` [n, ...] (examples) and ``y`` [n] (labels or targets);
* ``leaf``: one LEAF JSON file in FEMNIST's layout (784 grey levels per example, 1.0 = white),
  parsed by :mod:`fedmaml.tasks.femnist` (x = ink = 1 - grey, [n, 1, 28, 28]); a file holding
  several users needs ``user``;
* ``images``: a folder ``<root>/<class>/<image>`` (PNG, JPEG, BMP, GIF, WebP). Class folders
  named by integers (``0``, ``7``) are those labels, so every device means the same class by
  the same label; other names are numbered 0..k-1 in sorted order on each device (fine for
  N-way episodes, which renumber labels per episode).

The model is fixed by the run configuration, never by one device's data: with ``input_shape``
every example is reshaped to it (images are converted to its C channels, 1 = grey or 3 = RGB,
and resized to its H x W by area averaging), and with ``num_classes`` labels must be class ids
0..num_classes-1; ``num_classes=0`` means regression (float targets [n, 1]) and ``None`` infers
it (integer labels = classification). Values must be finite. The examples are split, seeded,
into a training pool and a held-out pool of share ``heldout_fraction`` (per class for
classification, every class keeping a training example); with ``spec`` the pools must give a
training and an evaluation episode, or a :class:`FedmamlError` says what is short.

A deployed ClientApp is a new process per message, so it reads the file every round: with a
``cache_dir`` the decoded examples of tables, LEAF files and image folders are kept as ``.npz``
(keyed by the files' size and modification time and the decoding settings), which spares
later messages pandas, JSON parsing and image decoding. NPZ files are read directly.

:class:`LocalSource` is the task's source on the server: no clients, and the model built from
the run configuration alone (:func:`local_model_kwargs`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData, EpisodeSpec
from fedmaml.tasks.partition import episode_problem, holdout_split
from fedmaml.tasks.source import SPLITS
from fedmaml.tasks.tables import class_labels, read_table, table_to_tensors

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "npz", "leaf", "images")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".npz": "npz",
    ".json": "leaf",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_MODES = {1: "L", 3: "RGB"}


def infer_format(path: str | os.PathLike[str]) -> str:
    """``images`` for a folder, else the format of the file's suffix."""
    path = Path(path)
    if path.is_dir():
        return "images"
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise FedmamlError(
            f"{path}: cannot tell the data format from suffix {path.suffix or '(none)'!r}; "
            f"name it .csv, .parquet, .npz or .json, point at a folder of images, or give "
            f"the format (data-format = one of {', '.join(FORMATS)})"
        ) from None


def load_local(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    input_shape: Sequence[int] = (),
    num_classes: int | None = None,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    user: str | None = None,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    spec: EpisodeSpec | None = None,
    client_id: str = "",
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClientData:
    """The device's examples at ``path`` as a ClientData (see the module docstring).

    With ``cache_dir``, the decoded examples of a table, LEAF file or image folder are kept
    there (one ``.npz`` per file version and settings), so that later calls, e.g. the next
    round's ClientApp process, skip pandas, JSON parsing and image decoding.
    """
    path = Path(path).expanduser()
    x, y = read_examples(
        path,
        fmt=fmt,
        input_shape=input_shape,
        num_classes=num_classes,
        label_column=label_column,
        feature_columns=feature_columns,
        user=user,
        cache_dir=cache_dir,
    )
    if len(x) == 0:
        raise FedmamlError(f"{path}: no examples; the device needs labelled data to take part")
    fmt = fmt or infer_format(path)
    source = str(path)
    classification = not torch.is_floating_point(y)
    g = torch.Generator().manual_seed(seed % 2**64)
    train, test = holdout_split(y, heldout_fraction, g, stratify=classification)
    client = ClientData(
        client_id or path.stem,
        x[train],
        y[train],
        x[test],
        y[test],
        meta={"source": source, "format": fmt},
    )
    if spec is not None:
        problem = episode_problem(client.client_id, client.y, client.y_test, spec)
        if problem:
            raise FedmamlError(f"{path}: {problem}")
    return client


def read_examples(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    input_shape: Sequence[int] = (),
    num_classes: int | None = None,
    label_column: str = "label",
    feature_columns: Sequence[str] | None = None,
    user: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """The examples at ``path`` (x float [n, *input_shape], reshaped to it when given; images
    resized to its H x W) and their labels (long [n]) or targets (float [n, 1]), unsplit: what
    a device and a user's personalization both read (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FedmamlError(f"{path}: no such file or folder; check the data path (data-path)")
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise FedmamlError(f"data format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    settings = (fmt, list(input_shape), num_classes, label_column, feature_columns, user)
    decode = functools.partial(_decode, path, *settings)
    if cache_dir is None or fmt == "npz":
        x, y = decode()
    else:
        x, y = _cached(Path(cache_dir), path, settings, decode)
    return _reshaped(x, input_shape, str(path)), y


def _decode(
    path: Path,
    fmt: str,
    input_shape: Sequence[int],
    num_classes: int | None,
    label_column: str,
    feature_columns: Sequence[str] | None,
    user: str | None,
) -> tuple[Tensor, Tensor]:
    """Examples x float32 [n, ...] and labels (long [n]) or targets (float32 [n, 1])."""
    source = str(path)
    if fmt in ("csv", "parquet"):
        return table_to_tensors(
            read_table(path),
            label_column=label_column,
            feature_columns=feature_columns,
            classification=None if num_classes is None else num_classes > 0,
            num_classes=num_classes or None,
            source=source,
        )
    if fmt == "npz":
        features, labels = _read_npz(path)
        return _finite_inputs(features, source), _targets(labels, num_classes, source)
    if fmt == "leaf":
        x, y = _read_leaf(path, user)
        return x, _targets(y.numpy(), num_classes, source)
    x, labels = _read_images(path, input_shape)
    return x, _targets(labels, num_classes, source)


def _cached(
    cache_dir: Path, path: Path, settings: tuple, decode: Callable[[], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """``decode()``, kept in ``cache_dir`` under a key of the data's path, size and modification
    time (of every file, for a folder) and the decoding settings. A data file that fails its
    checks is never cached, so it is checked again on the next call."""
    from fedmaml.atomic import atomic_write

    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha1(json.dumps([str(path.resolve()), stamp, settings]).encode()).hexdigest()
    file = cache_dir / f"{path.stem[:40]}-{key[:20]}.npz"
    if file.is_file():
        try:
            with np.load(file, allow_pickle=False) as data:
                return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass  # unreadable: decode again and replace it
    x, y = decode()
    try:
        atomic_write(file, lambda f: np.savez(f, x=x.numpy(), y=y.numpy()), mode="wb")
    except (FedmamlError, OSError) as exc:
        log.warning("not caching %s: %s", path, exc)
    return x, y


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise FedmamlError(
                    f"{path}: the npz file holds arrays {sorted(data.files)}, not {missing}; "
                    "save the examples as 'x' and the labels as 'y' (np.savez(path, x=x, y=y))"
                )
            x, y = data["x"], data["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedmamlError(
            f"{path}: cannot read it as npz ({exc}); write it with np.savez(path, x=x, y=y)"
        ) from None
    if x.ndim < 2 or len(x) != len(y):
        raise FedmamlError(
            f"{path}: x has shape {x.shape} and y {y.shape}; x needs one row per example "
            "([n, features] or [n, C, H, W]) and y one label per row"
        )
    return x, y


def _read_leaf(path: Path, user: str | None) -> tuple[Tensor, Tensor]:
    from fedmaml.tasks.femnist import read_leaf_file

    users = read_leaf_file(path)
    if user is None and len(users) == 1:
        user = next(iter(users))
    if user not in users:
        wanted = "which one is this device's" if user is None else f"not user {user!r}"
        raise FedmamlError(
            f"{path}: the LEAF file holds {len(users)} users, {wanted}; name the device's user "
            "(node config user=ID, fedmaml client --user ID; the file's 'users' list has the ids)"
        )
    return users[user]


def _read_images(root: Path, input_shape: Sequence[int]) -> tuple[Tensor, np.ndarray]:
    """Images of ``root/<class>/*`` as float [n, C, H, W] in [0, 1], and their labels."""
    from PIL import Image, UnidentifiedImageError

    if input_shape and (len(input_shape) != 3 or input_shape[0] not in _MODES):
        raise FedmamlError(
            f"{root}: a folder of images needs input-shape C,H,W with C = 1 (grey) or 3 (RGB), "
            f"not {','.join(map(str, input_shape))}"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise FedmamlError(
            f"{root}: no class folders; put each class's images in <root>/<class>/ "
            "(e.g. images/0/a.png, images/1/b.png)"
        )
    names = [f.name for f in folders]
    ids = [int(n) for n in names] if all(n.isdigit() for n in names) else range(len(names))
    images, labels = [], []
    shape = tuple(input_shape)
    for folder, label in zip(folders, ids, strict=True):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    shape = shape or (1 if img.mode in ("1", "L", "I", "F") else 3, *img.size[::-1])
                    c, h, w = shape
                    pixels = img.convert(_MODES[c]).resize((w, h), Image.Resampling.BOX)
                    array = np.asarray(pixels, dtype=np.float32).reshape(h, w, c) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise FedmamlError(
                    f"{file}: not a readable image ({exc}); replace or remove it"
                ) from None
            images.append(array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise FedmamlError(
            f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return torch.from_numpy(np.stack(images)), np.asarray(labels, dtype=np.int64)


def _finite_inputs(x: np.ndarray, source: str) -> Tensor:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise FedmamlError(f"{source}: x has dtype {x.dtype}; the examples must be numbers")
    values = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    bad = ~torch.isfinite(values.view(len(values), -1)).all(dim=1)
    if bad.any():
        raise FedmamlError(
            f"{source}: {int(bad.sum())} examples hold NaN or infinite values (first: example "
            f"{int(bad.nonzero()[0])}); fill or drop them"
        )
    return values


def _targets(y: np.ndarray, num_classes: int | None, source: str) -> Tensor:
    """Labels long [n] (classification) or targets float [n, 1] (regression)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        raise FedmamlError(
            f"{source}: labels have shape {y.shape} and dtype {y.dtype}; give one number per "
            "example"
        )
    values = y.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise FedmamlError(
            f"{source}: {int(bad.sum())} labels are NaN or infinite (first: example "
            f"{int(np.flatnonzero(bad)[0])}); fill or drop them"
        )
    if num_classes is None:
        classification = bool(np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_)
    else:
        classification = num_classes > 0
    if not classification:
        return torch.from_numpy(values.astype(np.float32)).unsqueeze(1)
    return class_labels(values, num_classes or None, "y", source)


def _reshaped(x: Tensor, input_shape: Sequence[int], source: str) -> Tensor:
    """x [n, *input_shape] (same values, reshaped), or an error naming both shapes."""
    shape = tuple(input_shape)
    if not shape or tuple(x.shape[1:]) == shape:
        return x
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise FedmamlError(
            f"{source}: each example has shape {tuple(x.shape[1:])} "
            f"({math.prod(x.shape[1:])} values) but the run's input-shape is "
            f"{','.join(map(str, shape))} ({math.prod(shape)} values); give data of that shape "
            "(or name the feature columns) or submit the run with the data's input-shape"
        )
    return x.reshape(len(x), *shape)


def local_model_kwargs(
    model: str, input_shape: Sequence[int], num_classes: int, ways: int = 0
) -> dict[str, int]:
    """Arguments of ``model`` for examples of ``input_shape`` and ``ways or num_classes``
    outputs (1 for regression, ``num_classes=0``)."""
    shape, out = tuple(input_shape), ways or num_classes or 1
    if model == "mlp" and len(shape) == 1:
        return {"in_features": shape[0], "out_features": out}
    if model == "conv4" and len(shape) == 3 and shape[1] == shape[2]:
        return {"ways": out, "in_channels": shape[0], "image_size": shape[1]}
    if model == "femnist_cnn" and shape == (1, 28, 28):
        return {"num_classes": out}
    raise FedmamlError(
        f"model {model!r} does not take input-shape {','.join(map(str, shape))}; use "
        "model = 'mlp' with input-shape = d, 'conv4' with C,S,S (square images) or "
        "'femnist_cnn' with 1,28,28"
    )


class LocalSource:
    """Task ``local`` on the server: no client data, the model from the run config alone."""

    def __init__(
        self, model: str, input_shape: Sequence[int], num_classes: int, ways: int = 0
    ) -> None:
        self.loss = "cross_entropy" if num_classes else "mse"
        self._kwargs = local_model_kwargs(model, input_shape, num_classes, ways)

    def num_clients(self, split: str) -> int:
        if split not in SPLITS:
            raise FedmamlError(f"unknown split {split!r}; use 'train' or 'heldout'")
        return 0

    def client(self, index: int, split: str = "train") -> ClientData:
        raise FedmamlError(
            "task 'local' keeps every client's data on its own device; the server holds none "
            "(each SuperNode names its file with data-path in its node config)"
        )

    def model_kwargs(self) -> dict[str, int]:
        return dict(self._kwargs)
