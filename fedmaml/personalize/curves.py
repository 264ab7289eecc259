"""Users' adaptation curves, computed by the core (:func:`fedmaml.meta.evaluate.adaptation_curve`
for one user, :func:`~fedmaml.meta.evaluate.adaptation_curves` for many: vmapped or looped
there), with a user whose adaptation diverged named in the error."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fedmaml.errors import NonFiniteError
from fedmaml.meta.adapted import Adapted
from fedmaml.meta.evaluate import AdaptationDiverged, adaptation_curve, adaptation_curves
from fedmaml.meta.params import InnerLR, Params
from fedmaml.personalize.global_model import GlobalModel
from fedmaml.personalize.personalized import summarize
from fedmaml.personalize.user_data import UserSplit


@dataclass(frozen=True)
class UserResult:
    """One user's adaptation curve (query metrics for k = 0..K) and summary row."""

    split: UserSplit
    curve: list[dict[str, float]]

    @property
    def metric(self) -> str:
        return "accuracy" if self.split.classification else "mse"

    def row(self) -> dict[str, Any]:
        return {
            "user": self.split.user,
            "n_support": int(self.split.support[0].shape[0]),
            "n_eval": int(self.split.evaluation[0].shape[0]),
            **summarize(self.curve, self.split.classification),
        }


def adapt_user(
    g: GlobalModel, split: UserSplit, steps: int, lr: InnerLR, adapt: Adapted
) -> tuple[UserResult, Params]:
    """θ'_K and the curve of one user."""
    try:
        curve, fast = adaptation_curve(
            g.model,
            g.theta,
            split.support,
            split.evaluation,
            loss_fn=_loss(split.classification),
            steps=steps,
            inner_lr=lr,
            adapted=adapt,
        )
    except AdaptationDiverged:
        raise NonFiniteError(_diverged(split.user)) from None
    return UserResult(split, curve), fast


def adapt_users(
    g: GlobalModel,
    splits: Sequence[UserSplit],
    steps: int,
    lr: InnerLR,
    adapt: Adapted,
    *,
    batching: str,
    chunk_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[UserResult]:
    """The curves of many users of one model (all regression or all classification)."""
    try:
        curves = adaptation_curves(
            g.model,
            g.theta,
            [s.support for s in splits],
            [s.evaluation for s in splits],
            loss_fn=_loss(splits[0].classification),
            steps=steps,
            inner_lr=lr,
            adapted=adapt,
            batching=batching,
            chunk_size=chunk_size,
            progress=progress,
        )
    except AdaptationDiverged as exc:
        raise NonFiniteError(_diverged(splits[exc.episode].user)) from None
    return [UserResult(s, c) for s, c in zip(splits, curves, strict=True)]


def _loss(classification: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if classification else F.mse_loss


def _diverged(user: str) -> str:
    return (
        f"personalization diverged for user {user!r} (loss NaN or Inf); lower the learning "
        "rate (--lr) or the number of steps, or check the data for extreme values"
    )
