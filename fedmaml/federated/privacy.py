"""Client-level differential privacy of the released meta-parameters, on the server and the
device: clipping, the noise, and the budget check between rounds.

* every client clips its update to the norm C (``dp-clip``) in the ClientApp, before it leaves
  the device (:func:`clip_to_norm`; where the server sees individual updates, it clips again);
* the server averages the n clipped updates (the plain mean, or the unmasked SecAgg+ sum / n)
  and adds N(0, (σC/n)² I) (``dp-noise`` = σ) with Flower's own noise helpers
  (:func:`add_noise`), n being the number of updates actually averaged, so that a dropout never
  weakens a release;
* :class:`PrivacyAccount` keeps the run's ledger (:mod:`fedmaml.accounting`: the model, the
  library, the numbers), reports ε after every release (``rounds.csv`` column ``epsilon``) and
  before each round asks whether its release would take ε above ``dp-max-epsilon``: if so,
  training stops there (:class:`BudgetExhausted`; the last checkpoint is the final model).

Only training releases are accounted: per-client evaluation metrics and (without secure
aggregation) per-client training losses are not covered (docs/privacy.md). Personalization
after training runs on each device with its own data and spends no budget.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmaml.accounting import PrivacyLedger
from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError


class BudgetExhausted(Exception):
    """The next round's release would take ε above ``dp-max-epsilon``: training stops."""


def clip_to_norm(update: dict[str, Any], bound: float) -> tuple[dict[str, Any], bool]:
    """Δ · min(1, C/‖Δ‖) over all of Δ's tensors together (‖·‖ in float64); whether it was
    scaled. What each client does to its update before it leaves the device."""
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in update.values()))
    if not norm > bound:  # NaN passes unclipped: the checks after this refuse it
        return update, False
    factor = bound / norm
    return {k: v * factor for k, v in update.items()}, True


def add_noise(mean: dict[str, np.ndarray], n: int, cfg: RunConfig) -> float:
    """Add N(0, (σC/n)²) to every coordinate of the mean of n clipped updates, in place, with
    Flower's helpers (those of its central-DP strategies); return the standard deviation."""
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

    std = compute_stdv(cfg.dp_noise, cfg.dp_clip, n)
    arrays = list(mean.values())
    add_gaussian_noise_inplace(arrays, std)
    return std


class PrivacyAccount:
    """The run's privacy ledger, with the run's σ, N = num-train-clients and δ = dp-delta."""

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.ledger = PrivacyLedger(cfg.dp_noise, cfg.num_train_clients, cfg.dp_delta)
        if state is not None:
            self.ledger.load_state_dict(state)

    def check_budget(self, meta_round: int, sampled: int, pool: int) -> None:
        """Raise :class:`BudgetExhausted` when this round's release would exceed the budget."""
        limit = self.cfg.dp_max_epsilon
        if limit and self.ledger.epsilon_after(self.ledger.release(sampled, pool)) > limit:
            raise BudgetExhausted(
                f"round {meta_round} would take ε above dp-max-epsilon={limit:g} (ε = "
                f"{self.epsilon:.4g} at δ = {self.cfg.dp_delta:g} after {self.releases} "
                "release(s)): training stops here"
            )

    def check_feasible(self) -> None:
        """A budget that not even one round fits in is a configuration error, found at start."""
        limit, m = self.cfg.dp_max_epsilon, self.cfg.clients_per_round
        if not limit or self.releases:
            return
        one = self.ledger.epsilon_after(self.ledger.release(m, self.ledger.population))
        if one > limit:
            raise FedmamlError(
                f"config key 'dp-max-epsilon' has value {limit:g}; one round alone spends "
                f"ε = {one:.4g} at δ = {self.cfg.dp_delta:g} (dp-noise = {self.cfg.dp_noise:g}, "
                f"{m} of {self.ledger.population} clients per round): raise dp-max-epsilon or "
                "dp-noise"
            )

    def compose(self, sampled: int, pool: int) -> float:
        """Account one release; return ε after it."""
        return self.ledger.add(self.ledger.release(sampled, pool))

    @property
    def epsilon(self) -> float:
        return self.ledger.epsilon

    @property
    def releases(self) -> int:
        return self.ledger.releases

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The privacy facts of the run so far, for ``summary.json`` and ``summary.md``."""
        return {
            **extra,
            "epsilon": self.epsilon,
            "delta": self.cfg.dp_delta,
            "releases": self.releases,
            "noise_multiplier": self.cfg.dp_noise,
            "clip_norm": self.cfg.dp_clip,
            "sampling_rate": min(1.0, self.cfg.clients_per_round / self.ledger.population),
            "max_epsilon": self.cfg.dp_max_epsilon or None,
            "accountant": "RDP (dp-accounting), clients sampled without replacement, "
            "replace-one neighbours (sensitivity 2C)",
        }

    def state_dict(self) -> dict[str, Any]:
        """The ledger, stored in each checkpoint for resume."""
        return self.ledger.state_dict()
