"""The evaluation protocol: client groups (train / validation / test), each client's support and
query sets, clients dropped before the counts; the personalization recipe chosen on validation
users only, stored in the checkpoint and used by default."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta import model_params
from fedmaml.models import build_model
from fedmaml.personalize import personalize, personalize_many
from fedmaml.personalize.recipe import Recipe, fit_recipe
from fedmaml.personalize.run_recipe import finish_run, fit_run_recipe
from fedmaml.problem import Problem
from fedmaml.tasks.episodes import ClientData, EpisodeSpec, sample_episode
from fedmaml.tasks.partition import fraction_sizes, split_groups, support_query_split
from fedmaml.tasks.protocol import SupportQuerySource, group_counts, group_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "femnist"
TAR = SHARED / "femnist_leaf_sf005.tar.xz"


def test_client_groups_are_disjoint_and_reproducible():
    ids = [f"w{i:03d}" for i in range(100)]
    a = split_groups(ids, 10, seed=3, num_val=10)
    assert [len(a[g]) for g in ("train", "val", "heldout")] == [80, 10, 10]
    assert set(a["train"]) | set(a["val"]) | set(a["heldout"]) == set(ids)
    assert not set(a["train"]) & set(a["val"]) and not set(a["val"]) & set(a["heldout"])
    assert split_groups(list(reversed(ids)), 10, seed=3, num_val=10) == a  # order-free
    assert split_groups(ids, 10, seed=4, num_val=10)["val"] != a["val"]  # seeded
    # validation clients come out of the training group: the test group is unchanged
    assert split_groups(ids, 10, seed=3)["heldout"] == a["heldout"]
    with pytest.raises(FedmamlError, match=r"num-val-clients=30 .* ask for 120"):
        split_groups(ids, 10, seed=3, num_train=80, num_val=30)


def test_support_query_split_by_fraction():
    assert fraction_sizes(161, 0.2) == (32, 129) and fraction_sizes(5, 0.2) == (1, 4)
    assert fraction_sizes(2, 0.9) == (1, 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g), torch.arange(40)
    client = ClientData("u", x[:30], y[:30], x[30:], y[30:])
    split = support_query_split(client, 0.25, seed=7)
    assert (len(split.y), len(split.y_test)) == (10, 30)
    assert sorted(torch.cat([split.y, split.y_test]).tolist()) == list(range(40))  # a partition
    again = support_query_split(client, 0.25, seed=7)
    assert torch.equal(again.y, split.y) and torch.equal(again.x_test, split.x_test)
    assert not torch.equal(support_query_split(client, 0.25, seed=8).y, split.y)
    # every episode of such a client is its whole support set and its whole query set
    spec = EpisodeSpec(support=5, query=5, fraction=0.25)
    task = sample_episode(split, spec, g)
    assert torch.equal(task.support[1], split.y) and torch.equal(task.query[1], split.y_test)
    with pytest.raises(FedmamlError, match="10 support examples but at least 12"):
        sample_episode(split, EpisodeSpec(support=12, query=5, fraction=0.25), g)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("support-fraction", 1.0, "a share in"),
        ("recipe-lrs", "0.1,abc", "numbers > 0"),
        ("recipe-lrs", "-1", "numbers > 0"),
        ("recipe-adapt", "body", "all, head"),
        ("num-val-clients", -1, "integer >= 0"),
    ],
)
def test_protocol_keys_are_checked(key, value, needle):
    with pytest.raises(FedmamlError, match=needle):
        RunConfig.from_mapping({key: value})


def test_whole_sets_keep_the_data_labels_and_local_runs_have_no_validation_clients():
    with pytest.raises(FedmamlError, match="'ways'"):
        RunConfig.from_mapping({"support-fraction": 0.2, "ways": 5})
    with pytest.raises(FedmamlError, match="the server holds no data"):
        RunConfig.from_mapping({"task": "local", "input-shape": "2", "num-val-clients": 1})
    cfg = RunConfig.from_mapping({"inner-lr": 0.04, "recipe-adapt": "head"})
    assert cfg.recipe_lr_list == [0.01, 0.02, 0.04, 0.08, 0.16]
    assert cfg.recipe_adapt_list == ["head"]


def test_fedmeta_protocol_on_the_shared_femnist_sample():
    """The ready config: 5 writers too small for a support set of 10 are dropped before the
    counts are checked, and the 100 usable ones give 80 / 10 / 10, each writer split 20 / 80."""
    if not TAR.is_file():
        pytest.skip("../shared/data/femnist is not available")
    from fedmaml.commands.simulate import tomllib
    from fedmaml.tasks.registry import open_source

    config = Path(__file__).resolve().parents[1] / "simulations" / "femnist_fedmeta.toml"
    values = {**tomllib.loads(config.read_text()), "data-path": str(TAR)}
    cfg = RunConfig.from_mapping(values)
    source = open_source(cfg)
    assert isinstance(source, SupportQuerySource)
    assert group_counts(source) == {"train": 80, "validation": 10, "test": 10, "dropped": 5}
    rows = group_table(source)
    groups = {r["client_id"]: r["group"] for r in rows}
    assert len(groups) == 105  # every writer once: a group or dropped
    for row in rows:
        if row["group"] == "dropped":
            assert "support examples but at least 10" in row["reason"]
        else:
            n = row["n_support"] + row["n_query"]
            assert (row["n_support"], row["n_query"]) == fraction_sizes(n, 0.2)
    assert group_table(open_source(cfg)) == rows  # reproducible
    other = {r["client_id"]: r["group"] for r in group_table(open_source(cfg.replace(seed=1)))}
    assert other != groups
    with pytest.raises(FedmamlError, match=r"the data has 100 usable \(5 more were too small"):
        open_source(cfg.replace(num_train_clients=81))


# --- the recipe ---------------------------------------------------------------------------


def _classifier() -> tuple[Checkpoint, list[ClientData]]:
    """A 3-class MLP and 6 users whose labels follow one linear rule per user."""
    torch.manual_seed(0)
    model = build_model("mlp", in_features=2, out_features=3)
    ckpt = Checkpoint(model_params(model), "mlp", {"in_features": 2, "out_features": 3})
    users = []
    for u in range(6):
        g = torch.Generator().manual_seed(u)
        x = torch.randn(60, 2, generator=g)
        y = ((x[:, 0] * (1 + u % 2) + x[:, 1] > 0).long() + (x[:, 0] > 1).long()) % 3
        users.append(ClientData(f"u{u}", x[:20], y[:20], x[20:], y[20:]))
    return ckpt, users


def _fit(ckpt: Checkpoint, users: list[ClientData]) -> dict[str, torch.Tensor]:
    """θ after 300 full-batch gradient steps on every user's data pooled."""
    from torch.func import functional_call

    model = ckpt.build_model()
    params = {k: v.clone().requires_grad_() for k, v in ckpt.params.items()}
    x = torch.cat([torch.cat([u.x, u.x_test]) for u in users])
    y = torch.cat([torch.cat([u.y, u.y_test]) for u in users])
    opt = torch.optim.Adam(params.values(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def test_the_recipe_beats_the_global_model_on_validation_users_or_is_zero_steps():
    ckpt, users = _classifier()
    recipe = fit_recipe(ckpt, users[:3], max_steps=8, lrs=[0.1, 0.5], adapts=["all", "head"])
    assert 1 <= recipe.steps <= 8 and recipe.lr in (0.1, 0.5) and recipe.users == 3
    assert recipe.value > recipe.global_value
    best = max(max(c["curve"][1:]) for c in recipe.candidates)
    assert recipe.value == pytest.approx(best)
    # a global model that already fits the users, who adapt on wrongly labelled support sets:
    # every step hurts, so the recipe is the global model
    ckpt.params = _fit(ckpt, users)
    wrong = [ClientData(u.client_id, u.x, (u.y + 1) % 3, u.x_test, u.y_test) for u in users[:3]]
    zero = fit_recipe(ckpt, wrong, max_steps=8, lrs=[0.1, 0.5], adapts=["all", "head"])
    assert zero.steps == 0 and zero.value == zero.global_value
    # a step size that diverges is left out and recorded
    huge = fit_recipe(ckpt, users[:3], max_steps=3, lrs=[1e30], adapts=["all"])
    assert huge.steps == 0 and huge.candidates == [{"adapt": "all", "lr": 1e30, "diverged": True}]


def test_a_recipe_of_zero_steps_returns_the_global_model_and_flags_override_it(tmp_path):
    ckpt, users = _classifier()
    ckpt.recipe = Recipe(0, None, "all").to_dict()
    path = save_checkpoint(tmp_path / "zero.pt", ckpt)
    result = personalize(path, users[0])
    assert result.steps == 0 and len(result.curve) == 1 and result.gain == 0
    for name, value in result.params.items():
        assert torch.equal(value, ckpt.params[name])
    assert personalize(path, users[0], steps=2).steps == 2  # an explicit flag wins


def test_a_head_only_recipe_leaves_the_body_bit_identical(tmp_path):
    ckpt, users = _classifier()
    ckpt.recipe = Recipe(3, 0.5, "head").to_dict()
    path = save_checkpoint(tmp_path / "head.pt", ckpt)
    result = personalize(path, users[1])
    assert (result.steps, result.lr, result.adapted) == (3, 0.5, "head")
    head = {"4.weight", "4.bias"}
    for name, value in result.params.items():
        assert torch.equal(value, ckpt.params[name]) == (name not in head), name
    df = personalize_many(path, users)
    assert df.attrs["steps"] == 3 and df.attrs["adapted"] == "head"
    assert df["metric_after"].iloc[1] == pytest.approx(result.metric_after)


def test_the_recipe_is_stored_in_the_checkpoint_and_old_checkpoints_load(tmp_path):
    ckpt, users = _classifier()
    recipe = fit_recipe(ckpt, users[:3], max_steps=4, lrs=[0.2], adapts=["head"])
    ckpt.recipe = recipe.to_dict()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "r.pt", ckpt))
    assert Recipe.from_dict(loaded.recipe) == recipe
    old = Checkpoint(ckpt.params, ckpt.model, ckpt.model_kwargs)
    assert load_checkpoint(save_checkpoint(tmp_path / "old.pt", old)).recipe is None
    ckpt.recipe = {"steps": -2, "adapt": "all"}
    save_checkpoint(tmp_path / "bad.pt", ckpt)
    with pytest.raises(FedmamlError, match="recipe is damaged"):
        personalize(tmp_path / "bad.pt", users[0])


class _Spy:
    """A real source that records which groups were read, in order."""

    def __init__(self, source):
        self.source, self.reads = source, []
        self.loss = source.loss

    def num_clients(self, split):
        return self.source.num_clients(split)

    def model_kwargs(self):
        return self.source.model_kwargs()

    def client(self, index, split="train"):
        self.reads.append(split)
        return self.source.client(index, split)


def test_the_recipe_is_chosen_on_validation_users_only(tmp_path):
    cfg = RunConfig(
        num_train_clients=4, num_val_clients=3, num_heldout_clients=3, support_fraction=0.2,
        eval_steps=3, recipe_lrs="0.01,0.05", out_dir=str(tmp_path),
    )  # fmt: skip
    work = Problem.from_config(cfg)
    params = work.train_centrally(5).params
    work.source = spy = _Spy(work.source)
    recipe = fit_run_recipe(work, params)
    assert spy.reads == ["val"] * 3
    # the test users are measured only after the recipe is fixed, and do not change it
    spy.reads.clear()
    assert finish_run(work, params, tmp_path) == recipe
    assert spy.reads == ["val"] * 3 + ["heldout"] * 3
    users = (tmp_path / "test_users.csv").read_text().splitlines()
    assert len(users) == 4 and users[0].startswith("user,n_support,n_eval,metric_before")
    assert math.isfinite(recipe.value)
