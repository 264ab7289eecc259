"""Checks on what nodes send back: one guard per reply, so a bad reply leaves only its node out.

The server trusts nothing a node says about itself that it cannot check:

* a training reply holds one ArrayRecord with θ's keys and shapes and a floating dtype; it is
  cast to θ's dtype *before* the finiteness check (a float64 1e300 is finite, its float32 cast
  is not);
* its aggregation weight is the server's: 1 per task (``aggregation = "uniform"``) or the
  number of query examples (``"weighted"``), an integer in 1..the most the episodes the server
  asked for can hold; a node's own ``task-weight`` or a negative, zero or inflated count never
  reaches the aggregation;
* its update norm ‖g‖ is bounded (:class:`NormBound`);
* describe, evaluate and personalize replies are parsed field by field; a missing record or a
  value of the wrong type is that node's failure, never a server error.

Every failure is a :class:`BadReply` whose message is one line for ``clients.csv`` and the log.

Under ``secure-aggregation`` the server never sees a training reply's update, so these checks
move: each client checks its own update (finite, clipped to the norm bound) before masking it
(:mod:`fedmaml.federated.secagg_client`), and the server checks the unmasked sum (its range and
norm, :mod:`fedmaml.federated.secagg_server`); the weight is uniform.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Message

from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.arrays import from_array
from fedmaml.federated.processes import strip_ansi

#: automatic norm bound: a reply more than this many times the typical (median) update norm of
#: the accepted replies (this round's and recent rounds') is left out as an outlier
AUTO_NORM_FACTOR = 1000.0
#: accepted update norms remembered for the automatic bound
NORM_HISTORY = 200


class BadReply(FedmamlError):
    """A node's reply that cannot be used; the message says why, in one line."""


@dataclass(frozen=True)
class UpdateSpec:
    """What a training reply must look like: θ's names, shapes and dtype, and the most query
    examples its local episodes can hold."""

    shapes: dict[str, tuple[int, ...]]
    dtype: np.dtype
    max_examples: int


@dataclass
class TrainUpdate:
    """A checked training reply: the update Δ = −g (cast to θ's dtype), its norm, the query
    examples it covers and its metrics."""

    arrays: dict[str, np.ndarray]
    norm: float
    num_examples: int
    metrics: dict[str, float]

    def scaled(self, factor: float) -> None:
        """Δ ← factor · Δ (norm clipping)."""
        self.arrays = {k: (v * factor).astype(v.dtype) for k, v in self.arrays.items()}
        self.norm *= factor


def train_update(msg: Message, spec: UpdateSpec) -> TrainUpdate:
    """The checked content of one node's training reply, or :class:`BadReply`."""
    if msg.has_error():
        raise BadReply(f"client error: {error_reason(msg)}")
    content = msg.content
    if list(content.array_records) != [keys.ARRAYS] or list(content.metric_records) != [
        keys.METRICS
    ]:
        raise BadReply(
            f"reply must hold one ArrayRecord {keys.ARRAYS!r} and one MetricRecord {keys.METRICS!r}"
        )
    arrays = stacked_arrays(content[keys.ARRAYS], spec, rows=None)
    return checked_update(arrays, content[keys.METRICS], spec)


def user_update(
    msg: Message, arrays: dict[str, np.ndarray] | BadReply | None, spec: UpdateSpec
) -> TrainUpdate:
    """The checked update of one user of a many-users reply, or :class:`BadReply`: ``msg``
    holds the user's metrics (or its failure: :func:`fedmaml.federated.users.user_replies`),
    ``arrays`` its row of the reply's stacked update
    (:func:`fedmaml.federated.users.user_rows`; None when the reply has none for it)."""
    if msg.has_error():
        raise BadReply(f"client error: {error_reason(msg)}")
    if isinstance(arrays, BadReply):
        raise arrays
    if arrays is None:
        raise BadReply("the reply holds no update for this user")
    return checked_update(arrays, msg.content[keys.METRICS], spec)


def stacked_arrays(record: Any, spec: UpdateSpec, rows: int | None) -> dict[str, np.ndarray]:
    """An update record's arrays, read and cast to θ's dtype, or :class:`BadReply`: θ's keys,
    each with θ's shape (``rows`` None: one node's update) or with ``rows`` updates stacked
    along a first axis (a many-users reply), floating point. Finiteness is each update's own
    check (:func:`checked_update`), so one user's NaN leaves only that user out."""
    if set(record.keys()) != set(spec.shapes):
        raise BadReply("update keys do not match the meta-parameters")
    arrays = {}
    for name, array in record.items():
        try:
            values = from_array(array)
        except Exception:  # a malformed Array (bad bytes, unknown dtype)
            raise BadReply(f"update {name!r} cannot be read as an array") from None
        expected = spec.shapes[name] if rows is None else (rows, *spec.shapes[name])
        if tuple(values.shape) != expected:
            raise BadReply(f"update {name!r} has shape {tuple(values.shape)}, expected {expected}")
        if values.dtype.kind != "f":
            raise BadReply(f"update {name!r} has dtype {values.dtype}, expected floats")
        with np.errstate(over="ignore", invalid="ignore"):
            arrays[name] = values.astype(spec.dtype)
    return arrays


def checked_update(arrays: dict[str, np.ndarray], record: Any, spec: UpdateSpec) -> TrainUpdate:
    """One update (θ's keys and shapes, θ's dtype: :func:`stacked_arrays`) with its reply's
    MetricRecord, checked: finite, an example count the server's episodes can hold, a finite
    norm; or :class:`BadReply`."""
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise BadReply(f"update {name!r} holds NaN or Inf (as {spec.dtype})")
    metrics = plain_metrics(record)
    n = metrics.get(keys.NUM_EXAMPLES)
    if n is None:
        raise BadReply(f"metrics lack {keys.NUM_EXAMPLES!r}")
    if n != int(n) or not 1 <= n <= spec.max_examples:
        raise BadReply(
            f"{keys.NUM_EXAMPLES}={n:g} is not an integer in 1..{spec.max_examples} (the query "
            "examples of the episodes the server asked for)"
        )
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in arrays.values()))
    if not math.isfinite(norm):
        raise BadReply("the update's norm overflows")
    return TrainUpdate(arrays, norm, int(n), metrics)


def plain_metrics(record: Any) -> dict[str, float]:
    """A MetricRecord's scalar values as floats; lists are dropped. NaN, Inf or a non-number
    is a :class:`BadReply`."""
    values: dict[str, float] = {}
    for key, value in dict(record).items():
        if isinstance(value, list):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadReply(f"metric {key!r} is not a number")
        if not math.isfinite(value):
            raise BadReply(f"metric {key!r} is NaN or Inf")
        values[key] = float(value)
    return values


def evaluation_metrics(msg: Message) -> dict[str, float]:
    """The metrics of an evaluate or personalize reply, or :class:`BadReply`."""
    if msg.has_error():
        raise BadReply(f"client error: {error_reason(msg)}")
    if keys.METRICS not in msg.content.metric_records:
        raise BadReply(f"reply lacks the MetricRecord {keys.METRICS!r}")
    return plain_metrics(msg.content[keys.METRICS])


@dataclass(frozen=True)
class NodeInfo:
    """Who a node says it is (``query.describe``)."""

    role: str
    index: int
    client_id: str
    num_examples: int
    #: the simulated federation's size (``num-partitions``), 0 for a deployed node
    num_partitions: int


def node_info(msg: Message) -> NodeInfo:
    """The parsed reply to ``query.describe``, or :class:`BadReply`."""
    if msg.has_error():
        raise BadReply(error_reason(msg))
    if keys.DESCRIBE not in msg.content.config_records:
        raise BadReply(f"reply lacks the ConfigRecord {keys.DESCRIBE!r}")
    info = msg.content[keys.DESCRIBE]
    role = info.get(keys.ROLE)
    if role not in keys.ROLES:
        raise BadReply(f"role {role!r} is not one of {', '.join(keys.ROLES)}")
    fields = {}
    for key in (keys.CLIENT_INDEX, keys.NUM_EXAMPLES, keys.NUM_PARTITIONS):
        value = info.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadReply(f"{key}={value!r} is not an integer >= 0")
        fields[key] = value
    return NodeInfo(
        role=str(role),
        index=fields[keys.CLIENT_INDEX],
        client_id=str(info.get(keys.CLIENT_ID, ""))[:200],
        num_examples=fields[keys.NUM_EXAMPLES],
        num_partitions=fields[keys.NUM_PARTITIONS],
    )


class NormBound:
    """The bound on a training reply's update norm ‖Δ‖ (``max-update-norm``).

    * ``> 0``: replies above it are clipped to it, Δ ← Δ · C/‖Δ‖ (their direction kept);
    * ``0`` (automatic, the default): replies above ``AUTO_NORM_FACTOR`` × the lower median of
      the accepted norms (this round's and the last ``NORM_HISTORY``) are left out as outliers:
      a finite 1e30 update can neither move θ by 1e28 (SGD) nor blow up Adam's second moment;
    * ``inf``: no bound.

    Robust aggregators (median, trimmed mean, Krum) and ``dp-clip`` bound what a minority of
    nodes can do within the bound.
    """

    def __init__(self, max_update_norm: float) -> None:
        self.limit = max_update_norm
        self.history: deque[float] = deque(maxlen=NORM_HISTORY)

    def apply(self, updates: dict[int, TrainUpdate]) -> tuple[dict[int, str], list[int]]:
        """Bound this round's updates (in place); return ``(left_out, clipped)``: the nodes left
        out with the reason, and the nodes whose update was clipped."""
        left_out: dict[int, str] = {}
        clipped: list[int] = []
        if math.isinf(self.limit):
            pass
        elif self.limit > 0:
            for node, update in updates.items():
                if update.norm > self.limit:
                    update.scaled(self.limit / update.norm)
                    clipped.append(node)
        else:
            norms = [*self.history, *(u.norm for u in updates.values())]
            typical = statistics.median_low(norms) if norms else 0.0
            if typical > 0:
                bound = AUTO_NORM_FACTOR * typical
                for node, update in updates.items():
                    if update.norm > bound:
                        left_out[node] = (
                            f"update norm {update.norm:.3g} is more than {AUTO_NORM_FACTOR:g}x "
                            f"the typical norm {typical:.3g} (set max-update-norm to clip instead)"
                        )
        self.history.extend(u.norm for n, u in updates.items() if n not in left_out)
        return left_out, clipped


def error_reason(reply: Message) -> str:
    """A node's error as one plain line. Flower wraps a ClientApp's exception as
    "<class 'mod.Type'>:<'message'>" (in simulation with a coloured Ray traceback inside);
    fedmaml's own ClientApp replies one line already (:mod:`fedmaml.federated.client_errors`)."""
    reason = strip_ansi(reply.error.reason)
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    if match:
        reason = f"{match.group(1)}: {match.group(2)}"
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1][:500] if lines else f"error code {reply.error.code}"
