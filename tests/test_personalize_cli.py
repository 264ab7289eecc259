"""`fedmaml personalize` and `fedmaml predict`: one user, many users (table and folder), and bad
input: exit code 2, one line on stderr, no traceback, no output file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedmaml.checkpoint import Checkpoint, save_checkpoint
from fedmaml.cli import main
from fedmaml.config import RunConfig
from fedmaml.meta import model_params
from fedmaml.models import build_model
from fedmaml.personalize import load_personalized
from fedmaml.tasks.sine import SineFamily

FEDMAML = Path(sys.executable).parent / "fedmaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sinusoid checkpoint, a 3-class table checkpoint (user column "user"), and tables."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    sine_cfg = RunConfig(eval_steps=3).to_mapping()
    paths = {
        "sine": save_checkpoint(
            d / "sine.pt",
            Checkpoint(model_params(build_model("sine_mlp")), "sine_mlp", {}, sine_cfg),
        ),
        "classes": save_checkpoint(
            d / "classes.pt",
            Checkpoint(
                model_params(build_model("mlp", in_features=2, out_features=3)),
                "mlp",
                {"in_features": 2, "out_features": 3},
                RunConfig(task="table", data_path="t.csv", label_column="label").to_mapping(),
            ),
        ),
    }
    source = SineFamily(seed=1, num_heldout=5)
    frames = []
    (d / "folder").mkdir()
    for i in range(5):
        c = source.client(i, "heldout")
        frame = pd.DataFrame({"user": f"u{i}", "x": c.x[:, 0], "y": c.y[:, 0]})
        frame[["x", "y"]].to_csv(d / "folder" / f"u{i}.csv", index=False)
        frames.append(frame)
    pd.concat(frames).to_csv(d / "users.csv", index=False)
    frames[0][["x", "y"]].to_csv(d / "one.csv", index=False)
    pd.DataFrame({"x": [-1.0, 0.5, 3.0]}).to_csv(d / "new.csv", index=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 2, generator=g)
    pd.DataFrame({"user": 7, "a": x[:, 0], "b": x[:, 1], "label": [0, 1, 2, 1] * 5}).to_csv(
        d / "labelled.csv", index=False
    )
    paths.update({name: d / f"{name}.csv" for name in ("users", "one", "new", "labelled")})
    paths["folder"] = d / "folder"
    return paths


def test_one_user_then_predict(files, tmp_path, capsys):
    model = tmp_path / "me.pt"
    args = ["personalize", "--checkpoint", str(files["sine"]), "--data", str(files["one"])]
    assert main([*args, "--out", str(model)]) == 0
    out = capsys.readouterr()
    assert "one: mse" in out.out and "after 3 steps (lr 0.01" in out.out and out.err == ""
    assert "curve, k = 0..3:" in out.out and model.is_file()
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model), "--data", str(files["new"]),
                 "--out", str(preds)]) == 0  # fmt: skip
    table = pd.read_csv(preds)
    expected = load_personalized(model).predict(torch.tensor([[-1.0], [0.5], [3.0]]))
    assert list(table.columns) == ["x", "prediction"]
    assert torch.allclose(torch.tensor(table["prediction"].to_numpy()).float(), expected, atol=1e-6)


def test_classifier_from_table_columns_of_the_checkpoint(files, tmp_path, capsys):
    model = tmp_path / "c.pt"
    assert main(["personalize", "--checkpoint", str(files["classes"]), "--data",
                 str(files["labelled"]), "--steps", "2", "--out", str(model)]) == 0  # fmt: skip
    assert "labelled: accuracy" in capsys.readouterr().out
    assert load_personalized(model).columns["feature_columns"] == ["a", "b"]


@pytest.mark.parametrize("layout", ["table", "folder"])
def test_many_users(files, tmp_path, capsys, layout):
    data = ["--data", str(files["users"]), "--user-column", "user"]
    if layout == "folder":
        data = ["--data", str(files["folder"])]
    out_dir = tmp_path / "out"
    assert main(["personalize", "--checkpoint", str(files["sine"]), *data,
                 "--out-dir", str(out_dir), "--support-size", "10"]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert "personalized 5 users in 3 steps" in out.out and out.err == ""  # quiet off a TTY
    table = pd.read_csv(out_dir / "personalization.csv")
    assert list(table.columns) == [
        "user", "n_support", "n_eval", "metric_before", "metric_after", "gain"
    ]  # fmt: skip
    assert list(table["user"]) == [f"u{i}" for i in range(5)]
    assert (table["n_support"] == 10).all() and (table["n_eval"] == 40).all()
    assert (out_dir / "gain.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out_dir.iterdir()) == ["gain.png", "personalization.csv"]


def test_progress_bar_on_request(files, tmp_path):
    assert main(["personalize", "--checkpoint", str(files["sine"]), "--data", str(files["folder"]),
                 "--out-dir", str(tmp_path), "--progress", "--batching", "loop"]) == 0  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bad_cases(files: dict[str, Path], d: Path) -> dict[str, tuple[list[str], str]]:
    truncated = d / "truncated.pt"
    truncated.write_bytes(files["sine"].read_bytes()[:200])
    one = ["personalize", "--checkpoint", str(files["sine"]), "--data"]
    classes = ["personalize", "--checkpoint", str(files["classes"]), "--data"]
    return {
        "empty file": ([*one, str(_write(d / "empty.csv", ""))], "the file is empty"),
        "header only": ([*one, str(_write(d / "head.csv", "x,y\n"))], "no data rows"),
        "missing label column": (
            [*one, str(_write(d / "nolabel.csv", "x,z\n1,2\n3,4\n"))],
            "missing column(s) ['y']",
        ),
        "wrong label column": ([*one, str(files["one"]), "--label-column", "q"], "['q']"),
        "non-numeric": (
            [*one, str(_write(d / "text.csv", "x,y\n1,2\n3,abc\n4,5\n"))],
            "non-numeric value(s) (first at row 1)",
        ),
        "nan": ([*one, str(_write(d / "nan.csv", "x,y\n1,2\n3,\n4,5\n"))], "NaN"),
        "unseen class": (
            [*classes, str(_write(d / "cls.csv", "a,b,label\n0,0,0\n1,1,1\n2,2,3\n3,3,2\n"))],
            "1 row(s) whose label is not a class id (first at row 2)",
        ),
        "too few rows": ([*one, str(files["one"]), "--support-size", "50"], "support size 50"),
        "another feature count": (
            [
                *one,
                str(_write(d / "two.csv", "x,w,y\n1,2,3\n3,4,5\n5,6,7\n")),
                "--feature-columns",
                "x,w",
            ],
            "2 feature(s)",
        ),
        "truncated checkpoint": (
            ["personalize", "--checkpoint", str(truncated), "--data", str(files["one"])],
            "truncated",
        ),
        "not a checkpoint": (
            ["personalize", "--checkpoint", str(files["one"]), "--data", str(files["one"])],
            "could not be read",
        ),
        "missing checkpoint": (
            ["personalize", "--checkpoint", str(d / "no.pt"), "--data", str(files["one"])],
            "does not exist",
        ),
        "many users into --out": (
            [*one, str(files["users"]), "--user-column", "user"],
            "give --out-dir",
        ),
        "a table of many users read as one": ([*one, str(files["users"])], "holds 5 users"),
        "predict with a training checkpoint": (
            ["predict", "--model", str(files["sine"]), "--data", str(files["new"])],
            "not a personalized model",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty file", "header only", "missing label column", "wrong label column",
        "non-numeric", "nan", "unseen class", "too few rows", "another feature count",
        "truncated checkpoint", "not a checkpoint", "missing checkpoint",
        "many users into --out", "a table of many users read as one",
        "predict with a training checkpoint",
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys, case):
    argv, message = _bad_cases(files, tmp_path)[case]
    target = tmp_path / "result" / ("model.pt" if argv[0] == "personalize" else "pred.csv")
    assert main([*argv, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fedmaml {argv[0]}: error: "), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "result").exists()


def test_predict_refuses_a_table_without_the_features(files, tmp_path, capsys):
    model = tmp_path / "me.pt"
    assert main(["personalize", "--checkpoint", str(files["sine"]), "--data", str(files["one"]),
                 "--out", str(model)]) == 0  # fmt: skip
    capsys.readouterr()
    bad = _write(tmp_path / "bad.csv", "z\n1\n")
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(model), "--data", str(bad), "--out", str(preds)]) == 2
    assert "lacks the feature column(s) ['x']" in capsys.readouterr().err
    assert not preds.exists()


def test_installed_command(files, tmp_path):
    model = tmp_path / "me.pt"
    ok = subprocess.run(
        [str(FEDMAML), "personalize", "--checkpoint", str(files["sine"]), "--data",
         str(files["one"]), "--out", str(model)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "mse" in ok.stdout and model.is_file()
    bad = subprocess.run(
        [str(FEDMAML), "predict", "--model", str(files["sine"]), "--data", str(files["new"]),
         "--out", str(tmp_path / "p.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "not a personalized model" in bad.stderr and not (tmp_path / "p.csv").exists()


def test_head_only_personalization_from_the_command_line(files, tmp_path, capsys):
    """--adapt head: the body of the personalized model is bit-identical to the checkpoint's,
    the head moved, and the record says which parameters adapted."""
    from fedmaml.checkpoint import load_checkpoint

    ckpt_path, user, out = files["sine"], files["one"], tmp_path / "head.pt"
    args = ["--data", str(user), "--adapt", "head", "--out", str(out)]
    assert main(["personalize", "--checkpoint", str(ckpt_path), *args]) == 0
    assert "head adapted" in capsys.readouterr().out
    theta, model = load_checkpoint(ckpt_path).params, load_personalized(out)
    assert model.adapted == "head"
    head = {"4.weight", "4.bias"}
    for name, value in model.params.items():
        assert torch.equal(value, theta[name]) == (name not in head), name


def test_a_checkpoint_with_a_damaged_run_config_is_one_clear_line(files, tmp_path, capsys):
    from fedmaml.checkpoint import load_checkpoint

    ckpt_path, user = files["sine"], files["one"]
    ckpt = load_checkpoint(ckpt_path)
    ckpt.config = {**ckpt.config, "inner-lr": "abc"}
    save_checkpoint(tmp_path / "bad.pt", ckpt)
    code = main(["personalize", "--checkpoint", str(tmp_path / "bad.pt"), "--data", str(user)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "run configuration is damaged" in err and "inner-lr" in err
