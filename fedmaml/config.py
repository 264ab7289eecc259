"""Typed, validated run configuration: parsed once at the edge, passed down as one object.

Keys are those of ``[tool.flwr.app.config]`` in pyproject.toml (hyphenated); the dataclass
fields are the same names with underscores. ``RunConfig.from_mapping`` checks every value and
stops with one message naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedmaml.errors import FedmamlError
from fedmaml.meta.algorithms import ALGORITHMS
from fedmaml.meta.choices import ADAPTED, BATCHING, META_OPTIMIZERS

TASKS = ("sine", "omniglot", "femnist", "table", "local")
AGGREGATIONS = ("uniform", "weighted")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
DEVICES = ("auto", "cpu", "cuda")
PARTITIONS = ("iid", "dirichlet", "pathological")

CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS,
    "algorithm": ALGORITHMS,
    "meta_optimizer": META_OPTIMIZERS,
    "aggregation": AGGREGATIONS,
    "aggregator": AGGREGATORS,
    "batching": BATCHING,
    "partition": PARTITIONS,
}


def _key(default: Any, help: str) -> Any:
    """A run-config key: its default and its one-line help (``fedmaml simulate --help``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated meta-learning run needs. Defaults: MAML on sinusoids."""

    task: str = _key(
        "sine",
        "data: sine (built in), omniglot, femnist, table (these need "
        "data-path), or local (deployment: each device brings its own data)",
    )
    data_path: str = _key("", "the data of task omniglot, femnist or table (file or folder)")
    label_column: str = _key("label", "table: the label column")
    user_column: str = _key(
        "user",
        "table: the column naming each row's user (one client per "
        "user); empty: split the rows with partition",
    )
    feature_columns: str = _key(
        "", "table: comma-separated feature columns (empty: every other numeric column)"
    )
    partition: str = _key(
        "iid",
        "table without users: how flwr-datasets splits the rows into "
        "clients (iid, dirichlet, pathological)",
    )
    partition_alpha: float = _key(0.5, "partition dirichlet: label shares ~ Dir(alpha)")
    partition_classes: int = _key(2, "partition pathological: labels per client")
    cache_dir: str = _key(
        "", "omniglot: a folder for the resized alphabets, shared by the simulated clients"
    )
    input_shape: str = _key("", "task local: one example's shape, d or C,H,W")
    num_classes: int = _key(0, "task local: number of classes (0: regression)")
    model: str = _key("", "model name (empty: the task's default)")
    algorithm: str = _key(
        "maml", "meta-learning algorithm (fedavg: the FedAvg + fine-tuning baseline)"
    )
    inner_steps: int = _key(1, "K, adaptation steps on a client's support set in training")
    inner_lr: float = _key(0.01, "α, the inner step size (the initial value under metasgd)")
    eval_steps: int = _key(5, "evaluation reports the metric after 0..eval-steps steps")
    meta_optimizer: str = _key("adam", "the server's optimizer of θ")
    meta_lr: float = _key(0.003, "β, the server's step size")
    num_rounds: int = _key(300, "federated rounds (meta-updates)")
    num_train_clients: int = _key(100, "training clients (tasks)")
    num_heldout_clients: int = _key(20, "clients never trained on, for evaluation (unseen users)")
    num_val_clients: int = _key(
        0,
        "validation clients, never trained on: the personalization recipe (steps, step size, "
        "parameters adapted) is chosen on them at the end of training (0: no recipe)",
    )
    fraction_train: float = _key(0.1, "share of the training clients sampled per round")
    min_train_nodes: int = _key(2, "valid replies a round needs to update θ")
    aggregation: str = _key(
        "uniform", "uniform over tasks (the MAML objective) or weighted by query examples"
    )
    aggregator: str = _key("mean", "the Flower strategy that aggregates the meta-gradients")
    dp_clip: float = _key(0.0, "central differential privacy: clipping norm C (0: off)")
    dp_noise: float = _key(0.0, "central differential privacy: noise multiplier σ")
    max_update_norm: float = _key(
        0.0,
        "bound on a reply's update norm: 0 leaves out replies "
        "above 1000x the typical norm, > 0 clips to it, inf: none",
    )
    dp_delta: float = _key(1e-5, "differential privacy: δ at which ε is reported")
    dp_max_epsilon: float = _key(
        0.0, "differential privacy: stop training before ε would exceed this (0: no budget)"
    )
    secure_aggregation: bool = _key(
        False, "SecAgg+: the server learns only the sum of the sampled clients' meta-gradients"
    )
    secagg_shares: int = _key(
        0, "SecAgg+: clients each client shares its keys with, itself included (0: all sampled)"
    )
    secagg_threshold: int = _key(
        0, "SecAgg+: shares that rebuild a dropped client's masks (0: a majority of the shares)"
    )
    secagg_clip_range: float = _key(
        0.0, "SecAgg+: coordinates are clipped to [-r, r] before quantization (0: the norm bound)"
    )
    secagg_bits: int = _key(
        22, "SecAgg+: quantization bits per coordinate (a round's sum must fit in 32 bits)"
    )
    support_size: int = _key(10, "support examples per episode (per class when ways > 0)")
    query_size: int = _key(10, "query examples per episode (per class when ways > 0)")
    ways: int = _key(0, "N-way episodes (0: the data's own labels)")
    support_fraction: float = _key(
        0.0,
        "> 0: each client's data is split once, seeded, into a support set (this share) and a "
        "query set (the rest), and every episode uses both whole; support-size and query-size "
        "are then the smallest sets a client may have (smaller clients are dropped before the "
        "counts are checked); 0: episodes of support-size + query-size examples",
    )
    local_episodes: int = _key(1, "episodes per client per round (their meta-gradients averaged)")
    eval_every: int = _key(50, "evaluate every this many rounds (and at the last)")
    eval_clients: int = _key(20, "clients evaluated per group (seen, unseen)")
    eval_episodes: int = _key(1, "episodes averaged per evaluated client")
    seed: int = _key(0, "seed of the clients' episodes, the split and the initial θ")
    out_dir: str = _key("runs/latest", "run directory")
    resume: str = _key("", "checkpoint to resume from; auto: the run directory's, if any")
    overwrite: bool = _key(False, "replace a finished or stopped run in out-dir (else refused)")
    device: str = _key("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    batching: str = _key("auto", "meta-gradients of a client's episodes: vmap or a loop")
    round_timeout: float = _key(600.0, "seconds a round waits for slow or dead clients")
    personalize: bool = _key(False, "after training, every client personalizes θ on its device")
    users_per_node: int = _key(
        1,
        "users (clients) each simulated node holds and computes in one batch; "
        "fedmaml simulate starts ceil(clients / users-per-node) nodes",
    )
    recipe_lrs: str = _key(
        "",
        "step sizes the personalization recipe tries, comma-separated (empty: inner-lr times "
        "1/4, 1/2, 1, 2 and 4, and the learned ones under metasgd)",
    )
    recipe_adapt: str = _key(
        "all,head", "parameters the recipe tries adapting: all, head (the last layer), or both"
    )

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
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
            "users_per_node",
        ):
            if getattr(self, name) < 1:
                raise _bad(name, getattr(self, name), "an integer >= 1")
        for name in ("num_heldout_clients", "num_val_clients", "ways", "seed", "num_classes"):
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
        self._check_privacy()
        if self.partition != "iid" and self.user_column:
            raise _bad(
                "partition",
                self.partition,
                'iid, or user-column = "" (rows are partitioned only when the table names no '
                "users; with a user column every user is one client)",
            )
        self._check_protocol()
        if self.task not in ("sine", "local") and not self.data_path:
            raise _bad("data_path", "", f"the path of the {self.task} data")
        self._check_local()

    def _check_privacy(self) -> None:
        """The privacy budget and the SecAgg+ protocol settings (docs/privacy.md)."""
        if not 0 < self.dp_delta < 1:
            raise _bad("dp_delta", self.dp_delta, "a number in (0, 1), e.g. 1e-5")
        if not (math.isfinite(self.dp_max_epsilon) and self.dp_max_epsilon >= 0):
            raise _bad("dp_max_epsilon", self.dp_max_epsilon, "0 (no budget) or a finite ε > 0")
        if self.dp_max_epsilon > 0 and not self.accounted:
            raise _bad(
                "dp_max_epsilon",
                self.dp_max_epsilon,
                "0 unless dp-noise > 0 and aggregator = mean (ε is accounted only for the "
                "noised mean, whose sensitivity to one client is bounded by dp-clip)",
            )
        if not self.secure_aggregation:
            return
        if self.users_per_node != 1:
            raise _bad(
                "users_per_node",
                self.users_per_node,
                "1 with secure-aggregation: each client masks its own update with its own keys, "
                "so each simulated node computes one user",
            )
        if self.aggregator != "mean":
            raise _bad(
                "aggregator",
                self.aggregator,
                "mean with secure-aggregation: median, trimmed mean and Krum need every "
                "client's update, and the server sees only their sum",
            )
        if self.aggregation != "uniform":
            raise _bad(
                "aggregation",
                self.aggregation,
                "uniform with secure-aggregation: the server cannot check a weight it never "
                "sees, so every client counts once",
            )
        if not (self.dp_clip > 0 or 0 < self.max_update_norm < math.inf):
            raise _bad(
                "max_update_norm",
                self.max_update_norm,
                "a norm > 0 (or dp-clip > 0) with secure-aggregation: the server cannot check "
                "masked updates, so each client clips its own to this norm before masking",
            )
        if self.min_train_nodes < 2:
            raise _bad(
                "min_train_nodes",
                self.min_train_nodes,
                "at least 2 with secure-aggregation (a sum of one update is that update)",
            )
        m = self.clients_per_round
        if self.secagg_shares and not (
            3 <= self.secagg_shares <= m and self.secagg_shares % 2 == 1
        ):
            raise _bad(
                "secagg_shares",
                self.secagg_shares,
                f"0 (every sampled client) or an odd number in 3..{m} (the clients per round): "
                "each client shares with the same number of neighbours on either side",
            )
        shares = self.secagg_share_count
        if self.secagg_threshold and not shares // 2 < self.secagg_threshold <= shares:
            raise _bad(
                "secagg_threshold",
                self.secagg_threshold,
                f"0 (a majority) or an integer in {shares // 2 + 1}..{shares}: fewer than a "
                "majority of the shares would let a server that lies about who dropped out "
                "rebuild both masks of a client",
            )
        if not (math.isfinite(self.secagg_clip_range) and self.secagg_clip_range >= 0):
            raise _bad("secagg_clip_range", self.secagg_clip_range, "0 or a finite number > 0")
        if self.secagg_bits < 2 or m * 2**self.secagg_bits >= 2**32:
            top = ((2**32 - 1) // m).bit_length() - 1
            raise _bad(
                "secagg_bits",
                self.secagg_bits,
                f"an integer in 2..{top}: the sum of {m} clients' quantized coordinates must "
                "stay below 2^32, the masking modulus",
            )

    def _check_protocol(self) -> None:
        """The evaluation protocol's keys: the support fraction, validation clients, and the
        recipe's step sizes and adapted parameters."""
        if not 0 <= self.support_fraction < 1:  # NaN fails too
            raise _bad("support_fraction", self.support_fraction, "0 (off) or a share in (0, 1)")
        if self.support_fraction > 0 and self.ways:
            raise _bad(
                "ways",
                self.ways,
                "0 with support-fraction (whole support and query sets keep the data's labels)",
            )
        if self.support_fraction > 0 and self.aggregation != "uniform":
            raise _bad(
                "aggregation",
                self.aggregation,
                "uniform with support-fraction (the server cannot bound a client's query count "
                "when episodes are whole query sets)",
            )
        if self.num_val_clients and self.task == "local":
            raise _bad(
                "num_val_clients",
                self.num_val_clients,
                "0 for task local (the server holds no data to choose a recipe on)",
            )
        for text in column_names(self.recipe_lrs):
            try:
                rate = float(text)
            except ValueError:
                rate = float("nan")
            if not (math.isfinite(rate) and rate > 0):
                raise _bad(
                    "recipe_lrs", self.recipe_lrs, "comma-separated numbers > 0, e.g. 0.01,0.05"
                )
        adapts = column_names(self.recipe_adapt)
        if not adapts or any(a not in ADAPTED for a in adapts):
            raise _bad("recipe_adapt", self.recipe_adapt, "all, head, or all,head")

    @property
    def max_query_examples(self) -> int:
        """The most query examples a client's training reply may count: local-episodes ×
        query-size (× ways); with whole sets (support-fraction) a query set's size is not known
        in advance, so the count is only checked to be positive (and aggregation is uniform)."""
        if self.support_fraction > 0:
            return 2**62
        return self.local_episodes * self.query_size * max(self.ways, 1)

    @property
    def recipe_lr_list(self) -> list[float]:
        """``recipe-lrs`` as numbers; empty: inner-lr × 1/4, 1/2, 1, 2, 4."""
        given = [float(t) for t in column_names(self.recipe_lrs)]
        return given or [self.inner_lr * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]

    @property
    def recipe_adapt_list(self) -> list[str]:
        return column_names(self.recipe_adapt)

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
                keys = sorted(k.replace("_", "-") for k in known)
                close = difflib.get_close_matches(key.replace("_", "-"), keys, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise FedmamlError(
                    f"unknown config key {key!r}; {hint}known keys: " + ", ".join(keys)
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
        return column_names(self.feature_columns) or None

    @property
    def input_dims(self) -> tuple[int, ...]:
        """``input-shape`` as integers: () unset, (d,) features, (C, H, W) images."""
        return _shape(self.input_shape) or ()

    @property
    def clients_per_round(self) -> int:
        """Training clients sampled per round (Flower's rule: fraction, at least the minimum)."""
        return max(int(self.num_train_clients * self.fraction_train), self.min_train_nodes)

    @property
    def simulated_nodes(self) -> int:
        """The simulated SuperNodes a run needs: ⌈(train + held-out clients) / users-per-node⌉."""
        return -(-(self.num_train_clients + self.num_heldout_clients) // self.users_per_node)

    @property
    def clip_norm(self) -> float:
        """The norm each client clips its update to before sending it (0: none): ``dp-clip``,
        or under secure aggregation ``max-update-norm`` when it is smaller or dp-clip unset."""
        bounds = [self.dp_clip] if self.dp_clip > 0 else []
        if self.secure_aggregation and 0 < self.max_update_norm < math.inf:
            bounds.append(self.max_update_norm)
        return min(bounds, default=0.0)

    @property
    def accounted(self) -> bool:
        """Whether ε is accounted: Gaussian noise on the mean of clipped updates."""
        return self.dp_noise > 0 and self.aggregator == "mean"

    @property
    def secagg_share_count(self) -> int:
        """Clients in each SecAgg+ neighbourhood, the client itself included."""
        return self.secagg_shares or self.clients_per_round

    @property
    def secagg_share_threshold(self) -> int:
        """Shares needed to rebuild a client's mask seed or key."""
        return self.secagg_threshold or self.secagg_share_count // 2 + 1

    @property
    def model_name(self) -> str:
        if self.model:
            return self.model
        if self.task == "local":
            return "mlp" if len(self.input_dims) == 1 else "conv4"
        return {"sine": "sine_mlp", "omniglot": "conv4", "femnist": "femnist_cnn", "table": "mlp"}[
            self.task
        ]


def column_names(text: str) -> list[str]:
    """Comma-separated column names as a list (spaces around names dropped, empty names too)."""
    return [name.strip() for name in text.split(",") if name.strip()]


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
