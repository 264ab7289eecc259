"""Secure aggregation (SecAgg+) in real Flower simulations: the server receives no client's
meta-gradient, only masked vectors, yet θ after a round is the plain aggregation's within the
quantization error (MAML and Meta-SGD, whose learned step sizes are masked and summed too); a
client that fails after sharing its keys does not stop the round; noise added after unmasking
has the standard deviation σC/n. And the settings that need individual updates are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
import tomllib
import torch

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.secagg_vector import MODULUS
from fedmaml.federated.simulation import simulate
from fedmaml.problem import Problem

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]


def secure_config(tmp_path: Path, name: str, **changes) -> RunConfig:
    base = dict(
        num_train_clients=4,
        num_heldout_clients=1,
        fraction_train=1.0,
        min_train_nodes=2,
        num_rounds=1,
        eval_every=1,
        eval_clients=1,
        meta_optimizer="sgd",
        meta_lr=0.1,
        secure_aggregation=True,
        max_update_norm=5.0,
        out_dir=str(tmp_path / name),
    )
    return RunConfig(**{**base, **changes})


def recording_app(tmp_path: Path) -> Path:
    """fedmaml's app with a ServerApp whose Grid saves every reply it receives."""
    app = tmp_path / "recording-app"
    app.mkdir()
    shutil.copy(Path(__file__).parent / "recording_app" / "recording_server.py", app)
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    flwr = project["tool"]["flwr"]["app"]
    flwr["components"] = {
        "serverapp": "recording_server:app",
        "clientapp": "fedmaml.federated.client_app:app",
    }
    flwr["fab-include"] = ["pyproject.toml", "*.py"]
    (app / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": project["build-system"],
                "project": {**project["project"], "name": "fedmaml-recording"},
                "tool": {"flwr": {"app": flwr}},
            }
        )
    )
    return app


def client_updates(cfg: RunConfig, meta_round: int = 1) -> list[dict[str, torch.Tensor]]:
    """Every training client's Δ_i = −g_i at θ_0, computed here, clipped as on the device."""
    work = Problem.from_config(cfg)
    theta = work.initial_params()
    updates = []
    for i in range(cfg.num_train_clients):
        g, _ = work.client_meta_gradient(theta, work.source.client(i), i, meta_round)
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())))
        scale = min(1.0, cfg.clip_norm / norm)
        updates.append({k: -v * scale for k, v in g.items()})
    return updates


def flat(arrays: dict) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_the_server_gets_only_masked_vectors_and_theta_equals_the_plain_aggregation(
    tmp_path, algorithm
):
    cfg = secure_config(tmp_path, algorithm, algorithm=algorithm)
    out = Path(cfg.out_dir)
    simulate(cfg, app_dir=recording_app(tmp_path), app_config=cfg.to_mapping())

    # θ_1 = θ_0 + β·mean(Δ_i): the plain aggregation, within the quantization error
    theta = Problem.from_config(cfg).initial_params()
    updates = client_updates(cfg)
    applied = load_checkpoint(out / "checkpoint.pt").params
    if algorithm == "metasgd":
        assert any(k.startswith("inner_lr.") for k in applied)
    step = 2 * cfg.clip_norm / 2**cfg.secagg_bits  # one quantization level
    for k in theta:
        expected = theta[k] + cfg.meta_lr * torch.stack([u[k] for u in updates]).mean(0)
        torch.testing.assert_close(applied[k], expected, rtol=0, atol=cfg.meta_lr * step + 1e-6)
    moved = max(float((applied[k] - theta[k]).abs().max()) for k in theta)
    assert moved > 1000 * cfg.meta_lr * step  # the round did move θ

    # what the server received: no float array, no metric value; masked vectors that carry
    # no trace of any client's update
    received = [dict(np.load(f, allow_pickle=True)) for f in sorted((out / "received").glob("*"))]
    train_replies = [r for r in received if "config/secagg/masked" in r]
    assert len(train_replies) == cfg.num_train_clients
    for reply in train_replies:
        assert not any(k.startswith(("array/", "metric/")) for k in reply)
    true = np.stack([flat(u) for u in updates])
    for reply in train_replies:
        masked = np.frombuffer(reply["config/secagg/masked"].item(), dtype="<u4")
        as_if_plain = masked[: true.shape[1]].astype(np.float64) * step - cfg.clip_norm
        # a quantized update decodes to itself; a masked one is uniform noise over the range
        assert np.abs(as_if_plain).max() > 100 * np.abs(true).max()
        for update in true:
            assert abs(np.corrcoef(as_if_plain, update)[0, 1]) < 0.15
        assert masked.max() > MODULUS / 2  # the masks fill Z_{2^32}
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[1, "ok"] == cfg.num_train_clients and bool(rounds.loc[1, "updated"])
    # the training losses are summed under the masks too, and come back as the clients' mean
    assert 0 < rounds.loc[1, "train-loss-after"] < 100


def test_a_client_failing_after_key_sharing_does_not_stop_the_round(tmp_path):
    """One user's rows hold 1e30: its adaptation overflows, it refuses to mask a NaN update in
    the masking stage, after sharing its keys. The server rebuilds its key from the others'
    shares, removes its pairwise masks, and θ moves with the other users' sum."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(5):
        x = rng.normal(size=(30, 3))
        if user == 2:
            x[:, 0] = 1e30
        y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)
        rows += [
            {"user": user, "a": a, "b": b, "c": c, "label": t}
            for (a, b, c), t in zip(x, y, strict=True)
        ]
    data = tmp_path / "users.csv"
    pd.DataFrame(rows).to_csv(data, index=False)
    cfg = secure_config(
        tmp_path,
        "dropout",
        task="table",
        data_path=str(data),
        num_train_clients=5,
        num_heldout_clients=0,
        min_train_nodes=3,
        support_size=5,
        query_size=5,
        num_rounds=2,
        eval_every=10,
    )
    out = simulate(cfg)
    clients = pd.read_csv(out / "clients.csv")
    train = clients[clients["phase"] == "train"]
    failed = train[train["status"] != "ok"]
    assert len(train) == 10 and len(failed) == 2 and set(failed["client"]) == {2}
    assert failed["reason"].str.startswith("collect-masked:").all()
    assert failed["reason"].str.contains("NaN or Inf").all()
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert list(rounds.loc[[1, 2], "ok"]) == [4, 4]
    assert rounds.loc[[1, 2], "updated"].all()
    assert load_checkpoint(out / "checkpoint.pt").round == 2


def test_noise_added_after_unmasking_has_std_sigma_c_over_n(tmp_path):
    clip, sigma = 0.5, 0.4
    cfg = secure_config(
        tmp_path, "dp", dp_clip=clip, dp_noise=sigma, max_update_norm=0.0, meta_lr=1.0
    )
    out = simulate(cfg)
    theta = Problem.from_config(cfg).initial_params()
    updates = client_updates(cfg)
    applied = load_checkpoint(out / "checkpoint.pt").params
    residual = np.concatenate(
        [
            (applied[k] - theta[k] - torch.stack([u[k] for u in updates]).mean(0)).numpy().ravel()
            for k in theta
        ]
    )
    expected = sigma * clip / cfg.num_train_clients
    assert residual.std() == pytest.approx(expected, rel=0.1)
    assert abs(residual.mean()) < 4 * expected / np.sqrt(residual.size)
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[1, "dp-noise-std"] == pytest.approx(expected)
    assert rounds.loc[1, "epsilon"] > 0


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"aggregator": "median"}, "median, trimmed mean and Krum need every client's update"),
        ({"aggregator": "krum"}, "the server sees only their sum"),
        ({"aggregation": "weighted"}, "'aggregation'"),
        ({"max_update_norm": 0.0}, "each client clips its own"),
        ({"max_update_norm": float("inf")}, "each client clips its own"),
        ({"min_train_nodes": 1}, "a sum of one update is that update"),
        ({"secagg_shares": 4}, "an odd number in 3..10"),
        ({"secagg_shares": 11}, "an odd number in 3..10"),
        ({"secagg_shares": 5, "secagg_threshold": 2}, "an integer in 3..5"),
        ({"secagg_threshold": 11}, "an integer in 6..10"),
        ({"secagg_bits": 29}, "an integer in 2..28"),
        ({"secagg_clip_range": -1.0}, "'secagg-clip-range'"),
        ({"users_per_node": 2}, "masks its own update with its own keys"),
    ],
)
def test_settings_that_need_individual_updates_or_break_the_protocol_are_refused(changes, words):
    base = dict(secure_aggregation=True, max_update_norm=1.0)
    with pytest.raises(FedmamlError) as info:
        RunConfig(**{**base, **changes})
    assert words in str(info.value)


def test_protocol_defaults_follow_the_round_size():
    cfg = RunConfig(secure_aggregation=True, dp_clip=1.0)
    assert cfg.clients_per_round == 10 and cfg.secagg_share_count == 10
    assert cfg.secagg_share_threshold == 6 and cfg.clip_norm == 1.0
    assert RunConfig(secure_aggregation=True, dp_clip=2.0, max_update_norm=1.0).clip_norm == 1.0
