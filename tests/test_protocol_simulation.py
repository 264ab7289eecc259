"""The protocol in a real Flower simulation: the client groups recorded in the run directory, the
recipe fitted on the validation clients at the end of training and stored in the checkpoint,
the test clients personalized with it, the devices personalizing with it, `fedmaml personalize`
using it by default, and `fedmaml report` drawing several runs' test users side by side."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedmaml.checkpoint import load_checkpoint
from fedmaml.cli import main
from fedmaml.config import RunConfig
from fedmaml.federated.simulation import simulate
from fedmaml.personalize import load_personalized
from fedmaml.personalize.recipe import Recipe
from fedmaml.tasks.sine import SineFamily

pytestmark = pytest.mark.timeout(600)


def test_a_run_with_validation_clients_fits_and_uses_the_recipe(tmp_path, capsys):
    cfg = RunConfig(
        num_train_clients=4, num_val_clients=2, num_heldout_clients=2, support_fraction=0.2,
        fraction_train=1.0, min_train_nodes=4, num_rounds=3, eval_every=3, eval_clients=2,
        eval_steps=3, recipe_lrs="0.01,0.05", personalize=True, out_dir=str(tmp_path / "maml"),
    )  # fmt: skip
    out = simulate(cfg)
    split = pd.read_csv(out / "clients_split.csv")
    assert split.groupby("group").size().to_dict() == {"test": 2, "train": 4, "validation": 2}
    assert split["client_id"].is_unique
    assert set(zip(split["n_support"], split["n_query"], strict=True)) == {(20, 80)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["dropped"] == 0 and summary["protocol"]["validation"] == 2
    ckpt = load_checkpoint(out / "checkpoint.pt")
    recipe = Recipe.from_dict(ckpt.recipe)
    assert summary["recipe"]["steps"] == recipe.steps and recipe.users == 2
    assert ckpt.inputs == {"shape": [1], "ink": False} and ckpt.round == 3
    candidates = pd.read_csv(out / "recipe.csv")
    assert len(candidates) == 2 * 2 * 4 and candidates["chosen"].sum() == 1
    tests = pd.read_csv(out / "test_users.csv")
    assert len(tests) == 2 and {"at_0", "at_3"} <= set(tests.columns)
    # the devices personalized with the recipe the server sent
    device = load_personalized(sorted((out / "personalized").glob("heldout-*.pt"))[0])
    assert device.steps == recipe.steps and device.adapted == recipe.adapt
    # `fedmaml personalize` applies the recipe by default; --steps overrides it
    user = SineFamily(seed=5, num_heldout=1).client(0, "heldout")
    table = tmp_path / "u.csv"
    pd.DataFrame({"x": user.x[:, 0], "y": user.y[:, 0]}).to_csv(table, index=False)
    argv = ["personalize", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(table)]
    assert main([*argv, "--out", str(tmp_path / "u.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"after {recipe.steps} steps" in printed and "the checkpoint's recipe:" in printed
    assert main([*argv, "--steps", "4"]) == 0 and "after 4 steps" in capsys.readouterr().out
    # two runs side by side: the per-user gain and the steps curve
    other = tmp_path / "other"
    other.mkdir()
    (other / "test_users.csv").write_text(tests.assign(gain=0.0).to_csv(index=False))
    assert main(["report", str(out), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "users_gain_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "| maml | 2 |" in (tmp_path / "cmp" / "users.md").read_text()
    assert "Test users personalized by the recipe" in (out / "summary.md").read_text()
