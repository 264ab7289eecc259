"""The personalized model θ'_K: predictions, its metrics, and saving and loading it as a
checkpoint whose config holds a ``personalization`` section."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedmaml.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmaml.errors import FedmamlError, NonFiniteError
from fedmaml.meta import validate
from fedmaml.meta.params import Params

if TYPE_CHECKING:
    import pandas as pd

#: key of a personalized model's own section in its checkpoint's config
SECTION = "personalization"


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
    #: the parameters that adapted: "all", "head" or their names (the rest kept θ's values)
    adapted: str | list[str] = "all"
    user: str = "user"
    columns: dict[str, Any] = field(default_factory=dict)
    source_config: dict[str, Any] = field(default_factory=dict)
    round: int = 0
    #: how raw examples become model inputs (the checkpoint's; see fedmaml.tasks.inputs)
    inputs: dict[str, Any] | None = None

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

    def predict_table(
        self,
        data: pd.DataFrame | str | os.PathLike,
        prepare: Callable[[Tensor, str], Tensor] | None = None,
    ) -> pd.DataFrame:
        """The table with a ``prediction`` column added, reading the feature columns the model
        was personalized on (a label column, if present, is ignored); ``prepare(x, source)``
        turns the feature rows into model inputs (an image model's pixel columns)."""
        import pandas as pd

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
            pd.concat([df[features], pd.Series(0.0, index=df.index, name=placeholder)], axis=1),
            label_column=placeholder,
            feature_columns=features,
            classification=False,
            source=str(data) if isinstance(data, str | os.PathLike) else "table",
        )
        if prepare is not None:
            x = prepare(x, str(data) if isinstance(data, str | os.PathLike) else "table")
        prediction = pd.Series(self.predict(x).numpy(), index=df.index, name="prediction")
        return pd.concat([df.drop(columns="prediction", errors="ignore"), prediction], axis=1)

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
            "adapted": self.adapted,
            "columns": self.columns,
        }
        if self.inputs is not None:
            section["inputs"] = dict(self.inputs)
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
        adapted=section.get("adapted", "all"),
        user=str(section["user"]),
        columns=dict(section["columns"]),
        source_config=config,
        round=ckpt.round,
        inputs=section.get("inputs"),
    )
