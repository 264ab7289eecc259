"""Image users through `fedmaml personalize` and `fedmaml predict`: LEAF JSON (one user or
many, by LEAF id), npz (x, y), folders of images by class, and tables of pixel columns, all
prepared by the checkpoint's recorded preprocessing (FEMNIST: ink = 1 - grey); a file of
another format exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.cli import main
from fedmaml.config import RunConfig
from fedmaml.meta import model_params
from fedmaml.models import build_model
from fedmaml.personalize import load_personalized
from fedmaml.personalize.global_model import resolve_global
from fedmaml.personalize.user_files import load_users
from fedmaml.tasks.femnist import INPUTS


def _grey(labels: np.ndarray) -> np.ndarray:
    """LEAF-style grey images [n, 784]: white paper (1.0), a dark bar at row label % 28."""
    x = np.ones((len(labels), 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        x[i, label % 28, 3 : 20 + i % 5] = 0.0
    return x.reshape(len(labels), 784)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    torch.manual_seed(0)
    cfg = RunConfig(task="femnist", data_path="femnist", eval_steps=1, inner_lr=0.05)
    ckpt = Checkpoint(
        model_params(build_model("femnist_cnn")), "femnist_cnn", {"num_classes": 62},
        cfg.to_mapping(), inputs=INPUTS.to_dict(),
    )  # fmt: skip
    paths = {"ckpt": save_checkpoint(d / "femnist.pt", ckpt)}
    rng = np.random.default_rng(0)
    users = {w: rng.integers(0, 4, 12) for w in ("w1", "w2")}
    grey = {w: _grey(y) for w, y in users.items()}

    def leaf(names: list[str]) -> dict:
        return {
            "users": names,
            "num_samples": [12] * len(names),
            "user_data": {w: {"x": grey[w].tolist(), "y": users[w].tolist()} for w in names},
        }

    (d / "one.json").write_text(json.dumps(leaf(["w1"])))
    (d / "two.json").write_text(json.dumps(leaf(["w1", "w2"])))
    np.savez(d / "w1.npz", x=grey["w1"], y=users["w1"])
    np.savez(d / "ink.npz", x=1.0 - grey["w1"], y=users["w1"])  # already ink: kept as it is
    np.savez(d / "no_y.npz", x=grey["w1"])
    pixels = pd.DataFrame(grey["w1"], columns=[f"p{i}" for i in range(784)])
    pixels.assign(label=users["w1"]).to_csv(d / "w1.csv", index=False)
    pixels.to_csv(d / "unlabelled.csv", index=False)
    pixels.iloc[:, :700].assign(label=users["w1"]).to_csv(d / "short.csv", index=False)
    from PIL import Image

    for i, (x, y) in enumerate(zip(grey["w1"], users["w1"], strict=True)):
        folder = d / "w1_images" / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x.reshape(28, 28) * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    (d / "notes.txt").write_text("not data")
    paths.update({p.name: p for p in d.iterdir()})
    return paths


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_format_gives_the_same_prepared_examples(files):
    """LEAF JSON, npz of raw grey levels, npz already in ink, a pixel table and PNG files of the
    same user's images all become the model's inputs ink = 1 - grey, [n, 1, 28, 28]."""
    g = resolve_global(files["femnist.pt"])
    assert g.inputs == INPUTS
    leaf = load_users(g, files["one.json"]).users["w1"]
    expected = 1.0 - torch.from_numpy(_grey(leaf[1].numpy())).view(-1, 1, 28, 28)
    assert torch.equal(leaf[0], expected)
    for name in ("w1.npz", "ink.npz", "w1.csv"):
        x, y = next(iter(load_users(g, files[name], label_column="label").users.values()))
        assert torch.equal(x, expected) and torch.equal(y, leaf[1]), name
    x, y = load_users(g, files["w1_images"]).users["w1_images"]
    order = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert order(x) == order(expected) and sorted(y.tolist()) == sorted(leaf[1].tolist())


@pytest.mark.parametrize("name", ["one.json", "w1.npz", "w1.csv", "w1_images"])
def test_one_image_user_personalizes_and_predicts(files, tmp_path, capsys, name):
    model = tmp_path / "m.pt"
    argv = ["personalize", "--checkpoint", str(files["femnist.pt"]), "--data", str(files[name]),
            "--support-size", "6", "--out", str(model)]  # fmt: skip
    if name.endswith(".csv"):
        argv += ["--label-column", "label"]
    code, out, err = _run(argv, capsys)
    assert code == 0 and err == "", err
    assert "accuracy" in out and "after 1 steps" in out and model.is_file()
    personalized = load_personalized(model)
    assert personalized.inputs == INPUTS.to_dict() and personalized.input_shape == (1, 28, 28)
    preds = tmp_path / "p.csv"
    data = files["unlabelled.csv" if name.endswith(".csv") else name]
    code, out, err = _run(["predict", "--model", str(model), "--data", str(data),
                           "--out", str(preds)], capsys)  # fmt: skip
    assert code == 0 and err == "", err
    table = pd.read_csv(preds)
    assert len(table) == 12 and table["prediction"].between(0, 61).all()
    if not name.endswith(".csv"):
        assert list(table.columns) == ["user", "example", "label", "prediction"]


def test_a_leaf_file_of_many_users_by_their_ids(files, tmp_path, capsys):
    out_dir = tmp_path / "many"
    argv = ["personalize", "--checkpoint", str(files["femnist.pt"]), "--data",
            str(files["two.json"]), "--support-size", "6"]  # fmt: skip
    code, out, err = _run([*argv, "--out-dir", str(out_dir), "--save-models"], capsys)
    assert code == 0 and err == "", err
    assert list(pd.read_csv(out_dir / "personalization.csv")["user"]) == ["w1", "w2"]
    saved = sorted(p.name for p in (out_dir / "models").iterdir())
    assert (
        saved == ["w1.pt", "w2.pt"] and load_personalized(out_dir / "models" / "w2.pt").user == "w2"
    )
    code, out, err = _run([*argv, "--users", "w2", "--out", str(tmp_path / "w2.pt")], capsys)
    assert code == 0 and out.startswith("w2: accuracy")
    # the same user's model from the two-user file and the one-user file: the same numbers
    code, _, _ = _run([*argv, "--users", "w1", "--out", str(tmp_path / "a.pt")], capsys)
    code, _, _ = _run(["personalize", "--checkpoint", str(files["femnist.pt"]), "--data",
                       str(files["one.json"]), "--support-size", "6", "--out",
                       str(tmp_path / "b.pt")], capsys)  # fmt: skip
    a, b = load_personalized(tmp_path / "a.pt"), load_personalized(tmp_path / "b.pt")
    assert a.curve == b.curve
    assert load_checkpoint(files["femnist.pt"]).inputs == INPUTS.to_dict()


@pytest.mark.parametrize(
    ("name", "extra", "needle"),
    [
        ("notes.txt", [], "cannot read a .txt file; give a table"),
        ("no_y.npz", [], "holds arrays ['x'], not ['y']"),
        ("short.csv", ["--label-column", "label"], "the model takes grey images of shape 1x28x28"),
        ("two.json", ["--users", "zz"], "no user 'zz' in the data"),
        ("two.json", [], "holds 2 users"),
    ],
)
def test_a_file_in_the_wrong_format_exits_2_with_one_line(files, tmp_path, capsys, name, extra,
                                                          needle):  # fmt: skip
    target = tmp_path / "out" / "m.pt"
    code, _, err = _run(["personalize", "--checkpoint", str(files["femnist.pt"]), "--data",
                         str(files[name]), *extra, "--out", str(target)], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err and not target.parent.exists()
