"""FEMNIST (LEAF; Caldas et al., 2018): handwritten digits and letters, one client per writer.

Two inputs give the same writers (:class:`Pools` per writer id):

* LEAF's JSON files (:func:`read_leaf`): a folder with ``train/*.json`` and ``test/*.json`` (or
  a folder holding one such folder), or a ``.tar``/``.tar.xz``/``.tar.gz`` of it read with
  :mod:`tarfile`. Each file is ``{"users", "num_samples", "user_data": {writer: {"x": [[784
  grey levels / 255]], "y": [0..61]}}}`` with 1.0 = white background. A writer's LEAF train
  part is its training pool and its LEAF test part its held-out pool.
* A ``datasets.Dataset`` with columns ``image`` (28 x 28), ``character`` (0..61) and
  ``writer_id`` (:func:`writers_from_dataset`), e.g. flwr-datasets' ``flwrlabs/femnist``
  (:func:`load_flwr_femnist`, which downloads only when asked) or a copy saved with
  ``save_to_disk``. It has no per-writer split, so each writer's images are split, seeded,
  into pools with held-out share ``heldout_fraction`` (0.1, LEAF's ``--tf 0.9``). Its images
  are inverted when their median grey level is bright (white background).

Images become x = ink = 1 - grey, shape [1, 28, 28] (:func:`fedmaml.tasks.inputs.model_inputs`
with :data:`INPUTS`, the preprocessing every FEMNIST checkpoint records), labels y long in
0..61 (digits, A-Z, a-z).
Writers that cannot give the requested episodes are skipped (count logged, reasons in
``FemnistSource.dropped``) *before* the client counts are checked; of the rest,
``num_heldout_clients`` are held out as unseen (test) clients and ``num_val_clients`` kept for
validation (seeded, see :func:`~fedmaml.tasks.partition.split_groups`).
"""

from __future__ import annotations

import functools
import json
import logging
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData, EpisodeSpec
from fedmaml.tasks.inputs import InputSpec, model_inputs
from fedmaml.tasks.partition import holdout_split, keep_usable, split_groups

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

NUM_CLASSES = 62
SIDE = 28
#: FEMNIST's preprocessing: 28 x 28 grey levels (1.0 = white paper) become ink = 1 - grey
INPUTS = InputSpec((1, SIDE, SIDE), ink=True)
HF_DATASET = "flwrlabs/femnist"
HF_COLUMNS = ("image", "character", "writer_id")


class Pools(NamedTuple):
    """One writer's training pool and held-out pool: x ink [n, 1, 28, 28], y long [n]."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor


def read_leaf(path: str | os.PathLike[str]) -> dict[str, Pools]:
    """Writers of LEAF FEMNIST JSON files (folder or tar archive), cached per process."""
    path = Path(path)
    if not path.exists():
        raise FedmamlError(
            f"{path}: no such file or folder; give LEAF's femnist folder (train/ and test/ "
            "JSON files), its tar archive, or a saved datasets copy of flwrlabs/femnist"
        )
    return _read_leaf_cached(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_leaf_cached(path: str, mtime_ns: int) -> dict[str, Pools]:
    parts: dict[str, dict[str, tuple[list, list]]] = {"train": {}, "test": {}}
    for part, name, data in _leaf_files(Path(path)):
        for writer, (x, y) in _leaf_users(data, name).items():
            xs, ys = parts[part].setdefault(writer, ([], []))
            xs.append(x)
            ys.append(y)
    if not parts["train"]:
        raise FedmamlError(f"{path}: the LEAF train/*.json files hold no writers")
    if not parts["test"]:
        log.warning("%s: no LEAF test/*.json files; writers have no held-out pool", path)
    return {
        w: Pools(*_stack(parts["train"][w]), *_stack(parts["test"].get(w, ([], []))))
        for w in sorted(parts["train"])
    }


def _leaf_files(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(part, file name, parsed JSON) of every train/test JSON file under ``path``."""
    if path.is_file():
        yield from _tar_files(path)
        return
    roots = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
    root = next((r for r in roots if (r / "train").is_dir()), None)
    if root is None:
        raise FedmamlError(
            f"{path}: no train/ folder of LEAF JSON files (expected {path}/train/*.json and "
            f"{path}/test/*.json, or one subfolder holding them)"
        )
    for part in ("train", "test"):
        for file in sorted((root / part).glob("*.json")):
            yield part, str(file), _parse(file.read_bytes(), str(file))


def _tar_files(path: Path) -> Iterator[tuple[str, str, Any]]:
    try:
        with tarfile.open(path) as tf:
            found = False
            for member in tf:
                parts = member.name.split("/")
                part = parts[-2] if len(parts) >= 2 else ""
                if member.isfile() and member.name.endswith(".json") and part in ("train", "test"):
                    found = True
                    data = tf.extractfile(member)
                    assert data is not None
                    name = f"{path}:{member.name}"
                    yield part, name, _parse(data.read(), name)
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as exc:
        raise FedmamlError(
            f"{path}: not a readable tar archive ({exc}); download or pack it again"
        ) from None
    if not found:
        raise FedmamlError(f"{path}: no train/*.json or test/*.json members; give LEAF's femnist")


def _parse(raw: bytes, name: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedmamlError(f"{name}: not valid JSON ({exc}); regenerate it with LEAF") from None


def _leaf_users(data: Any, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(data, dict) or not isinstance(data.get("user_data"), dict):
        raise FedmamlError(f"{name}: no 'user_data' object; not a LEAF JSON file")
    out = {}
    for writer, record in data["user_data"].items():
        try:
            x = np.asarray(record["x"], dtype=np.float32).reshape(-1, SIDE * SIDE)
            y = np.asarray(record["y"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise FedmamlError(
                f"{name}: writer {writer} has malformed x/y ({exc}); each x must be 784 numbers "
                "and each y an integer"
            ) from None
        out[str(writer)] = (x, _checked_labels(y, len(x), f"{name}: writer {writer}"))
    return out


def _checked_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if len(y) != n:
        raise FedmamlError(f"{where}: {n} images but {len(y)} labels; give one label per image")
    bad = np.unique(y[(y < 0) | (y >= NUM_CLASSES)])
    if bad.size:
        raise FedmamlError(f"{where}: labels {bad[:5].tolist()} outside 0..61")
    return y


def read_leaf_file(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Every user of one LEAF JSON file as (x ink [n, 1, 28, 28], y long [n])."""
    users = _leaf_users(_parse(path.read_bytes(), str(path)), str(path))
    return {user: _stack(([x], [y])) for user, (x, y) in users.items()}


def _stack(part: tuple[list, list]) -> tuple[Tensor, Tensor]:
    xs, ys = part
    if not xs:
        return torch.empty(0, 1, SIDE, SIDE), torch.empty(0, dtype=torch.long)
    grey = torch.from_numpy(np.concatenate(xs)).view(-1, 1, SIDE, SIDE)
    return model_inputs(grey, INPUTS), torch.from_numpy(np.concatenate(ys))


def writers_from_dataset(
    ds: Dataset, *, heldout_fraction: float = 0.1, seed: int = 0, batch_size: int = 4096
) -> dict[str, Pools]:
    """Writers of a ``datasets.Dataset`` with columns image, character and writer_id."""
    missing = [c for c in HF_COLUMNS if c not in ds.column_names]
    if missing:
        raise FedmamlError(
            f"the dataset lacks column(s) {missing} (it has {ds.column_names}); give FEMNIST "
            f"with columns {', '.join(HF_COLUMNS)} such as {HF_DATASET}"
        )
    if len(ds) == 0:
        raise FedmamlError("the FEMNIST dataset has no rows")
    images, labels, writers = [], [], []
    for batch in ds.select_columns(list(HF_COLUMNS)).with_format("numpy").iter(batch_size):
        img = np.asarray(batch["image"], dtype=np.float32)
        img = img.mean(axis=-1) if img.ndim == 4 else img
        if img.shape[1:] != (SIDE, SIDE):
            raise FedmamlError(f"FEMNIST images are {img.shape[1:]}, expected 28 x 28")
        images.append(img / 255.0 if img.max() > 1.0 else img)  # per batch, as stored
        labels.append(np.asarray(batch["character"], dtype=np.int64))
        writers.append(np.asarray(batch["writer_id"]).astype(str))
    ink = model_inputs(torch.from_numpy(np.concatenate(images)).unsqueeze(1), INPUTS)
    y = torch.from_numpy(_checked_labels(np.concatenate(labels), len(ink), "the dataset"))
    ids = np.concatenate(writers)
    out = {}
    for writer in sorted(set(ids.tolist())):
        rows = torch.from_numpy(np.flatnonzero(ids == writer))
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(writer.encode())) % 2**64)
        train, test = holdout_split(y[rows], heldout_fraction, g, stratify=False)
        out[writer] = Pools(ink[rows[train]], y[rows[train]], ink[rows[test]], y[rows[test]])
    return out


def load_flwr_femnist(*, allow_download: bool = False) -> Dataset:
    """The full ``flwrlabs/femnist`` train split through flwr-datasets (needs the internet, or
    the Hugging Face cache). Nothing is fetched unless ``allow_download=True``."""
    if not allow_download:
        raise FedmamlError(
            f"loading {HF_DATASET} downloads it from the Hugging Face Hub; pass "
            "allow_download=True (or data-path = 'flwrlabs/femnist') to allow it"
        )
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    fds = FederatedDataset(
        dataset=HF_DATASET, partitioners={"train": NaturalIdPartitioner(partition_by="writer_id")}
    )
    return fds.load_split("train")


class FemnistSource:
    """FEMNIST writers as a TaskSource (see the module docstring)."""

    loss = "cross_entropy"

    def __init__(
        self,
        writers: Mapping[str, Pools],
        *,
        seed: int = 0,
        num_train_clients: int | None = None,
        num_heldout_clients: int = 0,
        num_val_clients: int = 0,
        spec: EpisodeSpec | None = None,
        name: str = "femnist",
    ) -> None:
        if not writers:
            raise FedmamlError(f"{name}: no writers")
        self.name, self.spec, self._writers = name, spec, dict(writers)
        #: writers too small for the episodes, with the reason, dropped before the counts
        self.dropped: dict[str, str] = {}
        usable = keep_usable(
            sorted(self._writers),
            lambda w: (self._writers[w].y, self._writers[w].y_test),
            spec,
            "writers",
            self.dropped,
        )
        self._ids = split_groups(
            usable,
            num_heldout_clients,
            seed,
            num_train_clients,
            num_val=num_val_clients,
            what="writers",
            skipped=len(self.dropped),
        )

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **kwargs: Any) -> FemnistSource:
        """LEAF JSON (folder or tar), a ``save_to_disk`` copy of flwrlabs/femnist, or the name
        ``flwrlabs/femnist`` itself (downloaded through flwr-datasets)."""
        if str(path) == HF_DATASET:
            writers = writers_from_dataset(load_flwr_femnist(allow_download=True))
        elif any((Path(path) / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            from datasets import DatasetDict, load_from_disk

            saved = load_from_disk(str(path))
            writers = writers_from_dataset(
                saved["train"] if isinstance(saved, DatasetDict) else saved
            )
        else:
            writers = read_leaf(path)
        return cls(writers, name=str(path), **kwargs)

    def client_ids(self, split: str = "train") -> list[str]:
        return list(self._split(split))

    def num_clients(self, split: str) -> int:
        return len(self._split(split))

    def model_kwargs(self) -> dict[str, int]:
        ways = self.spec.ways if self.spec is not None else None
        return {"num_classes": ways or NUM_CLASSES}

    def client(self, index: int, split: str = "train") -> ClientData:
        ids = self._split(split)
        if not 0 <= index < len(ids):
            raise FedmamlError(
                f"{self.name}: {split} writer {index} does not exist (0..{len(ids) - 1})"
            )
        pools = self._writers[ids[index]]
        return ClientData(ids[index], *pools, meta={"writer": ids[index]})

    def _split(self, split: str) -> list[str]:
        if split not in self._ids:
            raise FedmamlError(f"unknown split {split!r}; use 'train', 'val' or 'heldout'")
        return self._ids[split]
