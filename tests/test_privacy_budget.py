"""The privacy budget: ε against independent computations (the closed form of the Gaussian
mechanism's RDP without sampling; Flower's own RdpAccountant driven with the same sampled
events), the ledger across a resume, and a real simulation that stops at ``dp-max-epsilon``
with a final checkpoint, then resumes with a larger budget."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedmaml.accounting import PrivacyLedger
from fedmaml.checkpoint import load_checkpoint
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.privacy import BudgetExhausted, PrivacyAccount
from fedmaml.federated.simulation import simulate
from fedmaml.rundir.report import report

pytestmark = pytest.mark.timeout(600)


def closed_form_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Every client in every round (q = 1): the Gaussian mechanism with replace-one
    sensitivity 2C and noise std σC has RDP α·(2/σ)²/2 per release; T releases add up; ε is
    the conversion of Canonne, Kamath & Steinke (2020, Prop. 12), minimized over a dense grid
    of orders."""
    alpha = np.concatenate([np.linspace(1.01, 20, 400_000), np.linspace(20, 5000, 400_000)])
    rdp = releases * alpha * (2 / sigma) ** 2 / 2
    return float(np.min(rdp + np.log1p(-1 / alpha) - np.log(delta * alpha) / (alpha - 1)))


@pytest.mark.parametrize(("sigma", "releases"), [(1.0, 1), (2.0, 10), (8.0, 300)])
def test_epsilon_without_sampling_matches_the_closed_form(sigma, releases):
    ledger = PrivacyLedger(sigma, population=10, delta=1e-5)
    for _ in range(releases):
        epsilon = ledger.add(ledger.release(10, 10))
    assert epsilon == pytest.approx(closed_form_epsilon(sigma, releases, 1e-5), rel=1e-3)


@pytest.mark.parametrize(("sigma", "m", "n", "releases"), [(2.0, 10, 100, 50), (6.0, 5, 40, 300)])
def test_sampled_epsilon_matches_flowers_accountant(sigma, m, n, releases):
    """Flower's RdpAccountant, told the same thing: m of N sampled without replacement,
    replace-one neighbours, noise multiplier σ/2, composed ``releases`` times."""
    ledger = PrivacyLedger(sigma, population=n, delta=1e-5)
    for _ in range(releases):
        ledger.add(ledger.release(m, n))
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=n,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
        )
    )
    flower.compose(GaussianPrivacyEvent(sigma / 2, m, n), count=releases)
    assert ledger.epsilon == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)
    # sampling amplifies: every client every round costs more
    assert ledger.epsilon < closed_form_epsilon(sigma, releases, 1e-5)


def test_a_smaller_pool_is_accounted_at_its_higher_rate():
    ledger = PrivacyLedger(2.0, population=100, delta=1e-5)
    assert ledger.release(10, 100).sample_size == 10
    assert ledger.release(10, 50).sample_size == 20  # rate 10/50 = 20/100
    assert ledger.release(10, 7).sample_size == 100


def test_the_ledger_survives_a_checkpoint_and_refuses_another_population():
    cfg = RunConfig(num_train_clients=20, dp_clip=1.0, dp_noise=3.0, dp_max_epsilon=5.0)
    account = PrivacyAccount(cfg)
    for _ in range(4):
        account.compose(2, 20)
    resumed = PrivacyAccount(cfg, account.state_dict())
    assert resumed.releases == 4 and resumed.epsilon == account.epsilon
    with pytest.raises(FedmamlError, match="num-train-clients and dp-delta"):
        PrivacyAccount(cfg.replace(num_train_clients=30), account.state_dict())
    budget = cfg.replace(dp_max_epsilon=account.epsilon + 1e-9)
    with pytest.raises(BudgetExhausted, match="round 5 would take ε above"):
        PrivacyAccount(budget, account.state_dict()).check_budget(5, 2, 20)


def test_a_budget_that_no_round_fits_in_is_a_config_error():
    cfg = RunConfig(num_train_clients=10, dp_clip=1.0, dp_noise=0.5, dp_max_epsilon=0.1)
    with pytest.raises(FedmamlError, match="one round alone spends"):
        PrivacyAccount(cfg).check_feasible()
    with pytest.raises(FedmamlError, match="'dp-max-epsilon'"):
        RunConfig(dp_clip=1.0, dp_noise=1.0, aggregator="median", dp_max_epsilon=1.0)
    with pytest.raises(FedmamlError, match="'dp-delta'"):
        RunConfig(dp_delta=1.0)


def test_training_stops_at_the_budget_with_a_final_checkpoint_and_resumes_with_more(tmp_path):
    sigma = 4.0
    eps = [closed_form_epsilon(sigma, t, 1e-5) for t in (1, 2, 3, 4)]
    cfg = RunConfig(
        num_train_clients=3,
        num_heldout_clients=1,
        fraction_train=1.0,
        min_train_nodes=3,
        num_rounds=5,
        eval_every=10,
        eval_clients=1,
        dp_clip=1.0,
        dp_noise=sigma,
        dp_max_epsilon=(eps[1] + eps[2]) / 2,  # room for 2 rounds, not 3
        out_dir=str(tmp_path / "run"),
    )
    out = simulate(cfg)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt.round == 2 and ckpt.privacy is not None
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[[1, 2], "updated"].all() and 3 not in rounds.index
    assert list(rounds.loc[[1, 2], "epsilon"]) == pytest.approx(eps[:2], rel=1e-3)
    assert rounds.loc[1, "dp-noise-std"] == pytest.approx(sigma * 1.0 / 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    privacy = summary["privacy"]
    assert privacy["stopped_by_budget"] and "round 3 would take ε above" in privacy["stop_reason"]
    assert privacy["releases"] == 2 and privacy["epsilon"] == pytest.approx(eps[1], rel=1e-3)
    report(out)
    written = (out / "summary.md").read_text()
    assert "ε = " in written and "training stopped at the privacy budget" in written

    more = cfg.replace(dp_max_epsilon=(eps[2] + eps[3]) / 2, resume="auto")
    out = simulate(more)
    assert load_checkpoint(out / "checkpoint.pt").round == 3
    rounds = pd.read_csv(out / "rounds.csv").set_index("round")
    assert rounds.loc[3, "epsilon"] == pytest.approx(eps[2], rel=1e-3)
