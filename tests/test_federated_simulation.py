"""Real Flower simulations (Ray backend) of fedmaml's ServerApp and ClientApp.

Each run goes through ``fedmaml.federated.simulation.simulate``: its own SuperLink on free
ports, ``flwr run``, and a clean stop. The federated result is checked against the
centralized reference computed here, in this process, on the same tasks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.federated.simulation import SimulationOptions, simulate
from fedmaml.personalize import load_personalized
from fedmaml.problem import Problem

pytestmark = pytest.mark.timeout(600)


def small_config(tmp_path, name: str, **changes) -> RunConfig:
    base = dict(
        num_train_clients=5,
        num_heldout_clients=1,
        fraction_train=1.0,
        min_train_nodes=5,
        num_rounds=1,
        eval_every=1,
        eval_clients=1,
        meta_optimizer="sgd",
        meta_lr=0.1,
        out_dir=str(tmp_path / name),
    )
    return RunConfig(**{**base, **changes})


def centralized(cfg: RunConfig, steps: int) -> dict[str, torch.Tensor]:
    """The same meta-updates computed in one process: every client in every step."""
    work = Problem.from_config(cfg)
    return work.train_centrally(steps, clients=list(range(cfg.num_train_clients))).params


def assert_params_close(actual, expected, atol=1e-6):
    assert set(actual) == set(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=atol)


#: Adam divides each coordinate's step by √v: where g ≈ 0, float32 rounding differences between
#: the clients' per-task engine and the centralized batch (and Flower's summation order) move θ
#: by up to a few 1e-6 (seen: 2.6e-6 in 1 of 1,600 coordinates)
ADAM_ATOL = 1e-5


def test_one_sgd_round_equals_one_centralized_maml_step(tmp_path):
    cfg = small_config(tmp_path, "sgd", personalize=True)
    # one node more than there are clients: a simulated node can compute any client, so the
    # extra node is one more worker; the clients and the result are the same
    out = simulate(cfg, SimulationOptions(num_supernodes=cfg.num_train_clients + 2))
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.round == 1
    assert_params_close(ckpt.params, centralized(cfg, 1))
    assert ckpt.optimizer_state is not None
    clients = pd.read_csv(out / "clients.csv")
    train = clients[clients["phase"] == "train"]
    assert sorted(train["client"]) == list(range(5)) and (train["status"] == "ok").all()
    assert "describe" not in set(clients["phase"])  # nobody failed to say who they are
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[1, "ok"] == 5 and rounds.loc[1, "failed"] == 0
    # federated evaluation on the held-out client equals the server's central evaluation
    assert rounds.loc[1, "unseen-loss-1"] == pytest.approx(rounds.loc[1, "central-loss-1"])
    # then every client personalized θ on its device, kept the model there, sent metrics only
    personalized = clients[clients["phase"] == "personalize"]
    assert len(personalized) == 6 and (personalized["status"] == "ok").all()
    assert (personalized["mse-after"] < personalized["mse-before"]).mean() > 0.5
    files = sorted((out / "personalized").glob("*.pt"))
    assert [f.name for f in files] == ["heldout-0.pt", *(f"train-{i}.pt" for i in range(5))]
    model = load_personalized(files[0])
    assert model.predict(torch.zeros(3, 1)).shape[0] == 3
    assert "personalized-unseen-mse-after" in rounds.columns


def test_adam_three_rounds_then_resume_to_five(tmp_path):
    cfg = small_config(
        tmp_path,
        "adam",
        meta_optimizer="adam",
        meta_lr=0.01,
        num_rounds=3,
        algorithm="metasgd",
        inner_steps=2,
        eval_every=10,
    )
    out = simulate(cfg)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.round == 3 and any(k.startswith("inner_lr.") for k in ckpt.params)
    assert_params_close(ckpt.params, centralized(cfg, 3), atol=ADAM_ATOL)

    resumed = cfg.replace(num_rounds=5, resume=str(out / "checkpoint.pt"))
    out = simulate(resumed)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.round == 5
    assert_params_close(ckpt.params, centralized(cfg, 5), atol=ADAM_ATOL)
    assert list(pd.read_csv(out / "rounds.csv")["round"]) == [0, 1, 2, 3, 4, 5]


def test_median_inside_central_dp_applies_to_meta_gradients(tmp_path):
    clip, sigma = 0.5, 0.2
    cfg = small_config(
        tmp_path, "dp", aggregator="median", dp_clip=clip, dp_noise=sigma, meta_lr=1.0
    )
    out = simulate(cfg)
    applied = load_checkpoint(out / "checkpoint.pt").params
    work = Problem.from_config(cfg)
    theta = work.initial_params()
    clipped = []
    for i in range(cfg.num_train_clients):
        g, _ = work.client_meta_gradient(theta, work.source.client(i), i, 1)
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
        clipped.append({k: v * min(1.0, clip / float(norm)) for k, v in g.items()})
    residual = np.concatenate(
        [
            (applied[k] - (theta[k] - torch.stack([c[k] for c in clipped]).median(0).values))
            .numpy()
            .ravel()
            for k in theta
        ]
    )
    expected_std = sigma * clip / cfg.num_train_clients  # Flower's σC/n
    assert residual.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(residual.mean()) < 4 * expected_std / np.sqrt(residual.size)


def test_simulation_of_24_clients_lowers_heldout_mse(tmp_path):
    cfg = RunConfig(
        num_train_clients=24,
        num_heldout_clients=20,
        fraction_train=0.25,
        num_rounds=120,
        meta_lr=0.01,
        eval_every=60,
        eval_clients=20,
        seed=2,
        out_dir=str(tmp_path / "learn"),
    )
    out = simulate(cfg)
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds["ok"].dropna().eq(6).all()
    before, after = rounds.loc[0, "central-loss-1"], rounds.loc[120, "central-loss-1"]
    assert after < 0.85 * before, (before, after)
    assert rounds.loc[120, "unseen-loss-1"] < rounds.loc[120, "unseen-loss-0"]
