"""The meta-optimizer wrapped around a Flower aggregation strategy.

Round t, with θ the global meta-parameters:

1. ``configure_train``: the wrapped strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, optionally
   inside Flower's central-DP wrapper) samples training nodes and builds the messages around a
   *zero* reference; each message then carries θ to its client.
2. Clients reply Δ_i = −g_i (their meta-gradient, as an update relative to zero).
3. ``aggregate_train``: malformed replies (errors, NaN/Inf, wrong keys or shapes) are left out
   and logged with their node id; the wrapped strategy aggregates the rest exactly as it
   aggregates model updates ("reply − sent" = Δ_i: clipping, noise, robust statistics apply
   unchanged) into Δ̄; then the meta-optimizer steps with ḡ = −Δ̄:
   SGD: θ ← θ − β ḡ, or Adam (state kept across rounds).

Using zero as the reference keeps g exact (no θ − (θ − g) cancellation in float32).
Evaluation (``configure_evaluate``) goes to a fixed sample of training and held-out nodes.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated.records import from_record, to_record
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.results import RunRecorder

DESCRIBE = f"{MessageType.QUERY}.describe"
PERSONALIZE = f"{MessageType.QUERY}.personalize"
ID_KEYS = ("num-examples", "task-weight", "client-index", "heldout")


class NodeRoles:
    """Which connected node is a training client, a held-out client, or broken (and why)."""

    def __init__(self, recorder: RunRecorder, timeout: float) -> None:
        self.role: dict[int, str] = {}
        self.index: dict[int, int] = {}
        self.broken: dict[int, str] = {}
        self.recorder = recorder
        self.timeout = timeout

    def refresh(self, grid: Grid, meta_round: int) -> None:
        """Ask nodes not seen before who they are (one query round trip, only when needed)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.role and n not in self.broken]
        if not unknown:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=DESCRIBE) for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.broken[node] = error_reason(reply)
                log(WARNING, "fedmaml: node %d cannot take part: %s", node, self.broken[node])
                self.recorder.client_row(
                    round=meta_round,
                    phase="describe",
                    node_id=node,
                    status="error",
                    reason=self.broken[node],
                )
                continue
            info = reply.content["describe"]
            self.role[node] = str(info["role"])
            self.index[node] = int(info["client-index"])

    def nodes(self, role: str) -> list[int]:
        return sorted(n for n, r in self.role.items() if r == role)


class _NodeSubset:
    """A view of the Grid whose connected nodes are one role's: the wrapped strategy samples
    training clients only. Refreshes roles on every call, as nodes may join mid-run."""

    def __init__(self, grid: Grid, roles: NodeRoles, role: str, meta_round: int) -> None:
        self._grid, self._roles, self._role, self._round = grid, roles, role, meta_round

    def get_node_ids(self) -> list[int]:
        self._roles.refresh(self._grid, self._round)
        connected = set(self._grid.get_node_ids())
        return [n for n in self._roles.nodes(self._role) if n in connected]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class MetaStrategy(Strategy):
    """Server-side meta-learning over any Flower aggregation strategy."""

    def __init__(
        self,
        aggregator: Strategy,
        optimizer: MetaOptimizer,
        cfg: RunConfig,
        recorder: RunRecorder,
        *,
        round_offset: int = 0,
        num_rounds: int,
        on_update: Callable[[int, Params, MetaOptimizer], None] | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.cfg = cfg
        self.recorder = recorder
        self.round_offset = round_offset
        self.num_rounds = num_rounds
        self.on_update = on_update
        self.roles = NodeRoles(recorder, timeout)
        self.shapes = {k: tuple(v.shape) for k, v in optimizer.params.items()}
        self._zero = to_record({k: torch.zeros_like(v) for k, v in optimizer.params.items()})
        self._eval_nodes: dict[str, list[int]] = {}
        self._rng = random.Random(cfg.seed)

    def meta_round(self, server_round: int) -> int:
        return self.round_offset + server_round

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> fedmaml meta-learning: %s, %s inner step(s), α=%s",
            self.cfg.algorithm,
            self.cfg.inner_steps,
            self.cfg.inner_lr,
        )
        log(
            INFO,
            "\t├──> meta-optimizer: %s (β=%s), averaging: %s",
            self.cfg.meta_optimizer,
            self.cfg.meta_lr,
            self.cfg.aggregation,
        )
        log(INFO, "\t└──> aggregation strategy: %s", type(self.aggregator).__name__)

    # ------------------------------------------------------------------ training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        meta_round = self.meta_round(server_round)
        round_config = ConfigRecord({**dict(config), "meta-round": meta_round})
        subset = _NodeSubset(grid, self.roles, "train", meta_round)
        messages = list(
            self.aggregator.configure_train(server_round, self._zero, round_config, subset)  # type: ignore[arg-type]
        )
        for message in messages:
            message.content["arrays"] = arrays
        self.recorder.round_values(meta_round, sampled=len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        meta_round = self.meta_round(server_round)
        replies = list(replies)
        problems = {m.metadata.src_node_id: self._problem(m) for m in replies}
        keys = Counter(
            tuple(sorted(m.content["metrics"].keys()))
            for m in replies
            if problems[m.metadata.src_node_id] is None
        )
        expected = keys.most_common(1)[0][0] if keys else ()
        good = []
        for m in replies:
            node = m.metadata.src_node_id
            problem = problems[node]
            if problem is None and tuple(sorted(m.content["metrics"].keys())) != expected:
                problem = "metric keys differ from the other clients'"
            row = {
                "round": meta_round,
                "phase": "train",
                "node_id": node,
                "client": self.roles.index.get(node, -1),
            }
            if problem is None:
                good.append(m)
                metrics = dict(m.content["metrics"])
                self.recorder.client_row(**row, status="ok", **_plain(metrics))
            else:
                log(
                    WARNING,
                    "fedmaml round %d: node %d left out of the update: %s",
                    meta_round,
                    node,
                    problem,
                )
                self.recorder.client_row(**row, status="failed", reason=problem)
        values: dict[str, Any] = {"ok": len(good), "failed": len(replies) - len(good)}
        if len(good) < self.cfg.min_train_nodes:
            log(
                WARNING,
                "fedmaml round %d: %d valid replies, fewer than min-train-nodes=%d: "
                "meta-update skipped",
                meta_round,
                len(good),
                self.cfg.min_train_nodes,
            )
            self._finish_round(meta_round, values | {"updated": False})
            return None, None
        aggregated, metrics = self.aggregator.aggregate_train(server_round, good)
        if aggregated is None:
            log(
                WARNING,
                "fedmaml round %d: aggregation returned nothing: meta-update skipped",
                meta_round,
            )
            self._finish_round(meta_round, values | {"updated": False})
            return None, metrics
        grads = {k: -v for k, v in from_record(aggregated).items()}
        try:
            params = self.optimizer.step(grads)
        except FedmamlError as exc:
            log(WARNING, "fedmaml round %d: meta-update skipped: %s", meta_round, exc)
            self._finish_round(meta_round, values | {"updated": False})
            return None, metrics
        if metrics is not None:
            values.update(
                {f"train-{k}": v for k, v in _plain(dict(metrics)).items() if k not in ID_KEYS}
            )
        self._finish_round(meta_round, values | {"updated": True})
        if self.on_update:
            self.on_update(meta_round, params, self.optimizer)
        return to_record(params), metrics

    def _problem(self, msg: Message) -> str | None:
        """Why a training reply cannot be used, or None."""
        if msg.has_error():
            return f"client error: {error_reason(msg)}"
        content = msg.content
        if list(content.array_records) != ["arrays"] or list(content.metric_records) != ["metrics"]:
            return "reply must hold one ArrayRecord 'arrays' and one MetricRecord 'metrics'"
        record = content["arrays"]
        if set(record.keys()) != set(self.shapes):
            return "update keys do not match the meta-parameters"
        for k, arr in record.items():
            values = arr.numpy()
            if tuple(values.shape) != self.shapes[k]:
                return f"update {k!r} has shape {tuple(values.shape)}, expected {self.shapes[k]}"
            if not np.isfinite(values).all():
                return f"update {k!r} holds NaN or Inf"
        metrics = content["metrics"]
        for key in ("num-examples", "task-weight"):
            if key not in metrics:
                return f"metrics lack {key!r}"
        if not all(np.isfinite(np.asarray(v, dtype=float)).all() for v in metrics.values()):
            return "metrics hold NaN or Inf"
        if metrics["num-examples"] <= 0:
            return "num-examples must be positive"
        return None

    def _finish_round(self, meta_round: int, values: dict[str, Any]) -> None:
        self.recorder.round_values(
            meta_round, elapsed_s=round(self.recorder.elapsed(), 3), **values
        )
        self.recorder.flush()
        row = self.recorder.rounds[meta_round]
        log(
            INFO,
            "fedmaml round %d: %d ok, %d failed, updated=%s, query loss %.4f -> %.4f",
            meta_round,
            values["ok"],
            values["failed"],
            values["updated"],
            float(row.get("train-loss-before", float("nan"))),
            float(row.get("train-loss-after", float("nan"))),
        )

    # ------------------------------------------------------------------ evaluation

    def is_eval_round(self, server_round: int) -> bool:
        return (
            self.meta_round(server_round) % self.cfg.eval_every == 0
            or server_round == self.num_rounds
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.is_eval_round(server_round):
            return []
        meta_round = self.meta_round(server_round)
        self.roles.refresh(grid, meta_round)
        connected = set(grid.get_node_ids())
        nodes = [n for n in self._evaluation_nodes() if n in connected]
        record = RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord(
                    {**dict(config), "server-round": server_round, "meta-round": meta_round}
                ),
            }
        )
        return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def _evaluation_nodes(self) -> list[int]:
        """A fixed, seeded sample of up to eval-clients training and held-out nodes."""
        for role in ("train", "heldout"):
            if not self._eval_nodes.get(role):
                nodes = self.roles.nodes(role)
                self._eval_nodes[role] = sorted(
                    self._rng.sample(nodes, min(self.cfg.eval_clients, len(nodes)))
                )
        return self._eval_nodes["train"] + self._eval_nodes["heldout"]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        meta_round = self.meta_round(server_round)
        summary = self._per_group(meta_round, "evaluate", replies)
        if not summary:
            return None
        self.recorder.round_values(meta_round, **summary)
        self.recorder.flush()
        return MetricRecord(summary)

    def personalize(self, grid: Grid, arrays: ArrayRecord) -> dict[str, float]:
        """Send θ to every client for on-device personalization (``query.personalize``); each
        keeps its model and replies metrics only. Returns their means per group (seen/unseen)."""
        meta_round = self.meta_round(self.num_rounds)
        self.roles.refresh(grid, meta_round)
        record = RecordDict({"arrays": arrays})
        messages = [
            Message(record, dst_node_id=n, message_type=PERSONALIZE)
            for n in sorted(self.roles.role)
        ]
        replies = grid.send_and_receive(messages, timeout=self.roles.timeout)
        summary = self._per_group(meta_round, "personalize", replies)
        self.recorder.flush()
        return summary

    def _per_group(
        self, meta_round: int, phase: str, replies: Iterable[Message]
    ) -> dict[str, float]:
        """Record every reply (or failure) of an evaluation-like phase; the mean of each metric
        over the seen (training) and unseen (held-out) clients that replied."""
        groups: dict[str, list[dict[str, float]]] = {"seen": [], "unseen": []}
        for m in replies:
            node = m.metadata.src_node_id
            row = {
                "round": meta_round,
                "phase": phase,
                "node_id": node,
                "client": self.roles.index.get(node, -1),
            }
            if m.has_error():
                reason = error_reason(m)
                log(
                    WARNING,
                    "fedmaml round %d: %s failed on node %d: %s",
                    meta_round,
                    phase,
                    node,
                    reason,
                )
                self.recorder.client_row(**row, status="failed", reason=reason)
                continue
            metrics = _plain(dict(m.content["metrics"]))
            self.recorder.client_row(**row, status="ok", **metrics)
            groups["unseen" if metrics.get("heldout") else "seen"].append(metrics)
        return {
            f"{group}-{key}": float(np.mean([r[key] for r in rows]))
            for group, rows in groups.items()
            for key in (rows[0] if rows else ())
            if key not in ID_KEYS
        }


def error_reason(reply: Message) -> str:
    """A client's error as one line: Flower wraps it as "<class 'mod.Type'>:<'message'>"."""
    reason = reply.error.reason
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason, flags=re.DOTALL)
    return f"{match.group(1)}: {match.group(2)}" if match else reason


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, int | float)}
