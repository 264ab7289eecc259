"""The privacy budget of a run: client-level (ε, δ)-DP of the released meta-parameters, by Rényi
DP accounting with Google's ``dp-accounting`` (the backend of Flower's ``RdpAccountant``).
No Flower here: the mechanism's facts come in as numbers.

The mechanism, once per round that updates θ (a *release*): each of the n clients in the round
clips its update to the norm C; the server adds N(0, (σC/n)²) to their mean (σ = ``dp-noise``).
Everything later computed from θ (checkpoints, personalization) is post-processing.

The accounting model (:class:`PrivacyLedger`):

* the server samples m of the N training clients uniformly *without replacement* (Flower's node
  sampling): a release is the sampled-without-replacement Gaussian mechanism (Wang, Balle &
  Kasiviswanathan, AISTATS 2019, Theorem 27; ``SampledWithoutReplacementDpEvent``) with rate
  q = m/N, for the neighbouring relation that comes with it: *replace one client's data*;
* replacing one client changes the sum of clipped updates by at most 2C, and the noise on the
  sum has std σC, so the noise multiplier of each release is σ/2;
* N is ``num-train-clients``; a round that sampled among fewer connected training nodes
  (pool < N) is accounted at the rate m/pool (the bound depends on the rate only), as the
  sample size ⌈m·N/pool⌉ of N;
* ε at δ = ``dp-delta`` comes from the summed RDP curve (``compute_epsilon``: the conversion of
  Canonne, Kamath & Steinke 2020, Prop. 12) over dp-accounting's default orders.

Why not Flower's ``RdpAccountant`` itself: it recomputes the subsampled Gaussian's RDP curve at
every ``compose`` (0.6–0.8 s on this project's CPUs) and replays its whole ledger at every
``would_exceed`` (O(rounds²) over a run). Here each distinct release is computed once; the
numbers are the same (the tests check ε against a closed form and against dp-accounting's own
accountant).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmaml.errors import FedmamlError

LEDGER_FORMAT = "fedmaml-privacy-ledger"


@dataclass(frozen=True)
class Release:
    """One kind of release: m of N clients sampled, Gaussian noise with this multiplier."""

    noise_multiplier: float
    sample_size: int
    population: int


class PrivacyLedger:
    """The releases made so far, ε at δ, and what ε one more release would make."""

    def __init__(self, noise: float, population: int, delta: float) -> None:
        if not (math.isfinite(noise) and noise > 0 and population >= 1 and 0 < delta < 1):
            raise ValueError("a privacy ledger needs σ > 0, N >= 1 and δ in (0, 1)")
        self.noise, self.population, self.delta = noise, population, delta
        self.counts: Counter[Release] = Counter()
        self._curves: dict[Release, np.ndarray] = {}
        self._orders: np.ndarray | None = None

    def release(self, sampled: int, pool: int) -> Release:
        """The release of a round that sampled ``sampled`` clients among ``pool`` training
        nodes (a smaller pool than N: the higher rate sampled/pool)."""
        n = self.population
        size = sampled if pool >= n else math.ceil(sampled * n / max(pool, 1))
        return Release(self.noise / 2, max(1, min(size, n)), n)

    def _curve(self, release: Release) -> np.ndarray:
        """The RDP curve of one release over the orders (computed once per kind)."""
        if release not in self._curves:
            from dp_accounting import dp_event, privacy_accountant
            from dp_accounting.rdp import rdp_privacy_accountant as rdp

            accountant = rdp.RdpAccountant(
                neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE
            )
            accountant.compose(
                dp_event.SampledWithoutReplacementDpEvent(
                    release.population,
                    release.sample_size,
                    dp_event.GaussianDpEvent(release.noise_multiplier),
                )
            )
            self._curves[release] = np.asarray(accountant.rdp, dtype=np.float64)
            self._orders = np.asarray(accountant.orders, dtype=np.float64)
        return self._curves[release]

    def _epsilon(self, counts: Counter[Release]) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        if not counts:
            return 0.0
        total = sum(count * self._curve(r) for r, count in counts.items())
        return float(rdp.compute_epsilon(self._orders, total, self.delta)[0])

    @property
    def releases(self) -> int:
        return sum(self.counts.values())

    @property
    def epsilon(self) -> float:
        """ε at δ after the releases so far (0 before the first)."""
        return self._epsilon(self.counts)

    def epsilon_after(self, release: Release, count: int = 1) -> float:
        """ε at δ if ``count`` more of ``release`` were made."""
        return self._epsilon(self.counts + Counter({release: count}))

    def add(self, release: Release) -> float:
        """Account one release; ε after it."""
        self.counts[release] += 1
        return self.epsilon

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain values (checkpoints load with ``weights_only``)."""
        return {
            "format": LEDGER_FORMAT,
            "delta": self.delta,
            "population": self.population,
            "releases": [
                [r.noise_multiplier, r.sample_size, r.population, count]
                for r, count in self.counts.items()
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a ledger (resume). Releases made with another σ keep their own σ; another
        N or δ is refused, since ε would no longer be about the same population."""
        try:
            if state.get("format") != LEDGER_FORMAT:
                raise ValueError("not a fedmaml privacy ledger")
            if state["population"] != self.population or state["delta"] != self.delta:
                raise ValueError(
                    f"it was kept for N={state['population']}, δ={state['delta']}; this run has "
                    f"N={self.population}, δ={self.delta}"
                )
            counts: Counter[Release] = Counter()
            for noise, size, population, count in state["releases"]:
                counts[Release(float(noise), int(size), int(population))] += int(count)
        except (KeyError, TypeError, ValueError) as exc:
            raise FedmamlError(
                f"the checkpoint's privacy ledger does not fit this run ({exc}): resume with the "
                "same num-train-clients and dp-delta, or start a new run"
            ) from None
        self.counts = counts
