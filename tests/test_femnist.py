"""FEMNIST: LEAF JSON (folder and tar), an in-memory datasets.Dataset, writers as clients."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import EpisodeSpec, sample_episode
from fedmaml.tasks.femnist import (
    FemnistSource,
    load_flwr_femnist,
    read_leaf,
    writers_from_dataset,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "femnist"
TAR = SHARED / "femnist_leaf_sf005.tar.xz"


def _leaf_json(writers: dict[str, int], seed: int) -> dict:
    """LEAF-format users: white background (1.0) with a dark column at x = label % 28."""
    rng = np.random.default_rng(seed)
    data = {}
    for writer, n in writers.items():
        y = rng.integers(0, 62, n)
        x = np.ones((n, 28, 28))
        for i, label in enumerate(y):
            x[i, :, label % 28] = 0.0
        data[writer] = {"x": x.reshape(n, 784).round(3).tolist(), "y": y.tolist()}
    return {"users": list(writers), "num_samples": list(writers.values()), "user_data": data}


def _write_leaf(root: Path, train: dict[str, int], test: dict[str, int]) -> Path:
    for part, writers, seed in (("train", train, 0), ("test", test, 1)):
        (root / part).mkdir(parents=True)
        items = list(writers.items())
        for k, chunk in enumerate((items[::2], items[1::2])):
            if chunk:
                text = json.dumps(_leaf_json(dict(chunk), seed + k))
                (root / part / f"all_data_{k}.json").write_text(text)
    return root


def test_shared_leaf_tar_writers():
    if not TAR.is_file():
        pytest.skip("../shared/data/femnist is not available")
    writers = read_leaf(TAR)
    assert len(writers) == 105
    assert sum(len(p.y) for p in writers.values()) == 14708
    assert sum(len(p.y_test) for p in writers.values()) == 1685
    pools = writers["f1501_00"]
    assert pools.x.shape == (144, 1, 28, 28) and pools.x.dtype == torch.float32
    assert pools.x.mean() < 0.2 and pools.x[:, :, 0, :].mean() < 0.05  # ink on a dark border
    assert int(max(p.y.max() for p in writers.values())) == 61
    spec = EpisodeSpec(support=5, query=5)
    src = FemnistSource(writers, spec=spec, num_heldout_clients=20, seed=0)
    assert (src.num_clients("train"), src.num_clients("heldout")) == (81, 20)
    assert not set(src.client_ids("train")) & set(src.client_ids("heldout"))
    task = sample_episode(src.client(3, "heldout"), spec, torch.Generator(), held_out=True)
    assert task.support[0].shape == (5, 1, 28, 28) and task.query[1].dtype == torch.long


def test_leaf_folder_and_tar_agree(tmp_path, caplog):
    train = {"w1": 12, "w2": 30, "w3": 25, "w4": 3}
    root = _write_leaf(tmp_path / "femnist", train, {w: 4 for w in train})
    archive = tmp_path / "femnist.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="femnist")
    from_dir, from_parent, from_tar = read_leaf(root), read_leaf(tmp_path), read_leaf(archive)
    assert list(from_dir) == ["w1", "w2", "w3", "w4"]
    for w in from_dir:
        for a, b, c in zip(from_dir[w], from_parent[w], from_tar[w], strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
    w2 = from_dir["w2"]
    assert w2.x.shape == (30, 1, 28, 28) and w2.x_test.shape == (4, 1, 28, 28)
    # ink = 1 - grey: the dark column of each image is the ink, at x = label % 28
    assert torch.equal(w2.x[:, 0, 5, :].argmax(dim=1), w2.y % 28)
    assert torch.allclose(w2.x.sum(dim=(1, 2, 3)), torch.full((30,), 28.0))
    with caplog.at_level(logging.WARNING):
        src = FemnistSource.from_path(root, spec=EpisodeSpec(support=2, query=2), seed=1)
    assert "skipped 1 of 4 writers" in caplog.text and "w4" not in src.client_ids()
    assert src.model_kwargs() == {"num_classes": 62}
    with pytest.raises(FedmamlError, match="none of the 4 writers"):
        FemnistSource(from_dir, spec=EpisodeSpec(support=20, query=20))
    with pytest.raises(FedmamlError, match="lower num-heldout-clients"):
        FemnistSource(from_dir, num_heldout_clients=4)


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "no such file or folder"),
        ("no_train", "no train/ folder"),
        ("bad_json", "not valid JSON"),
        ("not_leaf", "no 'user_data'"),
        ("short_x", "malformed x/y"),
        ("bad_label", r"labels \[62\] outside 0..61"),
        ("bad_tar", "not a readable tar"),
        ("empty_tar", "no train/\\*.json"),
    ],
)
def test_bad_leaf_input(tmp_path, setup, needle):
    path = tmp_path / "femnist"
    if setup == "no_train":
        path.mkdir()
    elif setup in ("bad_json", "not_leaf", "short_x", "bad_label"):
        (path / "train").mkdir(parents=True)
        text = {
            "bad_json": '{"users": [',
            "not_leaf": "[1, 2]",
            "short_x": json.dumps({"user_data": {"w": {"x": [[0.5] * 700], "y": [1]}}}),
            "bad_label": json.dumps({"user_data": {"w": {"x": [[0.5] * 784], "y": [62]}}}),
        }[setup]
        (path / "train" / "a.json").write_text(text)
    elif setup == "bad_tar":
        path = tmp_path / "femnist.tar.xz"
        path.write_bytes(b"\xfd7zXZ\x00 broken")
    elif setup == "empty_tar":
        path = tmp_path / "femnist.tar"
        (tmp_path / "readme.txt").write_text("hi")
        with tarfile.open(path, "w") as tf:
            tf.add(tmp_path / "readme.txt", arcname="readme.txt")
    with pytest.raises(FedmamlError, match=needle):
        read_leaf(path)


def _hf_dataset(white_background: bool = True):
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    images, chars, writers = [], [], []
    for w, n in (("f0000_14", 20), ("f0001_41", 12), ("f0002_07", 2)):
        for _ in range(n):
            label = int(rng.integers(0, 62))
            ink = np.zeros((28, 28), dtype=np.uint8)
            ink[label % 28, :] = 255
            images.append(PILImage.fromarray(255 - ink if white_background else ink))
            chars.append(label)
            writers.append(w)
    features = Features(
        {"image": Image(), "character": ClassLabel(num_classes=62), "writer_id": Value("string")}
    )
    return Dataset.from_dict(
        {"image": images, "character": chars, "writer_id": writers}, features=features
    )


@pytest.mark.parametrize("white_background", [True, False])
def test_writers_from_in_memory_dataset(white_background):
    writers = writers_from_dataset(_hf_dataset(white_background), heldout_fraction=0.25, seed=0)
    assert list(writers) == ["f0000_14", "f0001_41", "f0002_07"]
    pools = writers["f0000_14"]
    assert (len(pools.y), len(pools.y_test)) == (15, 5)
    for x, y in ((pools.x, pools.y), (pools.x_test, pools.y_test)):
        assert x.shape[1:] == (1, 28, 28) and x.max() == 1.0
        # ink (1.0) is the row at y = label % 28 whatever the stored polarity
        assert torch.equal(x[:, 0, :, 3].argmax(dim=1), y % 28)
        assert torch.allclose(x.sum(dim=(1, 2, 3)), torch.full((len(y),), 28.0))
    again = writers_from_dataset(_hf_dataset(white_background), heldout_fraction=0.25, seed=0)
    assert torch.equal(again["f0000_14"].y_test, pools.y_test)
    src = FemnistSource(writers, spec=EpisodeSpec(support=2, query=2), num_heldout_clients=1)
    assert src.num_clients("train") + src.num_clients("heldout") == 2  # f0002_07 too small


def test_dataset_route_errors_and_saved_copy(tmp_path):
    ds = _hf_dataset()
    with pytest.raises(FedmamlError, match=r"lacks column\(s\) \['writer_id'\]"):
        writers_from_dataset(ds.remove_columns("writer_id"))
    with pytest.raises(FedmamlError, match="allow_download=True"):
        load_flwr_femnist()
    ds.save_to_disk(str(tmp_path / "saved"))
    src = FemnistSource.from_path(tmp_path / "saved", num_heldout_clients=1)
    assert src.num_clients("train") == 2 and src.client(0).x.shape[1:] == (1, 28, 28)


def test_open_source_femnist(tmp_path):
    from fedmaml.config import RunConfig
    from fedmaml.tasks.registry import open_source

    root = _write_leaf(tmp_path / "leaf", {"a": 10, "b": 10, "c": 10}, {"a": 2, "b": 2, "c": 2})
    cfg = RunConfig(
        task="femnist",
        data_path=str(root),
        num_train_clients=2,
        num_heldout_clients=1,
        min_train_nodes=2,
        support_size=2,
        query_size=2,
    )
    src = open_source(cfg)
    assert (src.num_clients("train"), src.num_clients("heldout")) == (2, 1)
    # more clients than the data has: refused before any round, naming the counts and the fix
    with pytest.raises(FedmamlError, match="has 3 usable; lower num-train-clients to 2"):
        open_source(cfg.replace(num_train_clients=3))
    with pytest.raises(FedmamlError, match="no such file or folder"):
        open_source(cfg.replace(data_path=str(tmp_path / "absent")))


def test_a_config_asking_for_more_writers_than_usable_stops_before_round_1(capsys):
    """The ready FEMNIST config once asked for 85 + 20 writers of the 5% sample's 101 usable:
    four clients failed at start and nothing said so. Now ``fedmaml simulate`` stops before
    Flower starts, naming the keys, the counts and the fix."""
    if not TAR.is_file():
        pytest.skip("../shared/data/femnist is not available")
    from fedmaml.cli import main

    config = Path(__file__).resolve().parents[1] / "simulations" / "femnist.toml"
    args = ["--set", f"data-path={TAR}", "--num-train-clients", "85", "--out", "/tmp/unused"]
    code = main(["simulate", "--config", str(config), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "105 writers, but the data has 101 usable (4 more were too small" in err
    assert "lower num-train-clients to 81" in err
