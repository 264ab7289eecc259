"""Partitions: rows into clients (flwr-datasets, in memory), clients into splits, pools."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import EpisodeSpec
from fedmaml.tasks.partition import (
    episode_problem,
    holdout_split,
    partition_rows,
    split_clients,
)


def _frame(n: int = 600, classes: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "label": rng.integers(0, classes, n)})


def test_iid_partition_covers_rows_once_and_is_seeded():
    df = _frame()
    parts = partition_rows(df, 6, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(df)))
    assert [len(p) for p in parts] == [100] * 6
    assert not np.array_equal(parts[0], np.arange(100))  # shuffled, not contiguous
    again = partition_rows(df, 6, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_label_skewed_partitions():
    df = _frame()
    labels = df["label"].to_numpy()
    patho = partition_rows(df, 6, scheme="pathological", label_column="label", seed=0)
    assert all(len(np.unique(labels[p])) <= 2 for p in patho)
    assert sorted(np.concatenate(patho).tolist()) == list(range(len(df)))
    skewed = partition_rows(df, 6, scheme="dirichlet", label_column="label", alpha=0.1, seed=0)
    iid = partition_rows(df, 6, seed=0)

    def top_share(parts):
        return np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)])

    assert top_share(skewed) > top_share(iid) + 0.2
    with pytest.raises(FedmamlError, match="unknown partition scheme"):
        partition_rows(df, 2, scheme="bogus")
    with pytest.raises(FedmamlError, match="column 'nope' is missing"):
        partition_rows(df, 2, scheme="dirichlet", label_column="nope")
    with pytest.raises(FedmamlError, match="cannot split 600 rows into 601"):
        partition_rows(df, 601)


def test_split_clients_deterministic_and_disjoint():
    ids = [f"w{i:02d}" for i in range(20)]
    train, held = split_clients(ids[::-1], 5, seed=3)
    assert len(held) == 5 and len(train) == 15 and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert split_clients(ids, 5, seed=3) == (train, held)
    assert split_clients(ids, 5, seed=4)[1] != held
    assert split_clients(ids, 5, seed=3, num_train=4)[0] == train[:4]
    with pytest.raises(FedmamlError, match="lower num-heldout-clients"):
        split_clients(ids, 20, seed=0)


def test_holdout_split_stratified():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, test = holdout_split(y, 0.2, torch.Generator().manual_seed(0), stratify=True)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(16))
    assert torch.bincount(y[test], minlength=3).tolist() == [2, 1, 0]
    assert (y[train] == 2).sum() == 1  # a lone example stays in training
    with pytest.raises(FedmamlError, match="fraction"):
        holdout_split(y, 1.0, torch.Generator(), stratify=False)


def test_episode_problem():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert episode_problem("c", y, torch.tensor([0, 1]), EpisodeSpec(2, 1, ways=2)) == ""
    assert "2-way" in episode_problem("c", y, None, EpisodeSpec(2, 2, ways=2))
    empty = torch.empty(0, dtype=torch.long)
    assert "empty held-out split" in episode_problem("c", y, empty, EpisodeSpec(1, 1))
