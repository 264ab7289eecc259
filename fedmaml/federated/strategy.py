"""The meta-optimizer wrapped around a Flower aggregation strategy.

Round t, with θ the global meta-parameters:

1. ``configure_train``: once enough training nodes are connected (a wait bounded by
   ``round-timeout``), the wrapped strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, optionally
   inside Flower's central-DP wrapper) samples training nodes and builds the messages around a
   *zero* reference; each message then carries θ to its client.
2. Clients reply Δ_i = −g_i (their meta-gradient, as an update relative to zero).
3. ``aggregate_train``: every reply passes its own checks (:mod:`fedmaml.federated.replies`:
   keys, shapes, dtype, finiteness after the cast to θ's dtype, example counts, the update-norm
   bound); the server writes each reply's aggregation weight itself. The wrapped strategy
   aggregates the good replies exactly as it aggregates model updates ("reply − sent" = Δ_i:
   clipping, noise, robust statistics apply unchanged) into Δ̄; then the meta-optimizer steps
   with ḡ = −Δ̄: SGD θ ← θ − β ḡ, or Adam (state kept across rounds). A step that would leave θ
   or Adam's state non-finite is undone.

Using zero as the reference keeps g exact (no θ − (θ − g) cancellation in float32).
Evaluation (``configure_evaluate``) goes to a fixed sample of training and held-out nodes.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.records import from_record, to_record
from fedmaml.federated.replies import (
    BadReply,
    NormBound,
    TrainUpdate,
    UpdateSpec,
    train_update,
)
from fedmaml.federated.roles import NodeRoles
from fedmaml.federated.round_log import RoundLog
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.rundir.recorder import RunRecorder

#: rounds in a row without enough training nodes after which the run stops
MAX_STARVED_ROUNDS = 3


class _TrainingNodes:
    """A view of the Grid whose connected nodes are the training nodes found for this round:
    the wrapped strategy samples among them, and never waits (the waiting was done, bounded)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

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
        self.roles = NodeRoles(cfg, recorder, timeout)
        theta = next(iter(optimizer.params.values()))
        self.spec = UpdateSpec(
            shapes={k: tuple(v.shape) for k, v in optimizer.params.items()},
            dtype=np.dtype(str(theta.dtype).removeprefix("torch.")),
            max_examples=cfg.max_query_examples,
        )
        self.bound = NormBound(cfg.max_update_norm)
        self._zero = to_record({k: torch.zeros_like(v) for k, v in optimizer.params.items()})
        self._eval_nodes: dict[str, list[int]] = {}
        self._rng = random.Random(cfg.seed)
        self.log = RoundLog(recorder, self.roles, timeout)
        self._starved = 0

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
        nodes = self.roles.wait_for_training(grid, meta_round, self.cfg.min_train_nodes)
        if len(nodes) < self.cfg.min_train_nodes:
            self._starve(meta_round, len(nodes))
            self.log.asked["train"] = []
            return []
        self._starved = 0
        round_config = ConfigRecord({**dict(config), keys.META_ROUND: meta_round})
        messages = list(
            self.aggregator.configure_train(
                server_round,
                self._zero,
                round_config,
                _TrainingNodes(grid, nodes),  # type: ignore[arg-type]
            )
        )
        for message in messages:
            message.content[keys.ARRAYS] = arrays
        self.log.asked["train"] = [m.metadata.dst_node_id for m in messages]
        self.recorder.round_values(meta_round, sampled=len(messages))
        return messages

    def _starve(self, meta_round: int, available: int) -> None:
        """Not enough training nodes for a round: skip it, or stop the run when that goes on."""
        self._starved += 1
        reason = (
            f"{available} training node(s) connected after waiting round-timeout="
            f"{self.cfg.round_timeout:g} s, fewer than min-train-nodes={self.cfg.min_train_nodes}"
        )
        if self._starved >= MAX_STARVED_ROUNDS or (available == 0 and self.roles.broken):
            raise FedmamlError(
                f"round {meta_round}: {reason}, {self._starved} round(s) in a row "
                f"({len(self.roles.broken)} node(s) broken); start more SuperNodes or lower "
                "min-train-nodes"
            )
        log(WARNING, "fedmaml round %d: %s: round skipped", meta_round, reason)
        self.recorder.round_values(meta_round, sampled=0)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        meta_round = self.meta_round(server_round)
        messages: dict[int, Message] = {}
        updates: dict[int, TrainUpdate] = {}
        problems: dict[int, str] = {}
        for m in replies:
            node = m.metadata.src_node_id
            messages[node] = m
            try:
                updates[node] = train_update(m, self.spec)
            except BadReply as exc:
                problems[node] = str(exc)
        key_sets = Counter(tuple(sorted(u.metrics)) for u in updates.values())
        expected = key_sets.most_common(1)[0][0] if key_sets else ()
        for node, update in list(updates.items()):
            if tuple(sorted(update.metrics)) != expected:
                problems[node] = "metric keys differ from the other clients'"
                del updates[node]
        left_out, clipped = self.bound.apply(updates)
        for node, reason in left_out.items():
            problems[node] = reason
            del updates[node]
        for node, update in updates.items():
            messages[node].content = self._checked_content(update)
            self.log.row(meta_round, "train", node, "ok", **update.metrics, clipped=node in clipped)
        for node, problem in problems.items():
            log(WARNING, "fedmaml round %d: node %d left out: %s", meta_round, node, problem)
            self.log.row(meta_round, "train", node, "failed", reason=problem)
        values: dict[str, Any] = {
            "ok": len(updates),
            "failed": len(problems),
            "no-reply": self.log.silent("train", meta_round, messages),
            "clipped": len(clipped),
        }
        if len(updates) < self.cfg.min_train_nodes:
            log(
                WARNING,
                "fedmaml round %d: %d valid replies, fewer than min-train-nodes=%d: "
                "meta-update skipped",
                meta_round,
                len(updates),
                self.cfg.min_train_nodes,
            )
            self.log.finish_round(meta_round, values | {"updated": False})
            return None, None
        good = [messages[n] for n in updates]
        aggregated, metrics = self.aggregator.aggregate_train(server_round, good)
        if aggregated is None:
            log(WARNING, "fedmaml round %d: aggregation returned nothing: skipped", meta_round)
            self.log.finish_round(meta_round, values | {"updated": False})
            return None, metrics
        grads = {k: -v for k, v in from_record(aggregated).items()}
        try:
            params = self.optimizer.step(grads)
        except FedmamlError as exc:
            log(WARNING, "fedmaml round %d: meta-update skipped: %s", meta_round, exc)
            self.log.finish_round(meta_round, values | {"updated": False})
            return None, metrics
        if metrics is not None:
            values.update(
                {
                    f"train-{k}": v
                    for k, v in dict(metrics).items()
                    if k not in keys.IDENTITY and isinstance(v, int | float)
                }
            )
        self.log.finish_round(meta_round, values | {"updated": True})
        if self.on_update:
            self.on_update(meta_round, params, self.optimizer)
        return to_record(params), metrics

    def _checked_content(self, update: TrainUpdate) -> RecordDict:
        """A reply's content as the aggregation sees it: the checked (cast, maybe clipped)
        update, the metrics, and the weight the server gives it."""
        weight = update.num_examples if self.cfg.aggregation == "weighted" else 1
        metrics = {**update.metrics, keys.NUM_EXAMPLES: update.num_examples, keys.WEIGHT: weight}
        return RecordDict(
            {
                keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in update.arrays.items()}),
                keys.METRICS: MetricRecord(metrics),
            }
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
            self.log.asked["evaluate"] = []
            return []
        meta_round = self.meta_round(server_round)
        self.roles.refresh(grid, meta_round)
        connected = set(grid.get_node_ids())
        nodes = [n for n in self._evaluation_nodes() if n in connected]
        record = RecordDict(
            {
                keys.ARRAYS: arrays,
                keys.CONFIG: ConfigRecord(
                    {
                        **dict(config),
                        keys.SERVER_ROUND: server_round,
                        keys.META_ROUND: meta_round,
                    }
                ),
            }
        )
        self.log.asked["evaluate"] = nodes
        return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]

    def _evaluation_nodes(self) -> list[int]:
        """A fixed, seeded sample of up to eval-clients training and held-out nodes."""
        for role in keys.ROLES:
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
        summary = self.log.per_group(meta_round, "evaluate", replies)
        if not summary:
            return None
        self.recorder.round_values(meta_round, **summary)
        self.recorder.flush()
        return MetricRecord(summary)

    def personalize(
        self, grid: Grid, arrays: ArrayRecord, recipe: dict[str, Any] | None = None
    ) -> dict[str, float]:
        """Send θ (and the personalization recipe's settings, when there is one) to every
        client for on-device personalization (``query.personalize``); each keeps its model and
        replies metrics only. Returns their means per group (seen/unseen)."""
        meta_round = self.meta_round(self.num_rounds)
        self.roles.refresh(grid, meta_round)
        record = RecordDict({keys.ARRAYS: arrays})
        if recipe:
            record[keys.CONFIG] = ConfigRecord(dict(recipe))
        nodes = sorted(self.roles.info)
        messages = [
            Message(record, dst_node_id=n, message_type=keys.PERSONALIZE_TYPE) for n in nodes
        ]
        self.log.asked["personalize"] = nodes
        replies = grid.send_and_receive(messages, timeout=self.roles.timeout)
        summary = self.log.per_group(meta_round, "personalize", replies)
        self.recorder.flush()
        return summary
