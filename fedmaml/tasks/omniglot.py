"""Omniglot as a federated population: one client per alphabet.

The alphabets and their images come from :mod:`fedmaml.tasks.omniglot_files`. Following MAML,
each character gives 4 classes, its drawings rotated by 0, 90, 180 and 270 degrees (class
``4 * character + k``). Each character's drawings are split, seeded, into a training pool and
a held-out pool (``heldout_fraction`` 0.25: 15 / 5 of 20), the same drawings for all 4 rotations.
Background alphabets are the training clients and evaluation alphabets the held-out (unseen)
clients; when only one of the two sets is found, ``num_heldout_clients`` of its alphabets are
held out by :func:`~fedmaml.tasks.partition.split_clients`.
"""

from __future__ import annotations

import logging
import os
import zlib

import torch
from torch import Tensor

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData, EpisodeSpec
from fedmaml.tasks.omniglot_files import SPLITS, Alphabet, find_alphabets, load_alphabet
from fedmaml.tasks.partition import check_counts, holdout_split, keep_usable, split_groups

log = logging.getLogger(__name__)

ROTATIONS = 4


def rotate_classes(images: Tensor, chars: Tensor) -> tuple[Tensor, Tensor]:
    """x [4n, 1, s, s], y [4n]: every image rotated by k * 90 degrees, class 4 * char + k."""
    xs = [torch.rot90(images, k, dims=(-2, -1)) for k in range(ROTATIONS)]
    ys = [chars * ROTATIONS + k for k in range(ROTATIONS)]
    return torch.cat(xs).unsqueeze(1), torch.cat(ys)


class OmniglotSource:
    """Omniglot as a TaskSource: one client per alphabet (see the module docstring)."""

    loss = "cross_entropy"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        image_size: int = 28,
        heldout_fraction: float = 0.25,
        rotations: bool = True,
        seed: int = 0,
        num_train_clients: int | None = None,
        num_heldout_clients: int | None = None,
        num_val_clients: int = 0,
        spec: EpisodeSpec | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.image_size, self.rotations, self.spec = image_size, rotations, spec
        self.heldout_fraction, self.seed, self.cache_dir = heldout_fraction, seed, cache_dir
        alphabets: dict[str, Alphabet] = {}
        for a in find_alphabets(path):
            if a.name in alphabets:
                raise FedmamlError(
                    f"alphabet {a.name} found twice under {path} ({alphabets[a.name].origin} and "
                    f"{a.origin}); point data-path at one copy of each alphabet"
                )
            alphabets[a.name] = a
        #: alphabets too small for the episodes, with the reason, dropped before the counts
        self.dropped: dict[str, str] = {}
        usable = keep_usable(
            list(alphabets),
            lambda name: self._pool_labels(alphabets[name]),
            spec,
            "alphabets",
            self.dropped,
        )
        by_split = {s: [n for n in usable if alphabets[n].split == s] for s in SPLITS}
        skipped = len(self.dropped)
        if by_split["background"] and by_split["evaluation"]:
            background, held = by_split["background"], by_split["evaluation"]
            check_counts(
                "alphabets",
                (num_train_clients or len(background) - num_val_clients) + num_val_clients,
                num_heldout_clients or 0,
                len(background),
                heldout_available=len(held),
                skipped=skipped,
            )
            train, val = background, []
            if num_val_clients:  # validation alphabets: a seeded draw from the background set
                groups = split_groups(
                    background, 0, seed, None, num_val=num_val_clients, what="alphabets"
                )
                train, val = groups["train"], groups["val"]
            train = train[:num_train_clients] if num_train_clients else train
            held = held[:num_heldout_clients] if num_heldout_clients is not None else held
        else:
            only = next(s for s in SPLITS if by_split[s])
            log.info("only %s alphabets found; holding out some of them", only)
            groups = split_groups(
                by_split[only],
                num_heldout_clients or 0,
                seed,
                num_train_clients,
                num_val=num_val_clients,
                what="alphabets",
                skipped=skipped,
            )
            train, val, held = groups["train"], groups["val"], groups["heldout"]
        counts = {s: sum(a.split == s for a in alphabets.values()) for s in SPLITS}
        log.info(
            "Omniglot %s: %d background and %d evaluation alphabets (official: 30 and 20)",
            path,
            counts["background"],
            counts["evaluation"],
        )
        self._alphabets = alphabets
        self._ids = {"train": train, "val": val, "heldout": held}
        self._clients: dict[str, ClientData] = {}

    def client_ids(self, split: str = "train") -> list[str]:
        return list(self._split(split))

    def num_clients(self, split: str) -> int:
        return len(self._split(split))

    def model_kwargs(self) -> dict[str, int]:
        ways = self.spec.ways if self.spec is not None and self.spec.ways else None
        most = max(len(a.drawings) for a in self._alphabets.values()) * self._rotations
        return {"ways": ways or most, "image_size": self.image_size}

    def client(self, index: int, split: str = "train") -> ClientData:
        ids = self._split(split)
        if not 0 <= index < len(ids):
            raise FedmamlError(
                f"Omniglot {split} client {index} does not exist (0..{len(ids) - 1})"
            )
        name = ids[index]
        if name not in self._clients:
            alphabet = self._alphabets[name]
            images = load_alphabet(alphabet, self.image_size, self.cache_dir)
            train, test = self._pools(alphabet)
            x, y = self._classes(images[train], alphabet.labels[train])
            x_test, y_test = self._classes(images[test], alphabet.labels[test])
            self._clients[name] = ClientData(
                name, x, y, x_test, y_test, meta={"alphabet": name, "split": alphabet.split}
            )
        return self._clients[name]

    @property
    def _rotations(self) -> int:
        return ROTATIONS if self.rotations else 1

    def _classes(self, images: Tensor, chars: Tensor) -> tuple[Tensor, Tensor]:
        if self.rotations:
            return rotate_classes(images, chars)
        return images.unsqueeze(1), chars

    def _pools(self, alphabet: Alphabet) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + zlib.crc32(alphabet.name.encode())) % 2**64
        )
        return holdout_split(alphabet.labels, self.heldout_fraction, g, stratify=True)

    def _pool_labels(self, alphabet: Alphabet) -> tuple[Tensor, Tensor | None]:
        train, test = self._pools(alphabet)
        r = self._rotations
        y, y_test = (
            (alphabet.labels[idx] * r).repeat(r) + torch.arange(r).repeat_interleave(len(idx))
            for idx in (train, test)
        )
        return y, y_test if self.heldout_fraction else None

    def _split(self, split: str) -> list[str]:
        if split not in self._ids:
            raise FedmamlError(f"unknown split {split!r}; use 'train', 'val' or 'heldout'")
        return self._ids[split]
