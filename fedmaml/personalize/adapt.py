"""Adaptation curves: the metric on E for k = 0..K steps of θ'_{k+1} = θ'_k − α ⊙ ∇L_S(θ'_k),
for one user (:func:`fedmaml.meta.evaluate.adaptation_curve`) or for a batch of users of equal
data shapes at once (``torch.vmap``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from fedmaml.errors import NonFiniteError
from fedmaml.meta.evaluate import adaptation_curve
from fedmaml.meta.inner import func_grad_fn, inner_loop
from fedmaml.meta.params import InnerLR, Params
from fedmaml.personalize.global_model import GlobalModel
from fedmaml.personalize.model import summarize
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


def _loss(classification: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if classification else F.mse_loss


def adapt_one(
    g: GlobalModel, split: UserSplit, steps: int, lr: InnerLR
) -> tuple[UserResult, Params]:
    """θ'_K and the curve of one user, through :func:`adaptation_curve`."""
    try:
        curve, fast = adaptation_curve(
            g.model,
            g.theta,
            split.support,
            split.evaluation,
            loss_fn=_loss(split.classification),
            steps=steps,
            inner_lr=lr,
        )
    except NonFiniteError:
        raise NonFiniteError(_diverged(split.user)) from None
    if not all(math.isfinite(v) for entry in curve for v in entry.values()):
        raise NonFiniteError(_diverged(split.user))
    return UserResult(split, curve), fast


def adapt_batch(
    g: GlobalModel, splits: Sequence[UserSplit], steps: int, lr: InnerLR
) -> list[UserResult]:
    """The curves of users whose data have equal shapes, vectorised with ``torch.vmap``: the same
    recursion as :func:`adaptation_curve`, one user per batch row."""
    classification = splits[0].classification
    loss_fn = _loss(classification)
    buffers: Params = {}
    grad_fn = func_grad_fn(g.model, buffers, loss_fn)

    def curve(sx: Tensor, sy: Tensor, ex: Tensor, ey: Tensor) -> tuple[Tensor, Tensor]:
        fast, losses, accuracies = g.theta, [], []
        for k in range(steps + 1):
            if k:
                fast = inner_loop(
                    fast, (sx, sy), grad_fn, inner_steps=1, inner_lr=lr, first_order=True
                )
            out = functional_call(g.model, (fast, buffers), (ex,))
            losses.append(loss_fn(out, ey))
            accuracies.append(
                (out.argmax(-1) == ey).float().mean() if classification else losses[-1]
            )
        return torch.stack(losses), torch.stack(accuracies)

    stacked = [
        torch.stack(parts)
        for parts in zip(*(s.support + s.evaluation for s in splits), strict=True)
    ]
    with torch.no_grad():
        losses, accuracies = torch.vmap(curve)(*stacked)
    finite = torch.isfinite(losses).all(1)
    if not finite.all():
        raise NonFiniteError(_diverged(splits[int((~finite).nonzero()[0])].user))
    losses_, accuracies_ = losses.tolist(), accuracies.tolist()
    results = []
    for split, user_losses, user_accuracies in zip(splits, losses_, accuracies_, strict=True):
        entries = [{"loss": v} for v in user_losses]
        if classification:
            for entry, accuracy in zip(entries, user_accuracies, strict=True):
                entry["accuracy"] = accuracy
        results.append(UserResult(split, entries))
    return results


def _diverged(user: str) -> str:
    return (
        f"personalization diverged for user {user!r} (loss NaN or Inf); lower the learning "
        "rate (--lr) or the number of steps, or check the data for extreme values"
    )
