"""Omniglot's files (Lake et al., 2015): finding its alphabets, downloading, reading and
resizing the images.

Inputs, found by :func:`find_alphabets` from one path:

1. the npz arrays (``images_background.npz``, ``images_evaluation.npz``: bool ``(C, 20, 105,
   105)``, True = white background). Alphabet boundaries come from ``omniglot_alphabets.csv``
   beside them; without the csv, an npz with the official number of characters (964 or 659) is
   cut with the official alphabet list built into this module (the npz order is the official
   character order), and any other npz is refused;
2. an extracted PNG tree ``<root>/<Alphabet>/characterNN/*.png`` (or a folder holding
   ``images_background/`` and ``images_evaluation/`` trees);
3. the official zip files themselves (members read with :mod:`zipfile`, nothing extracted);
   :func:`download_omniglot` fetches them when the caller allows the network.

Images become ink = 1 - grey (ink 1.0, background 0.0), resized to ``image_size`` squared by
area averaging (each output pixel is the mean of the input pixels it covers). Resized images are
cached per process, and on disk under ``cache_dir`` when one is given.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.tasks.inputs import InputSpec, model_inputs

log = logging.getLogger(__name__)

SPLITS = ("background", "evaluation")
NPZ_FILES = {"background": "images_background.npz", "evaluation": "images_evaluation.npz"}
CSV_FILE = "omniglot_alphabets.csv"
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"

#: The official alphabets and their character counts, in the official (npz) order.
OFFICIAL = {
    "background": (
        "Arcadian:26 Armenian:41 Asomtavruli_(Georgian):40 Balinese:24 Bengali:46 "
        "Blackfoot_(Canadian_Aboriginal_Syllabics):14 Braille:26 Cyrillic:33 Early_Aramaic:22 "
        "Syriac_(Estrangelo):23 Anglo-Saxon_Futhorc:29 Futurama:26 Grantha:43 Greek:24 "
        "Gujarati:48 Hebrew:22 Japanese_(hiragana):52 "
        "Inuktitut_(Canadian_Aboriginal_Syllabics):16 Malay_(Jawi_-_Arabic):40 "
        "Japanese_(katakana):47 Korean:40 Latin:26 Alphabet_of_the_Magi:20 "
        "Mkhedruli_(Georgian):41 Burmese_(Myanmar):34 N_Ko:33 "
        "Ojibwe_(Canadian_Aboriginal_Syllabics):14 Sanskrit:42 Tagalog:17 Tifinagh:55"
    ),
    "evaluation": (
        "Angelic:20 Atemayar_Qelisayer:26 Atlantean:26 Aurek-Besh:26 Avesta:26 Ge_ez:26 "
        "Glagolitic:45 Gurmukhi:45 Kannada:41 Keble:26 Malayalam:47 Manipuri:40 Mongolian:30 "
        "Old_Church_Slavonic_(Cyrillic):45 Oriya:46 Syriac_(Serto):23 Sylheti:28 Tengwar:25 "
        "Tibetan:42 ULOG:26"
    ),
}


@dataclass(frozen=True)
class Alphabet:
    """Where one alphabet's drawings are: ``kind`` npz (``items`` = first and end character
    row), tree (PNG paths per character) or zip (member names per character) in ``origin``."""

    name: str
    split: str
    kind: str
    origin: str
    items: tuple
    drawings: tuple[int, ...]

    @property
    def labels(self) -> Tensor:
        """Character index (0-based within the alphabet) of each drawing, in reading order."""
        return torch.repeat_interleave(
            torch.arange(len(self.drawings)), torch.tensor(self.drawings)
        )


def find_alphabets(path: str | os.PathLike[str]) -> list[Alphabet]:
    """Every alphabet under ``path`` (npz files, PNG trees or official zips), background first."""
    path = Path(path)
    if not path.exists():
        raise FedmamlError(
            f"{path}: no such file or folder; give the Omniglot folder, an official zip or "
            "an npz file (download_omniglot fetches the official zips)"
        )
    if path.is_file():
        return _file_alphabets(path)
    npz = [path / NPZ_FILES[s] for s in SPLITS if (path / NPZ_FILES[s]).is_file()]
    trees = sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("images_"))
    zips = sorted(p for p in path.glob("images_*.zip") if p.is_file())
    found: list[Alphabet] = []
    for source in npz or trees or zips:
        found += _file_alphabets(source) if source.is_file() else _tree_alphabets(source)
    if not found:
        found = _tree_alphabets(path)
    return sorted(found, key=lambda a: SPLITS.index(a.split))


def _file_alphabets(path: Path) -> list[Alphabet]:
    if path.suffix == ".npz":
        return _npz_alphabets(path)
    if path.suffix == ".zip":
        return _zip_alphabets(path)
    raise FedmamlError(
        f"{path}: not an Omniglot source; give a folder, an official .zip or an .npz file"
    )


def _split_of(name: str) -> str:
    return "evaluation" if "evaluation" in name else "background"


def _npz_alphabets(path: Path) -> list[Alphabet]:
    split = _split_of(path.name)
    count = _npz_characters(path)
    ranges = _csv_ranges(path.parent / CSV_FILE, split)
    if ranges is None:
        ranges, start = [], 0
        for entry in OFFICIAL[split].split():
            name, n = entry.rsplit(":", 1)
            ranges.append((name, start, start + int(n)))
            start += int(n)
        if start != count:
            raise FedmamlError(
                f"{path}: {count} characters, not the official {start}, and no {CSV_FILE} "
                f"beside it to name the alphabets; put {CSV_FILE} next to it or use the PNG "
                "folders or official zips"
            )
    if ranges[-1][2] > count:
        raise FedmamlError(
            f"{path}: {CSV_FILE} names rows up to {ranges[-1][2]} but the file has {count} "
            "characters; use the csv that came with these npz files"
        )
    return [
        Alphabet(name, split, "npz", str(path), (a, b), (20,) * (b - a)) for name, a, b in ranges
    ]


def _npz_characters(path: Path) -> int:
    """The number of characters in an npz, read from the array header (nothing decompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "images.npy" not in zf.namelist():
                raise FedmamlError(f"{path}: no 'images' array; give an Omniglot npz file")
            with zf.open("images.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape = read_header(f)[0]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FedmamlError(f"{path}: cannot read the npz file ({exc}); download it again") from None
    if len(shape) != 4 or shape[1] != 20:
        raise FedmamlError(
            f"{path}: images have shape {shape}, expected (characters, 20, height, width)"
        )
    return int(shape[0])


def _csv_ranges(path: Path, split: str) -> list[tuple[str, int, int]] | None:
    if not path.is_file():
        return None
    import pandas as pd

    try:
        df = pd.read_csv(path)
        rows = df[df["split"] == split]
        ranges = [
            (str(r.alphabet), int(r.npz_first_index), int(r.npz_last_index) + 1)
            for r in rows.itertuples()
        ]
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise FedmamlError(
            f"{path}: cannot read alphabet ranges ({exc}); it needs columns alphabet, split, "
            "npz_first_index, npz_last_index"
        ) from None
    return sorted(ranges, key=lambda r: r[1]) or None


def _tree_alphabets(root: Path) -> list[Alphabet]:
    split = _split_of(root.name)
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        chars = [sorted(map(str, c.glob("*.png"))) for c in sorted(folder.iterdir()) if c.is_dir()]
        chars = [c for c in chars if c]
        if chars:
            found.append(_alphabet(folder.name, split, "tree", str(root), chars))
    if not found:
        raise FedmamlError(
            f"{root}: no Omniglot alphabets found; expected <root>/<Alphabet>/characterNN/*.png, "
            "the official images_*.zip files or the images_*.npz files"
        )
    return found


def _zip_alphabets(path: Path) -> list[Alphabet]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".png")]
    except (OSError, zipfile.BadZipFile) as exc:
        raise FedmamlError(f"{path}: not a readable zip file ({exc}); download it again") from None
    groups: dict[str, dict[str, list[str]]] = {}
    for name in sorted(names):
        parts = name.split("/")
        if len(parts) >= 3:
            groups.setdefault(parts[-3], {}).setdefault(parts[-2], []).append(name)
    if not groups:
        raise FedmamlError(
            f"{path}: no <Alphabet>/<character>/*.png members; give an official Omniglot zip"
        )
    split = _split_of(path.name)
    return [
        _alphabet(name, split, "zip", str(path), [chars[c] for c in sorted(chars)])
        for name, chars in sorted(groups.items())
    ]


def _alphabet(name: str, split: str, kind: str, origin: str, chars: list[list[str]]) -> Alphabet:
    return Alphabet(
        name, split, kind, origin, tuple(tuple(c) for c in chars), tuple(len(c) for c in chars)
    )


def to_ink(grey: Tensor, image_size: int) -> Tensor:
    """[n, h, w] grey (1.0 = white) -> [n, s, s], area-averaged to s x s, then ink = 1 - grey
    by :func:`fedmaml.tasks.inputs.model_inputs` (the preprocessing Omniglot checkpoints
    record)."""
    grey = grey.to(torch.float32).unsqueeze(1)
    if grey.shape[-1] != image_size or grey.shape[-2] != image_size:
        grey = F.interpolate(grey, size=(image_size, image_size), mode="area")
    return model_inputs(grey, InputSpec((1, image_size, image_size), ink=True)).squeeze(1)


def load_alphabet(
    alphabet: Alphabet, image_size: int = 28, cache_dir: str | os.PathLike[str] | None = None
) -> Tensor:
    """Ink images [n, s, s] of ``alphabet`` in the order of ``alphabet.labels``.

    Cached in memory per process, and under ``cache_dir`` (a float16 .npy per alphabet) when
    given, keyed by the source's path and modification time (for a PNG tree: the tree root's,
    so clear the cache after editing files inside the tree), the alphabet and the size.
    """
    if cache_dir is None:
        return _load_in_memory(alphabet, image_size)
    file = Path(cache_dir) / f"omniglot-{_cache_key(alphabet, image_size)}.npy"
    if file.is_file():
        try:
            return torch.from_numpy(np.load(file).astype(np.float32))
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache file %s", file)
    images = _load_in_memory(alphabet, image_size)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".npy", delete=False) as tmp:
        np.save(tmp, images.numpy().astype(np.float16))
    os.replace(tmp.name, file)
    return images


def _cache_key(alphabet: Alphabet, image_size: int) -> str:
    stat = Path(alphabet.origin).stat()
    text = f"{Path(alphabet.origin).resolve()}|{stat.st_mtime_ns}|{alphabet.name}|{image_size}"
    return f"{alphabet.name[:40]}-{image_size}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


@functools.lru_cache(maxsize=64)
def _load_in_memory(alphabet: Alphabet, image_size: int) -> Tensor:
    if alphabet.kind == "npz":
        first, end = alphabet.items
        return _npz_resized(alphabet.origin, image_size)[first:end].reshape(
            -1, image_size, image_size
        )
    if alphabet.kind == "zip":
        try:
            with zipfile.ZipFile(alphabet.origin) as zf:
                grey = [_png(zf.read(m), m) for c in alphabet.items for m in c]
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise FedmamlError(
                f"{alphabet.origin}: cannot read alphabet {alphabet.name} ({exc}); "
                "download the zip again"
            ) from None
    else:
        grey = [_png(Path(p).read_bytes(), p) for c in alphabet.items for p in c]
    return _resize_all(grey, image_size)


@functools.lru_cache(maxsize=2)
def _npz_resized(path: str, image_size: int) -> Tensor:
    """All characters of an npz split as ink [C, 20, s, s] (resized one block at a time)."""
    try:
        with np.load(path) as data:
            images = data["images"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FedmamlError(f"{path}: cannot read the npz file ({exc}); download it again") from None
    out = torch.empty(images.shape[0], images.shape[1], image_size, image_size)
    for start in range(0, images.shape[0], 64):
        block = torch.from_numpy(images[start : start + 64])
        out[start : start + 64] = to_ink(block.flatten(0, 1), image_size).view(
            block.shape[0], block.shape[1], image_size, image_size
        )
    return out


def _png(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise FedmamlError(f"{name}: not a readable PNG image ({exc}); replace the file") from None


def _resize_all(grey: Sequence[np.ndarray], image_size: int) -> Tensor:
    out = torch.empty(len(grey), image_size, image_size)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grey):
        shapes.setdefault(g.shape, []).append(i)
    for idx in shapes.values():
        out[idx] = to_ink(torch.from_numpy(np.stack([grey[i] for i in idx])), image_size)
    return out


def download_omniglot(root: str | os.PathLike[str], *, allow_download: bool = False) -> Path:
    """Fetch the official ``images_background.zip`` and ``images_evaluation.zip`` into ``root``
    (skipping those present) and return ``root``, which :class:`OmniglotSource` then reads.

    Nothing is fetched unless ``allow_download=True``: the caller must ask for the network.
    """
    import urllib.request

    root = Path(root)
    missing = [
        s for s in ("images_background", "images_evaluation") if not (root / f"{s}.zip").is_file()
    ]
    if missing and not allow_download:
        raise FedmamlError(
            f"{root}: {', '.join(missing)}.zip missing; pass allow_download=True to fetch them "
            f"from {DOWNLOAD_URL.format('...')}, or copy them there"
        )
    root.mkdir(parents=True, exist_ok=True)
    for name in missing:
        with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as tmp:
            try:
                with urllib.request.urlopen(DOWNLOAD_URL.format(name), timeout=60) as r:
                    tmp.write(r.read())
            except OSError as exc:
                os.unlink(tmp.name)
                raise FedmamlError(
                    f"cannot download {DOWNLOAD_URL.format(name)} ({exc}); check the connection "
                    "or fetch the zip by hand"
                ) from None
        os.replace(tmp.name, root / f"{name}.zip")
    return root
