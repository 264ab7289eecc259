"""Tables: reading CSV/Parquet, tensors from columns, per-user clients, errors on bad input."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import EpisodeSpec, sample_episode
from fedmaml.tasks.tables import (
    RowPartition,
    TableSource,
    read_table,
    split_by_user,
    table_to_tensors,
)


def _users_frame(n: int = 400, users: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user": rng.integers(0, users, n),
            "f1": rng.normal(size=n),
            "f2": rng.normal(size=n),
            "note": ["text"] * n,
            "label": rng.integers(0, 3, n),
        }
    )


def test_read_csv_and_parquet_round_trip(tmp_path):
    df = _users_frame(20)
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        back = read_table(tmp_path / name)
        assert list(back.columns) == list(df.columns)
        np.testing.assert_allclose(back["f1"], df["f1"])


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.csv", None, "no such file"),
        ("empty.csv", b"", "empty"),
        ("header.csv", b"a,b,label\n", "no data rows"),
        ("bad.parquet", b"this is not parquet", "cannot read"),
        ("ragged.csv", b"a,b\n1,2\n3,4,5,6\n", "cannot read"),
        ("t.xlsx", b"x", "unsupported"),
    ],
)
def test_read_table_errors_name_file(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FedmamlError, match=needle) as err:
        read_table(path)
    assert name in str(err.value)


def test_tensors_classification_and_regression():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0, 1, 0], "label": [2, 0, 1]})
    x, y = table_to_tensors(df, label_column="label")
    assert x.dtype == torch.float32 and x.shape == (3, 2)
    assert y.dtype == torch.long and y.tolist() == [2, 0, 1]
    df["target"] = [0.5, 1.5, -2.0]
    x, y = table_to_tensors(df, label_column="target", feature_columns=["a"])
    assert x.shape == (3, 1) and y.dtype == torch.float32 and y.shape == (3, 1)
    # integer labels forced to regression, float whole numbers forced to classification
    _, y = table_to_tensors(df, label_column="label", classification=False)
    assert y.dtype == torch.float32
    df["flabel"] = [1.0, 0.0, 1.0]
    _, y = table_to_tensors(df, label_column="flabel", feature_columns=["a"], classification=True)
    assert y.tolist() == [1, 0, 1]


def test_tensors_errors():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "s": ["1", "x", "2"], "label": [0, 1, 5]})
    with pytest.raises(FedmamlError, match=r"missing column\(s\) \['zz'\].*'a', 's', 'label'"):
        table_to_tensors(df, label_column="label", feature_columns=["a", "zz"])
    # rows and columns are named, values never (a device's message must not carry its data)
    with pytest.raises(FedmamlError, match=r"'s' has 1 non-numeric value.*first at row 1") as info:
        table_to_tensors(df, label_column="label", feature_columns=["a", "s"])
    assert "'x'" not in str(info.value)
    with pytest.raises(
        FedmamlError, match=r"1 row\(s\) whose label is not a class id \(first at row 2\).*0\.\.2"
    ):
        table_to_tensors(df, label_column="label", feature_columns=["a"], num_classes=3)
    with pytest.raises(FedmamlError, match=r"label is not a class id \(first at row 0\)"):
        table_to_tensors(
            pd.DataFrame({"a": [1.0], "y": [0.5]}), label_column="y", classification=True
        )
    nan = pd.DataFrame({"a": [1.0, np.nan, np.inf, 2.0], "label": [0, 1, 0, 1]})
    with pytest.raises(FedmamlError, match=r"'a' has 2 rows .*first at row 1"):
        table_to_tensors(nan, label_column="label")
    with pytest.raises(FedmamlError, match="no rows"):
        table_to_tensors(df.iloc[:0], label_column="label")
    with pytest.raises(FedmamlError, match="no numeric feature"):
        table_to_tensors(df[["s", "label"]].iloc[:1], label_column="label")


def test_split_by_user():
    df = _users_frame(50, users=4)
    parts = split_by_user(df, "user")
    assert list(parts) == ["0", "1", "2", "3"]
    assert sum(len(p) for p in parts.values()) == 50
    assert all((p["user"] == int(u)).all() for u, p in parts.items())
    with pytest.raises(FedmamlError, match="user column 'who' is missing"):
        split_by_user(df, "who")


def test_table_source_by_user(tmp_path):
    df = _users_frame()
    path = tmp_path / "users.csv"
    df.to_csv(path, index=False)
    spec = EpisodeSpec(support=2, query=2, ways=3)
    src = TableSource(path, num_heldout_clients=3, spec=spec, seed=1)
    assert src.loss == "cross_entropy"
    assert src.feature_columns == ["f1", "f2"]  # user and text columns left out
    assert src.model_kwargs() == {"in_features": 2, "out_features": 3}
    train, held = src.client_ids("train"), src.client_ids("heldout")
    assert len(train) == 7 and len(held) == 3 and not set(train) & set(held)
    assert train == sorted(train)
    # same seed: same split; the pools of every user partition that user's rows
    assert TableSource(path, num_heldout_clients=3, spec=spec, seed=1).client_ids("heldout") == held
    for i in range(src.num_clients("train")):
        c = src.client(i)
        rows = df[df["user"] == int(c.client_id)]
        assert len(c) + len(c.y_test) == len(rows)
        np.testing.assert_allclose(
            np.sort(torch.cat([c.x[:, 0], c.x_test[:, 0]]).numpy()),
            np.sort(rows["f1"].to_numpy(np.float32)),
        )
        assert set(c.y_test.tolist()) <= set(c.y.tolist())
    task = sample_episode(
        src.client(0, "heldout"), spec, torch.Generator().manual_seed(0), held_out=True
    )
    assert task.support[0].shape == (6, 2) and task.support[1].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(FedmamlError, match="does not exist"):
        src.client(7)


def test_table_source_regression_and_partitions(caplog):
    rng = np.random.default_rng(3)
    df = pd.DataFrame({"x": rng.normal(size=300), "y": rng.normal(size=300)})
    src = TableSource(
        df, label_column="y", user_column="", num_train_clients=5, num_heldout_clients=1
    )
    assert src.loss == "mse" and src.model_kwargs() == {"in_features": 1, "out_features": 1}
    assert src.num_clients("train") == 5 and src.num_clients("heldout") == 1
    assert src.client(0).y.shape[1] == 1
    # a user with too few rows for the episodes is skipped with a count in the log
    df = _users_frame(200, users=4)
    df = pd.concat([df, df.iloc[:1].assign(user=99)])
    with caplog.at_level(logging.WARNING):
        src = TableSource(df, spec=EpisodeSpec(support=3, query=3))
    assert "skipped 1 of 5 clients" in caplog.text and "99" not in src.client_ids()
    with pytest.raises(FedmamlError, match="none of the 5 clients"):
        TableSource(df, spec=EpisodeSpec(support=100, query=100))
    with pytest.raises(FedmamlError, match="user column 'user' is missing"):
        TableSource(df.drop(columns="user"))


def test_open_source_table(tmp_path):
    from fedmaml.config import RunConfig
    from fedmaml.tasks.registry import open_source

    path = tmp_path / "users.parquet"
    _users_frame().rename(columns={"user": "who", "label": "y"}).to_parquet(path)
    cfg = RunConfig.from_mapping(
        {
            "task": "table",
            "data-path": str(path),
            "label-column": "y",
            "user-column": "who",
            "feature-columns": "f2, f1",
            "num-train-clients": 8,
            "num-heldout-clients": 2,
        }
    )
    src = open_source(cfg)
    assert src.feature_columns == ["f2", "f1"]
    assert (src.num_clients("train"), src.num_clients("heldout")) == (8, 2)
    with pytest.raises(FedmamlError, match="no such file"):
        open_source(cfg.replace(data_path=str(tmp_path / "nope.csv")))


def test_run_config_partitions_a_table_without_users(tmp_path):
    """The partition keys reach flwr-datasets: pathological with one class per client gives
    single-label clients; Dirichlet with a small alpha gives clients dominated by one label
    (on average), unlike iid."""
    from fedmaml.config import RunConfig
    from fedmaml.tasks.registry import open_source

    path = tmp_path / "rows.csv"
    _users_frame(900).drop(columns="user").to_csv(path, index=False)
    base = {
        "task": "table",
        "data-path": str(path),
        "user-column": "",
        "num-train-clients": 4,
        "num-heldout-clients": 2,
        "support-size": 2,
        "query-size": 2,
    }

    def top_label_shares(extra: dict) -> list[float]:
        src = open_source(RunConfig.from_mapping({**base, **extra}))
        assert (src.num_clients("train"), src.num_clients("heldout")) == (4, 2)
        shares = []
        for split in ("train", "heldout"):
            for i in range(src.num_clients(split)):
                c = src.client(i, split)
                labels = torch.cat([c.y, c.y_test])
                shares.append(torch.bincount(labels).max().item() / len(labels))
        return shares

    assert min(top_label_shares({"partition": "pathological", "partition-classes": 1})) == 1.0
    skewed = top_label_shares({"partition": "dirichlet", "partition-alpha": 0.1})
    iid = top_label_shares({})
    assert np.mean(skewed) > 0.6 > 0.45 > np.mean(iid)
    with pytest.raises(FedmamlError, match="'partition'"):
        RunConfig.from_mapping({**base, "partition": "random"})
    with pytest.raises(FedmamlError, match=r"'partition'.*user-column"):
        RunConfig.from_mapping({**base, "partition": "dirichlet", "user-column": "user"})
    with pytest.raises(FedmamlError, match="'partition-alpha'"):
        RunConfig.from_mapping({**base, "partition-alpha": 0})


def test_table_source_label_skewed_partition():
    df = _users_frame(600).drop(columns="user")
    src = TableSource(
        df,
        user_column="",
        num_heldout_clients=2,
        partition=RowPartition(scheme="pathological", num_partitions=6, classes_per_partition=1),
    )
    assert (src.num_clients("train"), src.num_clients("heldout")) == (4, 2)
    for split in ("train", "heldout"):
        for i in range(src.num_clients(split)):
            c = src.client(i, split)
            assert len(torch.unique(torch.cat([c.y, c.y_test]))) == 1
