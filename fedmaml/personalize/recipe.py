"""The personalization recipe: how many adaptation steps (0 allowed), with which step size, on
which parameters, chosen on validation users and never on test users.

The candidates are every adapted set a ∈ A (``all``; ``head``, the last layer with the body
frozen, as in ANIL and FedRep), step size α ∈ L (scalars, and the learned per-parameter ones of
a Meta-SGD checkpoint) and number of steps k ∈ 0..K. For each (a, α) the validation users'
adaptation curves (support set → query set, :func:`fedmaml.meta.evaluate.adaptation_curves`)
give the mean metric over the n users after every k at once:

    m̄(a, α, k) = 1/n Σ_u m_u(θ'_k(a, α)),      m = accuracy (higher is better) or MSE (lower)

and the recipe is the best candidate with k ≥ 1 when it beats the global model, m̄(·, ·, 0),
strictly; otherwise it is 0 steps (the global model itself). Ties go to fewer steps, then to the
grid's order. A pair (a, α) whose adaptation diverges (NaN/Inf) for any validation user is left
out, and recorded as such. So, by construction, the default personalization is never worse than
the global model on the validation users' mean; how it does on unseen (test) users is measured
separately.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta.choices import ADAPTED
from fedmaml.meta.evaluate import mean_curve
from fedmaml.personalize.curves import adapt_users
from fedmaml.personalize.global_model import GlobalModel, Source, resolve_global
from fedmaml.personalize.user_data import UserData, prepare_user
from fedmaml.tasks.episodes import ClientData

#: the step-size label of a Meta-SGD checkpoint's learned per-parameter step sizes
LEARNED = "learned"


@dataclass(frozen=True)
class Recipe:
    """K, α (None: the checkpoint's learned step sizes) and the adapted parameters, with the
    evidence they were chosen on: the validation metric of the recipe and of the global model,
    the number of users, and every candidate's mean curve."""

    steps: int
    lr: float | None
    adapt: str
    metric: str = ""
    users: int = 0
    value: float = math.nan
    global_value: float = math.nan
    #: {"adapt", "lr" (a number or "learned"), "curve": [m̄ for k = 0..K] or "diverged": True}
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise FedmamlError(f"a recipe's steps must be an integer >= 0 (got {self.steps!r})")
        if self.adapt not in ADAPTED:
            raise FedmamlError(f"a recipe adapts {' or '.join(ADAPTED)} (got {self.adapt!r})")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise FedmamlError(f"a recipe's step size must be a number > 0 (got {self.lr!r})")

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (stored in a checkpoint, loaded with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """The recipe stored by :meth:`to_dict`; a damaged one is one clear error."""
        try:
            lr = data.get("lr")
            return cls(
                steps=data["steps"],
                lr=None if lr is None else float(lr),
                adapt=data["adapt"],
                metric=str(data.get("metric", "")),
                users=int(data.get("users", 0)),
                value=float(data.get("value", math.nan)),
                global_value=float(data.get("global_value", math.nan)),
                candidates=list(data.get("candidates", [])),
            )
        except (KeyError, TypeError, ValueError, FedmamlError) as exc:
            raise FedmamlError(
                f"the checkpoint's personalization recipe is damaged ({exc}); fit it again "
                "(fedmaml.personalize.fit_recipe) or give --steps, --lr and --adapt"
            ) from None

    def settings(self) -> dict[str, int | float | str]:
        """What a device needs to apply the recipe: steps, adapt and lr (absent: learned)."""
        out: dict[str, int | float | str] = {"steps": self.steps, "adapt": self.adapt}
        if self.lr is not None:
            out["lr"] = self.lr
        return out

    def describe(self) -> str:
        """One line: what the recipe does and the validation evidence."""
        if self.steps == 0:
            what = "0 steps (the global model)"
        else:
            rate = "learned step sizes" if self.lr is None else f"lr {self.lr:g}"
            what = f"{self.steps} steps, {rate}, {self.adapt} adapted"
        if not self.users:
            return what
        return (
            f"{what}; on {self.users} validation users {self.metric} {self.value:.4g} against "
            f"{self.global_value:.4g} for the global model"
        )


def fit_recipe(
    checkpoint_or_model: Source | GlobalModel,
    users: Sequence[ClientData] | Mapping[str, UserData],
    *,
    max_steps: int,
    lrs: Sequence[float | None],
    adapts: Sequence[str] = ADAPTED,
    seed: int = 0,
    batching: str = "auto",
    chunk_size: int = 256,
) -> Recipe:
    """Choose the recipe on the validation ``users`` (see the module docstring).

    ``users``: clients with a support set (their training pool, all of it) and a query set
    (their held-out pool), or (x, y) pairs split as :func:`fedmaml.personalize.personalize`
    splits them with ``seed``. ``lrs``: the step sizes to try; None means the checkpoint's
    learned ones (ignored when it has none). ``max_steps``: K, the most steps tried.
    """
    g = resolve_global(checkpoint_or_model)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise FedmamlError(f"max_steps must be an integer >= 0 (got {max_steps!r})")
    items = users.items() if isinstance(users, Mapping) else ((u.client_id, u) for u in users)
    splits = [prepare_user(g, data, user=str(name), seed=seed) for name, data in items]
    if not splits:
        raise FedmamlError("no validation users to choose the recipe on; give at least one")
    rates = [r for r in dict.fromkeys(lrs) if r is not None or g.alpha]
    if not rates or not adapts:
        raise FedmamlError("give at least one step size and one set of parameters to adapt")
    metric = "accuracy" if splits[0].classification else "mse"
    key, sign = ("accuracy", 1.0) if metric == "accuracy" else ("loss", -1.0)
    candidates: list[dict[str, Any]] = []
    best: tuple[float, int, int] | None = None  # (score, -steps, -order) to maximise
    chosen: tuple[int, float | None, str] = (0, None, "all")
    global_value = math.nan
    for adapt in adapts:
        for rate in rates:
            row: dict[str, Any] = {"adapt": adapt, "lr": LEARNED if rate is None else rate}
            candidates.append(row)
            try:
                done = adapt_users(
                    g,
                    splits,
                    max_steps,
                    g.alpha if rate is None else float(rate),
                    adapt,
                    batching=batching,
                    chunk_size=chunk_size,
                )
            except NonFiniteError:
                row["diverged"] = True
                continue
            curve = [entry[key] for entry in mean_curve([r.curve for r in done])]
            row["curve"] = curve
            global_value = curve[0]
            for k in range(1, len(curve)):
                score = (sign * curve[k], -k, -len(candidates))
                if best is None or score > best:
                    best, chosen = score, (k, rate, adapt)
    value = sign * best[0] if best is not None else global_value
    if best is None or not sign * value > sign * global_value:  # NaN: every candidate diverged
        chosen, value = (0, None, "all"), global_value
    steps, rate, adapt = chosen
    return Recipe(
        steps=steps,
        lr=None if rate is None else float(rate),
        adapt=adapt,
        metric=metric,
        users=len(splits),
        value=float(value),
        global_value=float(global_value),
        candidates=candidates,
    )
