"""Predictions of a personalized model for a file of examples, in any of the formats users are
personalized from (:mod:`fedmaml.personalize.user_files`), prepared by the model's recorded
input preprocessing (:func:`fedmaml.tasks.inputs.model_inputs`).

* a table (.csv/.parquet): the table with a ``prediction`` column (the feature columns the model
  was personalized on; for an image model without recorded columns, the table's numeric
  columns other than the label, as many as one example has values, in their order);
* LEAF JSON, ``.npz`` (``x``, ``y``) or a folder of images by class: one row per example,
  ``user`` (LEAF id, or the file's name), ``example`` (its position in the file: for images,
  class folders and files in sorted order), ``label`` and ``prediction``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedmaml.errors import FedmamlError
from fedmaml.personalize.personalized import Personalized
from fedmaml.personalize.user_files import FORMATS_HELP, TABLES
from fedmaml.tasks.inputs import InputSpec, model_inputs

if TYPE_CHECKING:
    import pandas as pd

#: column names taken for labels, not pixels, in an image model's table
LABEL_NAMES = ("label", "y", "character", "class")


def predict_data(model: Personalized, data: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """The predictions table of ``data`` (see the module docstring)."""
    import pandas as pd

    spec = InputSpec.from_dict(model.inputs) if model.inputs else None
    image = spec is not None and (spec.ink or len(spec.shape) > 1)
    if isinstance(data, pd.DataFrame) or Path(data).suffix.lower() in TABLES:
        if not image or model.columns.get("feature_columns"):
            return model.predict_table(data, prepare=_preparer(spec) if image else None)
        return _pixel_table(model, data, spec)
    path = Path(data).expanduser()
    if not path.exists():
        raise FedmamlError(f"{path}: no such file or folder; give {FORMATS_HELP}")
    if path.suffix.lower() == ".json":
        from fedmaml.tasks.femnist import read_leaf_file

        users = read_leaf_file(path)
    elif path.suffix.lower() == ".npz" or path.is_dir():
        from fedmaml.tasks.local import read_examples

        fmt = "images" if path.is_dir() else "npz"
        users = {path.stem if fmt == "npz" else path.name: read_examples(
            path, fmt=fmt, input_shape=model.input_shape if image else ()
        )}  # fmt: skip
    else:
        raise FedmamlError(f"{path}: cannot read a {path.suffix or 'suffix-less'} file; give "
                           f"{FORMATS_HELP}")  # fmt: skip
    frames = []
    for user, (x, y) in users.items():
        x = model_inputs(x, spec, str(path)) if spec is not None else x
        labels = y.squeeze(-1) if y.dim() > 1 else y
        frames.append(
            pd.DataFrame(
                {
                    "user": user,
                    "example": range(len(x)),
                    "label": labels.numpy(),
                    "prediction": model.predict(x).numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _preparer(spec: InputSpec | None):
    return None if spec is None else (lambda x, source: model_inputs(x, spec, source))


def _pixel_table(
    model: Personalized, data: str | os.PathLike | pd.DataFrame, spec: InputSpec
) -> pd.DataFrame:
    """An image model's predictions for a table of pixel columns (one row per example)."""
    import pandas as pd

    from fedmaml.tasks.tables import read_table

    df = data if isinstance(data, pd.DataFrame) else read_table(data)
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    pixels = [c for c in numeric if str(c).lower() not in LABEL_NAMES]
    need = math.prod(spec.shape)
    if len(pixels) != need:
        raise FedmamlError(
            f"{data if not isinstance(data, pd.DataFrame) else 'the table'} has {len(pixels)} "
            f"numeric columns besides a label, but the model takes {spec.describe()}: give a "
            f"table of {need} pixel columns (row-major), one row per image"
        )
    x = torch.tensor(df[pixels].to_numpy(dtype="float32"))
    if not torch.isfinite(x).all():
        raise FedmamlError("the pixel columns contain NaN or Inf; clean the data first")
    prediction = model.predict(model_inputs(x, spec, "the table")).numpy()
    return pd.concat([df, pd.Series(prediction, index=df.index, name="prediction")], axis=1)
