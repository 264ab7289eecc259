"""Typed, validated run configuration: parsed once at the edge, passed down as one object.

Keys are those of ``[tool.flwr.app.config]`` in pyproject.toml (hyphenated); the dataclass
fields are the same names with underscores. ``RunConfig.from_mapping`` checks every value and
stops with one message naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedmaml.errors import FedmamlError
from fedmaml.meta.algorithms import ALGORITHMS

TASKS = ("sine", "omniglot", "femnist", "table", "local")
META_OPTIMIZERS = ("adam", "sgd")
AGGREGATIONS = ("uniform", "weighted")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
DEVICES = ("auto", "cpu", "cuda")
BATCHING = ("auto", "vmap", "loop")
PARTITIONS = ("iid", "dirichlet", "pathological")

_CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "algorithm": ALGORITHMS,
    "meta_optimizer": META_OPTIMIZERS,
    "aggregation": AGGREGATIONS,
    "aggregator": AGGREGATORS,
    "batching": BATCHING,
    "partition": PARTITIONS,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated meta-learning run needs. Defaults: MAML on sinusoids."""

    task: str = "sine"
    data_path: str = ""
    label_column: str = "label"
    user_column: str = "user"
    feature_columns: str = ""
    partition: str = "iid"
    partition_alpha: float = 0.5
    partition_classes: int = 2
    cache_dir: str = ""
    input_shape: str = ""
    num_classes: int = 0
    model: str = ""
    algorithm: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    eval_steps: int = 5
    meta_optimizer: str = "adam"
    meta_lr: float = 0.003
    num_rounds: int = 300
    num_train_clients: int = 100
    num_heldout_clients: int = 20
    fraction_train: float = 0.1
    min_train_nodes: int = 2
    aggregation: str = "uniform"
    aggregator: str = "mean"
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    max_update_norm: float = 0.0
    support_size: int = 10
    query_size: int = 10
    ways: int = 0
    local_episodes: int = 1
    eval_every: int = 50
    eval_clients: int = 20
    eval_episodes: int = 1
    seed: int = 0
    out_dir: str = "runs/latest"
    resume: str = ""
    device: str = "auto"
    batching: str = "auto"
    round_timeout: float = 600.0
    personalize: bool = False

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise _bad(name, value, f"one of {', '.join(allowed)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise _bad("device", self.device, "auto, cpu, cuda or cuda:N")
        for name in (
            "inner_steps",
            "eval_steps",
            "num_rounds",
            "num_train_clients",
            "min_train_nodes",
            "support_size",
            "query_size",
            "local_episodes",
            "eval_every",
            "eval_clients",
            "eval_episodes",
            "partition_classes",
        ):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("num_heldout_clients", "ways", "seed", "num_classes"):
            if getattr(self, name) < 0:
                raise _bad(name, getattr(self, name), "an integer >= 0")
        if self.ways == 1:
            raise _bad("ways", 1, "0 (use the data's own labels) or an integer >= 2")
        for name in ("inner_lr", "meta_lr", "partition_alpha"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise _bad(name, getattr(self, name), "a finite number > 0")
        if not 0 < self.fraction_train <= 1:
            raise _bad("fraction_train", self.fraction_train, "a number in (0, 1]")
        if not (math.isfinite(self.round_timeout) and self.round_timeout > 0):
            raise _bad("round_timeout", self.round_timeout, "seconds > 0")
        for name in ("dp_clip", "dp_noise"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise _bad(name, getattr(self, name), "a finite number >= 0")
        if not self.max_update_norm >= 0:  # NaN fails too
            raise _bad(
                "max_update_norm",
                self.max_update_norm,
                "0 (automatic: leave out outliers), a norm > 0 (clip to it) or inf (no bound)",
            )
        if self.min_train_nodes > self.num_train_clients:
            raise _bad(
                "min_train_nodes",
                self.min_train_nodes,
                f"at most num-train-clients ({self.num_train_clients}): a round could never "
                "gather that many training clients",
            )
        if self.dp_clip > 0 and self.aggregation != "uniform":
            raise _bad(
                "aggregation",
                self.aggregation,
                "uniform when dp-clip is set (Flower's central DP needs equal client weights)",
            )
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise _bad("dp_clip", self.dp_clip, "a number > 0 when dp-noise > 0")
        if self.partition != "iid" and self.user_column:
            raise _bad(
                "partition",
                self.partition,
                'iid, or user-column = "" (rows are partitioned only when the table names no '
                "users; with a user column every user is one client)",
            )
        if self.task not in ("sine", "local") and not self.data_path:
            raise _bad("data_path", "", f"the path of the {self.task} data")
        self._check_local()

    def _check_local(self) -> None:
        """Task ``local``: every node reads its own data, so the run config alone must fix the
        model: ``input-shape`` (d, or C,H,W) and ``num-classes`` (0 = regression)."""
        dims = _shape(self.input_shape)
        if dims is None or (self.input_shape and len(dims) not in (1, 3)):
            raise _bad("input_shape", self.input_shape, "d (features) or C,H,W (images), e.g. 8")
        if self.num_classes == 1:
            raise _bad("num_classes", 1, "0 (regression) or an integer >= 2 (classes)")
        if self.ways and self.num_classes and self.ways > self.num_classes:
            raise _bad("ways", self.ways, f"at most num-classes ({self.num_classes})")
        if self.task == "local" and not dims:
            raise _bad(
                "input_shape", "", "the shape of one example for task 'local', e.g. 8 or 1,28,28"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from run_config-style keys (``inner-lr`` or ``inner_lr``); reject unknown keys."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedmamlError(
                    f"unknown config key {key!r}; known keys: "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            kwargs[name] = _coerce(name, value, type(getattr(cls(), name)))
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The run_config form (hyphenated keys), as stored in checkpoints and results."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def feature_column_list(self) -> list[str] | None:
        """``feature-columns`` as a list (comma-separated names); None = all other numeric."""
        names = [c.strip() for c in self.feature_columns.split(",") if c.strip()]
        return names or None

    @property
    def input_dims(self) -> tuple[int, ...]:
        """``input-shape`` as integers: () unset, (d,) features, (C, H, W) images."""
        return _shape(self.input_shape) or ()

    @property
    def clients_per_round(self) -> int:
        """Training clients sampled per round (Flower's rule: fraction, at least the minimum)."""
        return max(int(self.num_train_clients * self.fraction_train), self.min_train_nodes)

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        if self.task == "local":
            return "mlp" if len(self.input_dims) == 1 else "conv4"
        return {"sine": "sine_mlp", "omniglot": "conv4", "femnist": "femnist_cnn", "table": "mlp"}[
            self.task
        ]


def _coerce(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
            if not -(2**63) <= number < 2**63:
                raise OverflowError
            return number
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except OverflowError:
        raise _bad(name, value, "an integer that fits in 64 bits") from None
    except (TypeError, ValueError):
        raise _bad(name, value, f"a value of type {kind.__name__}") from None


def _shape(text: str) -> tuple[int, ...] | None:
    """Parse ``input-shape``: "1,28,28" -> (1, 28, 28), "" -> (), None if not positive ints."""
    try:
        dims = tuple(int(part) for part in text.split(",")) if text.strip() else ()
    except ValueError:
        return None
    return dims if all(d > 0 for d in dims) else None


def _bad(name: str, value: Any, allowed: str) -> FedmamlError:
    key = name.replace("_", "-")
    return FedmamlError(f"config key {key!r} has value {value!r}; allowed: {allowed}")
