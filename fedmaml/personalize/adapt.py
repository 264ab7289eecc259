"""Per-user personalization: adapt the global meta-parameters θ to one user's own data.

A user's examples are split into a support set S (to adapt on) and an evaluation set E (held
out from adaptation). From θ, K plain gradient steps on S give the personalized parameters:

    θ'_0 = θ,   θ'_{k+1} = θ'_k − α ⊙ ∇_θ' L_S(θ'_k),   k = 0..K−1

α is the checkpoint's learned per-parameter step size when it has ``inner_lr.<name>`` keys
(Meta-SGD), else one scalar ``lr`` (default: the checkpoint's ``inner-lr``); an explicit ``lr``
replaces learned step sizes. The metric m is the MSE (regression: a model with one output) or
the accuracy (classification: one output per class) on E, computed for every k = 0..K (the
adaptation curve of :func:`fedmaml.meta.evaluate.adaptation_curve`):

    metric_before = m(θ; E),   metric_after = m(θ'_K; E)
    gain = metric_before − metric_after   (MSE: lower is better)
    gain = metric_after − metric_before   (accuracy: higher is better)

so a positive gain always means personalization helped. The personalized model holds θ'_K only;
learned step sizes are a training-time quantity and are not saved with it.

:func:`personalize` handles one user, :func:`personalize_many` a population (a table with a user
column, a folder of one table per user, or in-memory clients), batching users of equal data
shapes with ``torch.func.vmap``; :func:`personalize_client` is the on-device entry point that
returns metrics only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.atomic import atomic_path
from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta import validate
from fedmaml.meta.evaluate import adaptation_curve
from fedmaml.meta.gradient import prefers_vmap
from fedmaml.meta.inner import func_grad_fn, inner_loop
from fedmaml.meta.params import INNER_LR_PREFIX, InnerLR, Params, split_inner_lrs
from fedmaml.tasks.episodes import ClientData

if TYPE_CHECKING:
    import pandas as pd

Pair = tuple[Tensor, Tensor]
Source = str | os.PathLike | Checkpoint | tuple[nn.Module, Mapping[str, Tensor]]
UserData = ClientData | Pair

#: key of a personalized model's own section in its checkpoint's config
SECTION = "personalization"
BATCHING = ("auto", "vmap", "loop")
DEFAULT_STEPS = 5
DEFAULT_LR = 0.01
DEFAULT_FRACTION = 0.5


# --------------------------------------------------------------------------- the global model


@dataclass(frozen=True)
class GlobalModel:
    """The model to personalize: architecture, θ, learned α (maybe empty) and its provenance."""

    model: nn.Module
    theta: Params
    alpha: Params
    name: str | None
    kwargs: dict[str, int]
    config: dict[str, Any]
    round: int

    @cached_property
    def num_outputs(self) -> int | None:
        """Outputs of the last linear layer: 1 means regression, C > 1 a C-class classifier."""
        last = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        return last[-1].out_features if last else None

    @cached_property
    def in_features(self) -> int | None:
        """Features the first layer takes when it is linear (tabular models), else None."""
        first = next((m for m in self.model.modules() if list(m.parameters(recurse=False))), None)
        return first.in_features if isinstance(first, nn.Linear) else None

    def defaults(self, steps: int | None, lr: float | None) -> tuple[int, InnerLR, float | None]:
        """(K, α as used, the scalar lr or None when learned step sizes are used)."""
        k = steps if steps is not None else int(self.config.get("eval-steps", DEFAULT_STEPS))
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise FedmamlError(
                f"the number of adaptation steps must be an integer >= 1 (got {k!r})"
            )
        if lr is None and self.alpha:
            return k, self.alpha, None
        rate = float(self.config.get("inner-lr", DEFAULT_LR)) if lr is None else lr
        validate.check_inner_lr(rate)
        return k, float(rate), float(rate)


def resolve_global(source: Source | GlobalModel) -> GlobalModel:
    """Open a checkpoint path, a :class:`Checkpoint` or a ``(model, params)`` pair, and check
    that the parameters fit the architecture. Personalization runs on the CPU: a user's few
    steps are cheap, and the result must load anywhere."""
    if isinstance(source, GlobalModel):
        return source
    if isinstance(source, str | os.PathLike):
        where = f"checkpoint {source}"
        source = load_checkpoint(source)
    elif isinstance(source, Checkpoint):
        where = f"checkpoint of model {source.model!r}"
    else:
        where = "the given (model, params)"
    if isinstance(source, Checkpoint):
        if SECTION in source.config:
            raise FedmamlError(
                f"{where} is already a personalized model; personalize from the global "
                "checkpoint written by training (e.g. RUN_DIR/checkpoint.pt)"
            )
        model, params = source.build_model(), source.params
        name, kwargs, config, rnd = (
            source.model,
            dict(source.model_kwargs),
            source.config,
            source.round,
        )
    elif (
        isinstance(source, tuple)
        and len(source) == 2
        and isinstance(source[0], nn.Module)
        and isinstance(source[1], Mapping)
    ):
        model, params = source
        name, kwargs, config, rnd = None, {}, {}, 0
    else:
        raise FedmamlError(
            "checkpoint_or_model must be a checkpoint path, a Checkpoint or a (model, params) "
            f"pair (got {type(source).__name__})"
        )
    theta, alpha = split_inner_lrs(params)
    try:
        validate.check_params(model, theta)
    except FedmamlError as exc:
        raise FedmamlError(f"{where}: {exc}") from None
    wrong = [k for k, a in alpha.items() if k not in theta or a.shape != theta[k].shape]
    if wrong:
        raise FedmamlError(
            f"{where}: learned step sizes {[INNER_LR_PREFIX + k for k in wrong]} do not match the "
            "model's parameters; the checkpoint is damaged, use another one"
        )
    return GlobalModel(
        model=model,
        theta={k: v.detach().cpu() for k, v in theta.items()},
        alpha={k: v.detach().cpu() for k, v in alpha.items()},
        name=name,
        kwargs=kwargs,
        config=dict(config),
        round=int(rnd),
    )


# --------------------------------------------------------------------------- a user's data


@dataclass(frozen=True)
class UserSplit:
    """One user's support set (adapt) and evaluation set (held out), checked against the model."""

    user: str
    support: Pair
    evaluation: Pair
    classification: bool

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return tuple(t.shape for t in (*self.support, *self.evaluation))


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
    bad = torch.unique(y[(y < 0) | (y >= classes)])
    if bad.numel():
        raise FedmamlError(
            f"user {user!r}: labels {bad[:5].tolist()} are not among the {classes} classes "
            f"(0..{classes - 1}) {model} was trained on; drop those rows or retrain the model "
            "with more classes"
        )
    return y.long()


def _describe(g: GlobalModel) -> str:
    return f"model {g.name!r}" if g.name else "the model"


# --------------------------------------------------------------------------- adaptation


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


def summarize(curve: Sequence[Mapping[str, float]], classification: bool) -> dict[str, float]:
    """``metric_before`` (k = 0), ``metric_after`` (k = K) and ``gain`` of a curve, with the
    losses for classification (where the metric is the accuracy)."""
    key = "accuracy" if classification else "loss"
    before, after = curve[0][key], curve[-1][key]
    out = {
        "metric_before": before,
        "metric_after": after,
        "gain": after - before if classification else before - after,
    }
    if classification:
        out["loss_before"], out["loss_after"] = curve[0]["loss"], curve[-1]["loss"]
    return out


def _loss(classification: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if classification else F.mse_loss


def _adapt_one(
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


def _adapt_batch(
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


# --------------------------------------------------------------------------- one user


@dataclass
class Personalized:
    """A user's personalized model θ'_K, its adaptation curve and what is needed to rebuild it."""

    model: nn.Module
    params: Params
    model_name: str | None
    model_kwargs: dict[str, int]
    classification: bool
    input_shape: tuple[int, ...]
    curve: list[dict[str, float]]
    n_support: int
    n_eval: int
    steps: int
    lr: float | None
    user: str = "user"
    columns: dict[str, Any] = field(default_factory=dict)
    source_config: dict[str, Any] = field(default_factory=dict)
    round: int = 0

    @property
    def metric(self) -> str:
        """``mse`` (regression) or ``accuracy`` (classification)."""
        return "accuracy" if self.classification else "mse"

    @property
    def metric_before(self) -> float:
        return summarize(self.curve, self.classification)["metric_before"]

    @property
    def metric_after(self) -> float:
        return summarize(self.curve, self.classification)["metric_after"]

    @property
    def gain(self) -> float:
        """Positive when personalization helped (MSE fell or accuracy rose)."""
        return summarize(self.curve, self.classification)["gain"]

    def metrics(self) -> dict[str, float]:
        """Numbers only (what may leave a device): sizes, steps, ``<metric>_before``,
        ``<metric>_after``, ``gain`` and, for classification, the losses."""
        summary = summarize(self.curve, self.classification)
        named = {
            k.replace("metric", self.metric) if k.startswith("metric") else k: v
            for k, v in summary.items()
        }
        return {
            "n_support": float(self.n_support),
            "n_eval": float(self.n_eval),
            "steps": float(self.steps),
            **named,
        }

    def predict(self, x: Tensor) -> Tensor:
        """f_θ'(x): one value per example (regression) or the predicted class id."""
        if not isinstance(x, Tensor):
            raise FedmamlError(f"inputs must be a tensor (got {type(x).__name__})")
        x = x.to(next(iter(self.params.values())).dtype)
        if x.dim() == 1 and self.input_shape == (1,):
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.input_shape:
            raise FedmamlError(
                f"inputs of shape {tuple(x.shape)} do not fit the personalized model, which "
                f"takes examples of shape {self.input_shape}; give the same features it was "
                "personalized on"
            )
        if not torch.isfinite(x).all():
            raise NonFiniteError("the inputs contain NaN or Inf; clean the data first")
        with torch.no_grad():
            out = functional_call(self.model, (self.params, dict(self.model.named_buffers())), x)
        return out.argmax(-1) if self.classification else out.squeeze(-1)

    def predict_table(self, data: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
        """The table with a ``prediction`` column added, reading the feature columns the model
        was personalized on (a label column, if present, is ignored)."""
        from fedmaml.tasks.tables import read_table, table_to_tensors

        df = data if not isinstance(data, str | os.PathLike) else read_table(data)
        features = self.columns.get("feature_columns")
        if not features:
            raise FedmamlError(
                "this personalized model was made from tensors, not a table, so it does not know "
                "its feature columns; predict with Personalized.predict(x)"
            )
        missing = [c for c in features if c not in df.columns]
        if missing:
            raise FedmamlError(
                f"the table lacks the feature column(s) {missing} the model was personalized "
                f"on (it has {list(df.columns)}); give a table with columns {features}"
            )
        # the label may be absent when predicting: a placeholder lets tables.py check the features
        placeholder = "__fedmaml_label__"
        x, _ = table_to_tensors(
            df.assign(**{placeholder: 0.0}),
            label_column=placeholder,
            feature_columns=features,
            classification=False,
            source=str(data) if isinstance(data, str | os.PathLike) else "table",
        )
        return df.assign(prediction=self.predict(x).numpy())

    def save(self, path: str | os.PathLike) -> Path:
        """Write θ'_K, the model spec and the personalization record atomically (a checkpoint
        whose config holds a ``personalization`` section)."""
        if self.model_name is None:
            raise FedmamlError(
                "this model was given as an nn.Module, so it cannot be rebuilt from a file; "
                "personalize from a checkpoint (or a Checkpoint object) to save it"
            )
        section = {
            "user": self.user,
            "classification": self.classification,
            "input_shape": list(self.input_shape),
            "curve": self.curve,
            "n_support": self.n_support,
            "n_eval": self.n_eval,
            "steps": self.steps,
            "lr": self.lr,
            "columns": self.columns,
        }
        ckpt = Checkpoint(
            params=self.params,
            model=self.model_name,
            model_kwargs=self.model_kwargs,
            config={**self.source_config, SECTION: section},
            round=self.round,
        )
        return save_checkpoint(path, ckpt)


def load_personalized(path: str | os.PathLike) -> Personalized:
    """A personalized model written by :meth:`Personalized.save`."""
    ckpt = load_checkpoint(path)
    config = dict(ckpt.config)
    section = config.pop(SECTION, None)
    if not isinstance(section, dict):
        raise FedmamlError(
            f"{path} is a training checkpoint (global meta-parameters), not a personalized "
            "model; run `fedmaml personalize --checkpoint` on it first"
        )
    model = ckpt.build_model()
    try:
        validate.check_params(model, ckpt.params)
    except FedmamlError as exc:
        raise FedmamlError(f"personalized model {path}: {exc}") from None
    try:
        return _from_section(model, ckpt, section, config)
    except (KeyError, TypeError, ValueError):
        raise FedmamlError(
            f"personalized model {path} has a damaged personalization record; personalize again"
        ) from None


def _from_section(
    model: nn.Module, ckpt: Checkpoint, section: dict[str, Any], config: dict[str, Any]
) -> Personalized:
    return Personalized(
        model=model,
        params=dict(ckpt.params),
        model_name=ckpt.model,
        model_kwargs=dict(ckpt.model_kwargs),
        classification=bool(section["classification"]),
        input_shape=tuple(section["input_shape"]),
        curve=list(section["curve"]),
        n_support=int(section["n_support"]),
        n_eval=int(section["n_eval"]),
        steps=int(section["steps"]),
        lr=section["lr"],
        user=str(section["user"]),
        columns=dict(section["columns"]),
        source_config=config,
        round=ckpt.round,
    )


def personalize(
    checkpoint_or_model: Source | GlobalModel,
    user_data: UserData | pd.DataFrame | str | os.PathLike,
    *,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    support_fraction: float | None = None,
    seed: int = 0,
    user: str | None = None,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
) -> Personalized:
    """Adapt the global model to one user (see the module docstring for the math).

    ``checkpoint_or_model``: a checkpoint path, a :class:`Checkpoint` or ``(model, params)``.
    ``user_data``: a :class:`ClientData`, an ``(x, y)`` pair, or a table (DataFrame, CSV or
    Parquet path; then ``label_column`` is required and ``feature_columns`` defaults to every
    other numeric column). ``user`` names the user (default: the client id, the file name, or
    "user"). ``steps`` defaults to the checkpoint's ``eval-steps`` (else 5), ``lr``
    to its learned step sizes or its ``inner-lr`` (else 0.01).
    """
    g = resolve_global(checkpoint_or_model)
    k, rate, scalar = g.defaults(steps, lr)
    columns: dict[str, Any] = {}
    if user is None:
        user = (
            user_data.client_id
            if isinstance(user_data, ClientData)
            else Path(user_data).stem
            if isinstance(user_data, str | os.PathLike)
            else "user"
        )
    if not isinstance(user_data, ClientData | tuple):
        tables = load_table_users(
            g, user_data, label_column=label_column, feature_columns=feature_columns
        )
        if len(tables.users) != 1:
            raise FedmamlError(
                f"{user_data} holds {len(tables.users)} users; personalize one file at a time "
                "or use personalize_many"
            )
        user_data, columns = next(iter(tables.users.values())), tables.columns
    split = prepare_user(
        g, user_data, user=user, support_size=support_size, support_fraction=support_fraction,
        seed=seed,
    )  # fmt: skip
    result, fast = _adapt_one(g, split, k, rate)
    return Personalized(
        model=g.model,
        params=fast,
        model_name=g.name,
        model_kwargs=g.kwargs,
        classification=split.classification,
        input_shape=tuple(split.support[0].shape[1:]),
        curve=result.curve,
        n_support=int(split.support[0].shape[0]),
        n_eval=int(split.evaluation[0].shape[0]),
        steps=k,
        lr=scalar,
        user=user,
        columns=columns,
        source_config=g.config,
        round=g.round,
    )


def personalize_client(
    params: Mapping[str, Tensor],
    model: str,
    client_data: ClientData,
    *,
    save_to: str | os.PathLike,
    model_kwargs: Mapping[str, int] | None = None,
    config: Mapping[str, Any] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """On-device personalization: adapt θ (∪ α) received from the server on the client's own
    training pool, evaluate on its held-out pool, save θ'_K to ``save_to`` on the device, and
    return only the metrics (no parameters or data leave the device).

    ``model`` is the registry name (e.g. ``cfg.model_name``) and ``config`` the run config
    mapping (``cfg.to_mapping()``), whose ``eval-steps`` and ``inner-lr`` are the defaults.
    """
    if client_data.x_test is None:
        raise FedmamlError(
            f"client {client_data.client_id!r} has no held-out pool to measure personalization "
            "on; give it a test split"
        )
    ckpt = Checkpoint(
        params=dict(params), model=model, model_kwargs=dict(model_kwargs or {}),
        config=dict(config or {}),
    )  # fmt: skip
    result = personalize(
        ckpt, client_data, steps=steps, lr=lr, support_size=support_size, seed=seed
    )
    result.save(save_to)
    return result.metrics()


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class TableUsers:
    """Users read from tables: (x, y) per user, and the columns they came from."""

    users: dict[str, Pair]
    columns: dict[str, Any]


def load_table_users(
    g: GlobalModel,
    data: pd.DataFrame | str | os.PathLike,
    *,
    label_column: str | None,
    feature_columns: Sequence[str] | None = None,
    user_column: str | None = None,
) -> TableUsers:
    """Users of a table with a user column, of a folder of one table per user (the user is the
    file's name without suffix), or the single user of one table. The feature columns are
    resolved once and shared by every user; labels are class ids when the model has C > 1
    outputs (checked against 0..C-1), else regression targets."""
    import pandas as pd

    from fedmaml.tasks.tables import SUFFIXES, read_table, resolve_features, split_by_user

    label_column, feature_columns = _table_columns(g, label_column, feature_columns)
    outputs = g.num_outputs
    kinds = {"classification": outputs > 1, "num_classes": outputs} if outputs else {}
    if isinstance(data, str | os.PathLike) and Path(data).is_dir():
        if user_column:
            raise FedmamlError(
                f"{data} is a folder of one table per user; drop the user column or give one "
                "table with a user column"
            )
        files = sorted(p for p in Path(data).iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise FedmamlError(f"{data} holds no .csv or .parquet file; put one table per user")
        frames = {p.stem: read_table(p) for p in files}
        if len(frames) < len(files):
            raise FedmamlError(f"{data}: two files share a user name (e.g. a.csv and a.parquet)")
    else:
        name = str(data) if isinstance(data, str | os.PathLike) else "table"
        df = data if isinstance(data, pd.DataFrame) else read_table(data)
        df = df.reset_index(drop=True)
        frames = {name: df}
    exclude = [c for c in (user_column, g.config.get("user-column")) if c]
    first_name, first = next(iter(frames.items()))
    features = resolve_features(first, label_column, feature_columns, exclude, first_name)
    users: dict[str, Pair] = {}
    for name, df in frames.items():
        x, y = _table_tensors(df, label_column, features, kinds, name)
        if user_column:
            for user, part in split_by_user(df, user_column).items():
                rows = torch.tensor(part.index.to_numpy())
                users[user] = (x[rows], y[rows])
        else:
            _refuse_mixed_users(df, str(g.config.get("user-column") or "user"), name)
            users[name] = (x, y)
    return TableUsers(users, {"label_column": label_column, "feature_columns": features})


def _refuse_mixed_users(df: pd.DataFrame, column: str, name: str) -> None:
    """A table read as one user must not hold several users' rows under a user column."""
    if column in df.columns and df[column].nunique() > 1:
        raise FedmamlError(
            f"{name} holds {df[column].nunique()} users in column {column!r} but is read as one "
            f"user; give --user-column {column} (user_column=) and an output folder, or one "
            "user's rows"
        )


def _table_columns(
    g: GlobalModel, label: str | None, features: Sequence[str] | None
) -> tuple[str, Sequence[str] | None]:
    """The label and feature columns: those given, else the checkpoint's (``label-column`` and
    ``feature-columns`` of a table run; ``y`` and ``x`` for the sinusoid task)."""
    task = g.config.get("task")
    if task == "sine":
        return label or "y", features or ["x"]
    if task == "table":
        names = [c.strip() for c in str(g.config.get("feature-columns", "")).split(",")]
        return label or str(g.config.get("label-column", "label")), features or (
            [c for c in names if c] or None
        )
    if not label:
        raise FedmamlError("name the label column of the table (label_column / --label-column)")
    return label, features


def _table_tensors(
    df: pd.DataFrame, label: str, features: list[str], kinds: dict[str, Any], name: str
) -> Pair:
    from fedmaml.tasks.tables import table_to_tensors

    return table_to_tensors(df, label_column=label, feature_columns=features, source=name, **kinds)


# --------------------------------------------------------------------------- many users


def personalize_many(
    checkpoint_or_model: Source | GlobalModel,
    users: Mapping[str, UserData] | Sequence[ClientData] | pd.DataFrame | str | os.PathLike,
    *,
    user_column: str | None = None,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    support_size: int | None = None,
    support_fraction: float | None = None,
    seed: int = 0,
    batching: str = "auto",
    chunk_size: int = 256,
    plot: str | os.PathLike | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Personalize every user and return one row per user: ``user, n_support, n_eval,
    metric_before, metric_after, gain`` (plus ``loss_before, loss_after`` for classification).

    ``users``: in-memory clients (a mapping user -> ClientData or (x, y), or a list of
    ClientData), a table with ``user_column`` (DataFrame or path), or a folder of one table per
    user. Each user is split as in :func:`personalize` with the same ``seed``, so a row equals
    ``personalize(..., user_data=that user)``. ``batching``: ``vmap`` adapts users of equal data
    shapes together in chunks of ``chunk_size`` (``auto`` does so for models without buffers or
    convolutions), ``loop`` one user at a time. ``plot``: write a histogram of the gains there
    (PNG). ``df.attrs`` holds ``metric``, ``steps``, ``lr`` and the mean curve over users.
    """
    import pandas as pd

    validate.check_choice("batching", batching, BATCHING)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise FedmamlError(f"chunk_size must be an integer >= 1 (got {chunk_size!r})")
    g = resolve_global(checkpoint_or_model)
    k, rate, scalar = g.defaults(steps, lr)
    data = _user_mapping(g, users, user_column, label_column, feature_columns)
    splits = [
        prepare_user(
            g, d, user=u, support_size=support_size, support_fraction=support_fraction, seed=seed
        )
        for u, d in data.items()
    ]
    vmap = _use_vmap(g.model, batching)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(splits):
        groups.setdefault(s.shapes if vmap else (i,), []).append(i)
    results: list[UserResult | None] = [None] * len(splits)
    with _progress(progress, len(splits), "personalizing") as advance:
        for members in groups.values():
            if len(members) == 1:
                results[members[0]] = _adapt_one(g, splits[members[0]], k, rate)[0]
                advance(1)
                continue
            for start in range(0, len(members), chunk_size):
                chunk = members[start : start + chunk_size]
                for i, r in zip(
                    chunk, _adapt_batch(g, [splits[i] for i in chunk], k, rate), strict=True
                ):
                    results[i] = r
                advance(len(chunk))
    done = [r for r in results if r is not None]
    df = pd.DataFrame([r.row() for r in done])
    df.attrs.update(
        metric=done[0].metric,
        steps=k,
        lr=scalar if scalar is not None else "learned",
        curve=_mean_curve(done),
    )
    if plot is not None:
        plot_gain(df, plot)
    return df


def _user_mapping(
    g: GlobalModel,
    users: Any,
    user_column: str | None,
    label_column: str | None,
    feature_columns: Sequence[str] | None,
) -> dict[str, UserData]:
    if isinstance(users, Mapping):
        data = {str(u): d for u, d in users.items()}
    elif isinstance(users, Sequence) and not isinstance(users, str | bytes):
        if not all(isinstance(c, ClientData) for c in users):
            raise FedmamlError("a list of users must hold ClientData; use a dict for (x, y) pairs")
        data = {c.client_id: c for c in users}
        if len(data) < len(users):
            raise FedmamlError("two clients share a client_id; give every user its own id")
    else:
        if not user_column and not (isinstance(users, str | os.PathLike) and Path(users).is_dir()):
            raise FedmamlError(
                "a table of many users needs its user column (user_column / --user-column); "
                "for a single user use personalize"
            )
        data = dict(
            load_table_users(
                g,
                users,
                label_column=label_column,
                feature_columns=feature_columns,
                user_column=user_column,
            ).users
        )
    if not data:
        raise FedmamlError("no users to personalize; give at least one")
    return data


def _use_vmap(model: nn.Module, batching: str) -> bool:
    has_buffers = any(True for _ in model.buffers())
    if batching == "vmap" and has_buffers:
        raise FedmamlError(
            "batching='vmap' cannot run a model with buffers (e.g. BatchNorm running "
            "statistics); use batching='loop'"
        )
    if batching == "auto":
        return prefers_vmap(model) and not has_buffers
    return batching == "vmap"


def _mean_curve(results: Sequence[UserResult]) -> list[dict[str, float]]:
    keys = results[0].curve[0].keys()
    n = len(results)
    return [
        {key: sum(r.curve[k][key] for r in results) / n for key in keys}
        for k in range(len(results[0].curve))
    ]


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (``advance(n)``), or a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


# --------------------------------------------------------------------------- outputs


def plot_gain(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """A histogram of the per-user gain (matplotlib's Agg canvas, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = df.attrs.get("metric", "metric")
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(df["gain"], bins=min(30, max(5, len(df) // 5)), color="tab:blue", alpha=0.8)
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel(f"gain in {metric} (positive = personalization helped)")
    ax.set_ylabel("users")
    ax.set_title(
        f"{len(df)} users, {df.attrs.get('steps', '?')} steps: mean gain {df['gain'].mean():.3g}, "
        f"{(df['gain'] > 0).mean():.0%} improved"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)
