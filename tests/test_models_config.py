"""Model registry, run configuration, checkpoints and episode sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.meta import model_params
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.models import build_model
from fedmaml.tasks import ClientData, EpisodeSpec, sample_episode
from fedmaml.tasks.episodes import episode_generator
from fedmaml.tasks.sine import SineFamily

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# --------------------------------------------------------------------------- models


def test_sine_mlp_is_1_40_40_1():
    model = build_model("sine_mlp")
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    assert model(torch.randn(7, 1)).shape == (7, 1)


def test_conv4_gives_ways_logits_and_keeps_no_running_statistics():
    model = build_model("conv4", ways=5)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    assert list(model.buffers()) == []
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and not any(m.track_running_stats for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64] * 4
    assert build_model("conv4", ways=20, in_channels=3, image_size=84)(
        torch.randn(2, 3, 84, 84)
    ).shape == (2, 20)


def test_femnist_cnn_and_mlp():
    assert build_model("femnist_cnn")(torch.randn(2, 1, 28, 28)).shape == (2, 62)
    model = build_model("mlp", in_features=9, out_features=3, hidden=16)
    assert model(torch.randn(4, 9)).shape == (4, 3)
    assert model[0].out_features == 16


# --------------------------------------------------------------------------- config


def pyproject_defaults() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_accepted_and_equal_the_dataclass_defaults():
    cfg = RunConfig.from_mapping(pyproject_defaults())
    assert cfg == RunConfig()
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.model_name == "sine_mlp"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("algorithm", "foo", "'algorithm' has value 'foo'"),
        ("inner-lr", 0, "'inner-lr'"),
        ("inner-lr", math.nan, "'inner-lr'"),
        ("meta-lr", "fast", "'meta-lr'"),
        ("fraction-train", 1.5, "'fraction-train'"),
        ("inner-steps", 0, "'inner-steps'"),
        ("eval-episodes", 0, "'eval-episodes'"),
        ("inner-steps", 1.5, "'inner-steps'"),
        ("ways", 1, "'ways'"),
        ("seed", -1, "'seed'"),
        ("batching", "threads", "'batching'"),
        ("device", "tpu", "'device'"),
        ("inner-lrr", 0.1, "unknown config key 'inner-lrr'"),
    ],
)
def test_bad_config_values_name_the_key(key, value, words):
    with pytest.raises(FedmamlError) as info:
        RunConfig.from_mapping({**pyproject_defaults(), key: value})
    assert words in str(info.value)


def test_config_cross_checks():
    with pytest.raises(FedmamlError, match="'dp-clip'"):
        RunConfig.from_mapping({"dp-noise": 0.5})
    with pytest.raises(FedmamlError, match="'data-path'"):
        RunConfig.from_mapping({"task": "omniglot"})
    assert RunConfig.from_mapping({"inner_steps": 5, "inner-lr": 1}).inner_lr == 1.0


# --------------------------------------------------------------------------- checkpoints


def a_checkpoint() -> tuple[Checkpoint, MetaOptimizer]:
    torch.manual_seed(0)
    params = model_params(build_model("sine_mlp"))
    opt = MetaOptimizer(params, "adam", lr=0.01)
    opt.step({k: torch.randn_like(v) for k, v in params.items()})
    ckpt = Checkpoint(
        params=opt.current(),
        model="sine_mlp",
        model_kwargs={"hidden": 40},
        config=RunConfig().to_mapping(),
        round=7,
        optimizer_state=opt.state_dict(),
    )
    return ckpt, opt


def test_checkpoint_round_trips(tmp_path):
    ckpt, opt = a_checkpoint()
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", ckpt)
    loaded = load_checkpoint(path)
    assert loaded.params.keys() == ckpt.params.keys()
    assert all(torch.equal(loaded.params[k], v) for k, v in ckpt.params.items())
    assert (loaded.model, loaded.model_kwargs, loaded.round) == ("sine_mlp", {"hidden": 40}, 7)
    assert RunConfig.from_mapping(loaded.config) == RunConfig()
    model = loaded.build_model()
    model.load_state_dict(loaded.params)
    resumed = MetaOptimizer(loaded.params, "adam", lr=0.01)
    resumed.load_state_dict(loaded.optimizer_state)
    grads = {k: torch.ones_like(v) for k, v in ckpt.params.items()}
    a, b = opt.step(grads), resumed.step(grads)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_damaged_or_foreign_files_are_refused(tmp_path):
    ckpt, _ = a_checkpoint()
    good = save_checkpoint(tmp_path / "good.pt", ckpt).read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    for path in (truncated, noise):
        with pytest.raises(FedmamlError, match="could not be read"):
            load_checkpoint(path)
    with pytest.raises(FedmamlError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(FedmamlError, match="not a fedmaml checkpoint"):
        load_checkpoint(foreign)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda p: {"format": p["format"], "version": p["version"]}, "no parameters"),
        (lambda p: {**p, "model_kwargs": {"hidden": -5}}, "hidden=-5"),
        (lambda p: {**p, "model_kwargs": {"hidden": 10**6}}, "parameters (more than"),
        (lambda p: {**p, "model_kwargs": {"hidden": True}}, "hidden=True"),
        (lambda p: {**p, "model": ["sine_mlp"]}, "no model name"),
        (lambda p: {**p, "model": "resnet999"}, "unknown model"),
        (lambda p: {**p, "config": ["inner-lr", 0.1]}, "config that is not a table"),
        (lambda p: {**p, "params": {"w": "text"}}, "not named tensors"),
        (lambda p: {**p, "round": -1}, "round -1"),
    ],
)
def test_crafted_checkpoints_are_refused_before_anything_is_built(tmp_path, change, words):
    """A checkpoint's structure and model sizes are checked on load: a crafted file gives one
    clear error, never a traceback or a 4 TB allocation (hidden=10**6 is counted on the meta
    device)."""
    ckpt, _ = a_checkpoint()
    payload = torch.load(save_checkpoint(tmp_path / "good.pt", ckpt), weights_only=True)
    torch.save(change(payload), tmp_path / "crafted.pt")
    with pytest.raises(FedmamlError, match="damaged") as info:
        load_checkpoint(tmp_path / "crafted.pt")
    assert words in str(info.value)


def test_failed_save_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path):
    ckpt, _ = a_checkpoint()
    path = save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    before = path.read_bytes()
    unpicklable = Checkpoint(params=ckpt.params, model="sine_mlp", config={"f": lambda: 0})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, it must propagate
        save_checkpoint(path, unpicklable)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path).round == 7


# --------------------------------------------------------------------------- episodes


def labelled_client(classes: int = 6, per_class: int = 7) -> ClientData:
    """Class c holds inputs c*100 + j, so every example is identified by its input value."""
    x = torch.tensor([[c * 100.0 + j] for c in range(classes) for j in range(per_class)])
    y = torch.arange(classes).repeat_interleave(per_class)
    x_test = x + 0.5
    return ClientData("c", x=x, y=y, x_test=x_test, y_test=y.clone())


def test_n_way_episode_labels_counts_and_disjointness():
    client = labelled_client()
    task = sample_episode(client, EpisodeSpec(support=2, query=3, ways=4), torch.Generator())
    (sx, sy), (qx, qy) = task.support, task.query
    assert torch.equal(torch.bincount(sy), torch.full((4,), 2))
    assert torch.equal(torch.bincount(qy), torch.full((4,), 3))
    assert not set(sx.view(-1).tolist()) & set(qx.view(-1).tolist())
    original = {}  # each new label stands for one original class, in support and query alike
    for x, y in zip(
        torch.cat([sx, qx]).view(-1).tolist(), torch.cat([sy, qy]).tolist(), strict=True
    ):
        original.setdefault(y, set()).add(int(x) // 100)
    assert all(len(c) == 1 for c in original.values())
    assert len(set().union(*original.values())) == 4


def test_held_out_episode_queries_the_held_out_pool():
    client = labelled_client()
    task = sample_episode(
        client, EpisodeSpec(support=2, query=3, ways=3), torch.Generator(), held_out=True
    )
    assert all(v % 1 == 0 for v in task.support[0].view(-1).tolist())
    assert all(v % 1 == 0.5 for v in task.query[0].view(-1).tolist())
    sine = SineFamily(seed=1, num_heldout=3).client(2, "heldout")
    plain = sample_episode(sine, EpisodeSpec(10, 20), torch.Generator(), held_out=True)
    assert set(plain.support[0].view(-1).tolist()) <= set(sine.x.view(-1).tolist())
    assert set(plain.query[0].view(-1).tolist()) <= set(sine.x_test.view(-1).tolist())


def test_plain_episode_draws_disjoint_support_and_query():
    sine = SineFamily(seed=2).client(0)
    task = sample_episode(sine, EpisodeSpec(support=10, query=15), torch.Generator())
    assert task.support[0].shape == (10, 1) and task.num_query == 15
    assert not set(task.support[0].view(-1).tolist()) & set(task.query[0].view(-1).tolist())
    with pytest.raises(FedmamlError, match="needs 60"):
        sample_episode(sine, EpisodeSpec(support=30, query=30), torch.Generator())
    with pytest.raises(FedmamlError, match="5-way"):
        sample_episode(labelled_client(classes=4), EpisodeSpec(1, 1, ways=5), torch.Generator())


def test_episode_generator_is_deterministic():
    client, spec = labelled_client(), EpisodeSpec(support=1, query=2, ways=3)

    def draw(*args: int):
        task = sample_episode(client, spec, episode_generator(*args))
        return torch.cat([task.support[0], task.query[0]]).view(-1).tolist()

    assert draw(0, 5, 2) == draw(0, 5, 2)
    others = [draw(1, 5, 2), draw(0, 6, 2), draw(0, 5, 3), draw(0, 5, 2, 1)]
    assert all(o != draw(0, 5, 2) for o in others)
    for seed in (2**31 - 1, 10**7, 2**63):  # large seeds used to overflow manual_seed
        assert draw(seed, 1000, 99) == draw(seed, 1000, 99)


def test_sine_clients_are_pure_functions_of_seed_split_and_index():
    family = SineFamily(seed=4)
    a, b = family.client(3), family.client(3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(family.client(3, "heldout").x, a.x)
    amp, phase = float(a.meta["amplitude"]), float(a.meta["phase"])
    torch.testing.assert_close(a.y, amp * torch.sin(a.x - phase), atol=1e-5, rtol=0)
    assert 0.1 <= amp <= 5.0 and 0 <= phase <= math.pi
