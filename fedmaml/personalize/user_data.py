"""One user's data: checked against the global model (features, outputs, labels) and split into
a support set S to adapt on and an evaluation set E held out to measure the gain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.personalize.global_model import GlobalModel
from fedmaml.tasks.episodes import ClientData

Pair = tuple[Tensor, Tensor]
UserData = ClientData | Pair
DEFAULT_FRACTION = 0.5


@dataclass(frozen=True)
class UserSplit:
    """One user's support set (adapt) and evaluation set (held out), checked against the model."""

    user: str
    support: Pair
    evaluation: Pair
    classification: bool


def prepare_user(
    g: GlobalModel,
    user_data: UserData,
    *,
    user: str = "user",
    support_size: int | None = None,
    support_fraction: float | None = None,
    seed: int = 0,
) -> UserSplit:
    """Check the user's data against the model and split it into support and evaluation.

    A :class:`ClientData` with a held-out pool adapts on its training pool (all of it, or
    ``support_size`` / ``support_fraction`` of it, drawn with ``seed``) and is evaluated on the
    held-out pool. Otherwise the rows are shuffled with ``seed``; the first ``support_size`` (or
    ``support_fraction``, default 1/2) form the support set and the rest the evaluation set.
    """
    _check_split_args(support_size, support_fraction)
    if isinstance(user_data, ClientData):
        x, y, classification = _check_data(g, user_data.x, user_data.y, user)
        held = None
        if user_data.x_test is not None and user_data.y_test is not None:
            if user_data.x_test.shape[0] < 1:
                raise FedmamlError(f"user {user!r} has an empty held-out split; give it test rows")
            held = _check_data(g, user_data.x_test, user_data.y_test, user)[:2]
    elif isinstance(user_data, tuple) and len(user_data) == 2:
        x, y, classification = _check_data(g, *user_data, user)
        held = None
    else:
        raise FedmamlError(
            f"user {user!r}: data must be a ClientData or an (x, y) pair of tensors "
            f"(got {type(user_data).__name__})"
        )
    n = int(x.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if held is not None:
        k = support_size or (max(1, round(support_fraction * n)) if support_fraction else n)
        if k > n:
            raise FedmamlError(
                f"user {user!r} has {n} training rows but the support size is {k}; "
                "lower the support size or give the user more data"
            )
        return UserSplit(user, (x[order[:k]], y[order[:k]]), held, classification)
    k = support_size or max(1, round((support_fraction or DEFAULT_FRACTION) * n))
    if k >= n:
        raise FedmamlError(
            f"user {user!r} has {n} rows but needs more than the support size {k} (at least one "
            "row is held out to measure the gain); lower the support size or give more rows"
        )
    s, e = order[:k], order[k:]
    return UserSplit(user, (x[s], y[s]), (x[e], y[e]), classification)


def _check_split_args(support_size: int | None, support_fraction: float | None) -> None:
    if support_size is not None and support_fraction is not None:
        raise FedmamlError("give a support size or a support fraction, not both")
    if support_size is not None and (
        isinstance(support_size, bool) or not isinstance(support_size, int) or support_size < 1
    ):
        raise FedmamlError(f"the support size must be an integer >= 1 (got {support_size!r})")
    if support_fraction is not None and not 0 < support_fraction < 1:
        raise FedmamlError(f"the support fraction must be in (0, 1) (got {support_fraction!r})")


def _check_data(g: GlobalModel, x: Any, y: Any, user: str) -> tuple[Tensor, Tensor, bool]:
    """(x, y, classification) in the form the model takes, or one clear error.

    Classification means the model has C > 1 outputs: labels must be integers in 0..C-1.
    Regression (one output): labels become float [n, 1].
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise FedmamlError(
            f"user {user!r}: inputs and labels must be tensors "
            f"(got {type(x).__name__}, {type(y).__name__})"
        )
    dtype = next(iter(g.theta.values())).dtype
    x = x.to(dtype)
    if g.in_features is not None and x.dim() == 1:
        x = x.unsqueeze(1)
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise FedmamlError(
            f"user {user!r}: inputs {tuple(x.shape)} and labels {tuple(y.shape)} must hold the "
            "same number (>= 1) of examples"
        )
    if g.in_features is not None and (x.dim() != 2 or x.shape[1] != g.in_features):
        got = x.shape[1] if x.dim() == 2 else tuple(x.shape[1:])
        raise FedmamlError(
            f"user {user!r}: the data has {got} feature(s) per example but {_describe(g)} takes "
            f"{g.in_features}; give the same feature columns the model was trained on"
        )
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"user {user!r}: the inputs contain NaN or Inf; clean the data first")
    outputs = g.num_outputs
    if g.in_features is None or outputs is None:  # no linear input layer: try one example
        try:
            with torch.no_grad():
                out = functional_call(g.model, (g.theta, dict(g.model.named_buffers())), x[:1])
        except RuntimeError as exc:
            raise FedmamlError(
                f"user {user!r}: {_describe(g)} cannot run on inputs of shape "
                f"{tuple(x.shape[1:])} ({str(exc).splitlines()[0]}); give data of the shape the "
                "model was trained on"
            ) from None
        outputs = int(out.shape[-1]) if out.dim() > 1 else 1
    if outputs > 1:
        return x, _class_labels(y, outputs, user, _describe(g)), True
    if y.dim() == 1:
        y = y.unsqueeze(1)
    if y.shape[1:] != (1,):
        raise FedmamlError(
            f"user {user!r}: labels of shape {tuple(y.shape)} do not fit {_describe(g)}, which "
            "predicts one value per example; give one label column"
        )
    y = y.to(dtype)
    if not torch.isfinite(y).all():
        raise NonFiniteError(f"user {user!r}: the labels contain NaN or Inf; clean the data first")
    return x, y, False


def _class_labels(y: Tensor, classes: int, user: str, model: str) -> Tensor:
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.squeeze(1)
    if y.dim() != 1:
        raise FedmamlError(f"user {user!r}: class labels must be one integer per example")
    if torch.is_floating_point(y):
        if not (torch.isfinite(y).all() and (y == y.round()).all()):
            raise FedmamlError(
                f"user {user!r}: {model} is a {classes}-class classifier but the labels are not "
                "whole numbers; give class ids 0..C-1"
            )
        y = y.long()
    bad = ((y < 0) | (y >= classes)).nonzero().flatten()
    if bad.numel():
        raise FedmamlError(
            f"user {user!r}: {bad.numel()} label(s) are not among the {classes} classes "
            f"(0..{classes - 1}) {model} was trained on (first at row {int(bad[0])}); drop "
            "those rows or retrain the model with more classes"
        )
    return y.long()


def _describe(g: GlobalModel) -> str:
    return f"model {g.name!r}" if g.name else "the model"
