"""Client-level differential privacy of the released meta-parameters: the noise, and the budget.

The mechanism, once per round that updates θ (a *release*):

* every client clips its update to the norm C (``dp-clip``), in the ClientApp, before it leaves
  the device (and, where the server sees individual updates, the server clips again);
* the server averages the n clipped updates (the plain mean, or the unmasked SecAgg+ sum / n)
  and adds Gaussian noise N(0, (σC/n)² I) (``dp-noise`` = σ), with Flower's own noise helpers;
* the meta-optimizer steps with the noised mean, so θ and everything computed from it later
  (checkpoints, personalization) are post-processing of the noised means.

Accounting (:class:`PrivacyAccount`), with Flower's RDP accountant
(``flwr.supercore.privacy_accounting``, backed by Google's ``dp-accounting``):

* the server samples m of the N training clients uniformly *without replacement* (Flower's
  node sampling), so a release is the sampled-without-replacement Gaussian mechanism of Wang,
  Balle & Kasiviswanathan (AISTATS 2019, Theorem 27) with sampling rate q = m/N, and the
  neighbouring relation that comes with it: *replace one client's data* (N is public);
* replacing one client changes the sum of clipped updates by at most 2C, and the noise on the
  sum has std σC, so the noise multiplier accounted per release is σ/2;
* N is ``num-train-clients``; a round that sampled among fewer connected training nodes
  (pool < N) is accounted with the rate m/pool (the bound depends on the rate only), as the
  sample size ⌈m·N/pool⌉ of N;
* ε is reported at δ = ``dp-delta`` after every release (``rounds.csv`` column ``epsilon``),
  and before each round the server asks whether that round's release would take ε above
  ``dp-max-epsilon``: if so, training stops there (the last checkpoint is the final model).

Only training releases are accounted: per-client evaluation metrics and (without secure
aggregation) per-client training losses are not covered (docs/privacy.md). Personalization
after training runs on each device with its own data and spends no budget.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
    """The (ε, δ) spent so far by the run's releases, and the budget check before a round."""

    def __init__(self, cfg: RunConfig, state: dict[str, Any] | None = None) -> None:
        from flwr.supercore.privacy_accounting import (
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.cfg = cfg
        self.population = cfg.num_train_clients
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=cfg.dp_delta,
                population_size=self.population,
                neighboring_relation=NeighboringRelation.REPLACE_ONE,
                sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
                max_epsilon=cfg.dp_max_epsilon or None,
            )
        )
        if state is not None:
            try:
                self.accountant.load_state_dict(state)
            except ValueError as exc:
                raise FedmamlError(
                    f"the checkpoint's privacy ledger does not fit this run ({exc}): resume "
                    "with the same num-train-clients and dp-delta, or start a new run"
                ) from None

    @property
    def noise_multiplier(self) -> float:
        """σ relative to the replace-one sensitivity 2C of the sum of clipped updates."""
        return self.cfg.dp_noise / 2

    def _event(self, sampled: int, pool: int) -> Any:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        n = self.population
        size = sampled if pool >= n else min(n, math.ceil(sampled * n / max(pool, 1)))
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_size=max(1, min(size, n)),
            population_size=n,
        )

    def check_budget(self, meta_round: int, sampled: int, pool: int) -> None:
        """Raise :class:`BudgetExhausted` when this round's release would exceed the budget."""
        if not self.cfg.dp_max_epsilon:
            return
        if self.accountant.would_exceed(self._event(sampled, pool)):
            raise BudgetExhausted(
                f"round {meta_round} would take ε above dp-max-epsilon="
                f"{self.cfg.dp_max_epsilon:g} (ε = {self.epsilon:.4g} at δ = "
                f"{self.cfg.dp_delta:g} after {self.releases} release(s)): training stops here"
            )

    def check_feasible(self) -> None:
        """A budget that no single round fits in is a configuration error, found at start."""
        if not self.cfg.dp_max_epsilon or self.releases:
            return
        m = self.cfg.clients_per_round
        if self.accountant.would_exceed(self._event(m, self.population)):
            from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

            one = RdpAccountant(self.accountant.config)
            one.compose(self._event(m, self.population))
            raise FedmamlError(
                f"config key 'dp-max-epsilon' has value {self.cfg.dp_max_epsilon:g}; one round "
                f"alone spends ε = {one.get_epsilon(self.cfg.dp_delta):.4g} at δ = "
                f"{self.cfg.dp_delta:g} (dp-noise = {self.cfg.dp_noise:g}, {m} of "
                f"{self.population} clients per round): raise dp-max-epsilon or dp-noise"
            )

    def compose(self, sampled: int, pool: int) -> float:
        """Account one release; return ε after it."""
        self.accountant.compose(self._event(sampled, pool))
        return self.epsilon

    @property
    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.cfg.dp_delta)) if self.releases else 0.0

    @property
    def releases(self) -> int:
        return self.accountant.num_releases

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The privacy facts of the run so far, for ``summary.json`` and ``summary.md``."""
        return {
            **extra,
            "epsilon": self.epsilon,
            "delta": self.cfg.dp_delta,
            "releases": self.releases,
            "noise_multiplier": self.cfg.dp_noise,
            "clip_norm": self.cfg.dp_clip,
            "sampling_rate": min(1.0, self.cfg.clients_per_round / self.population),
            "max_epsilon": self.cfg.dp_max_epsilon or None,
            "accountant": "RDP (Flower's RdpAccountant), clients sampled without replacement, "
            "replace-one neighbours (sensitivity 2C)",
        }

    def state_dict(self) -> dict[str, Any]:
        """The ledger (every release's event), stored in each checkpoint for resume."""
        return self.accountant.state_dict()
