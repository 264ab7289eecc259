"""How raw examples become model inputs: one function, :func:`model_inputs`, called by training
(FEMNIST's and Omniglot's loaders), personalization, prediction and devices alike, and recorded
in every checkpoint (:class:`InputSpec`, ``Checkpoint.inputs``) so that a user's data is
prepared exactly as the training data was.

For a spec with shape s and ``ink``:

1. each example is reshaped to s when it holds as many values (a table row of 784 pixel columns
   becomes [1, 28, 28]); images of another size are resized by area averaging when they are
   read (:func:`fedmaml.tasks.local.read_examples`); anything else is an error naming both
   shapes;
2. with ``ink`` (handwriting: FEMNIST, Omniglot), x are grey levels: values in 0..255 (the
   largest above 1) are divided by 255, and when the median grey level is above 1/2 (dark
   strokes on white paper, the form LEAF's JSON files, Omniglot's PNGs and scanned pages
   have) the examples become ink = 1 − grey, the form the model was trained on. Examples that
   are already light-on-dark (median at most 1/2) are kept, so preparing twice changes
   nothing.

The decision in step 2 is taken once for all the examples given together (a user's file), not
per example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fedmaml.errors import FedmamlError


@dataclass(frozen=True)
class InputSpec:
    """One example's shape and whether images are turned into ink (see the module docstring)."""

    shape: tuple[int, ...]
    ink: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain types, as stored in a checkpoint."""
        return {"shape": list(self.shape), "ink": self.ink}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        try:
            shape = tuple(int(d) for d in data["shape"])
            if any(d < 1 for d in shape):
                raise ValueError("shape")
            return cls(shape=shape, ink=bool(data.get("ink", False)))
        except (KeyError, TypeError, ValueError):
            raise FedmamlError(
                "the checkpoint's input record is damaged; use another checkpoint or re-run "
                "training"
            ) from None

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        if not self.ink:
            return f"examples of shape {shape}"
        return (
            f"grey images of shape {shape} (values in [0, 1] or 0..255; dark strokes on white "
            "paper become ink = 1 - grey, as in training)"
        )


def model_inputs(x: Tensor, spec: InputSpec, source: str = "the data") -> Tensor:
    """Raw examples x [n, ...] as the model takes them: [n, *spec.shape] (float), with the ink
    transform of the module docstring when ``spec.ink``."""
    x = x.float()
    shape = tuple(spec.shape)
    if tuple(x.shape[1:]) != shape:
        if math.prod(x.shape[1:]) != math.prod(shape):
            raise FedmamlError(
                f"{source}: each example has shape {tuple(x.shape[1:])} "
                f"({math.prod(x.shape[1:])} values) but the model takes {spec.describe()} "
                f"({math.prod(shape)} values); give data of that shape"
            )
        x = x.reshape(len(x), *shape)
    if not spec.ink or len(x) == 0:
        return x
    if float(x.max()) > 1.0:
        x = x / 255.0
    if float(x.median()) > 0.5:
        x = 1.0 - x
    return x


def input_spec(
    task: str, model_kwargs: Mapping[str, int], input_dims: Sequence[int] = ()
) -> InputSpec:
    """The preprocessing a run of ``task`` trains with: FEMNIST 1 x 28 x 28 ink, Omniglot
    1 x S x S ink (S = the model's ``image_size``), tables their d features, sinusoids (1,),
    task ``local`` its ``input-shape`` as given."""
    if task == "femnist":
        return InputSpec((1, 28, 28), ink=True)
    if task == "omniglot":
        size = int(model_kwargs.get("image_size", 28))
        return InputSpec((1, size, size), ink=True)
    if task == "table":
        return InputSpec((int(model_kwargs.get("in_features", 1)),))
    if task == "sine":
        return InputSpec((1,))
    return InputSpec(tuple(input_dims))
