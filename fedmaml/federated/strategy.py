"""The meta-optimizer wrapped around a Flower aggregation strategy.

Round t, with θ the global meta-parameters:

1. ``configure_train``: once enough training nodes are connected (a wait bounded by
   ``round-timeout``), the wrapped strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, optionally
   inside Flower's central-DP wrapper) samples training *participants* (deployed nodes, or in a
   simulation the federation's training users: :mod:`fedmaml.federated.users`), with Flower's
   sampling seeded by (seed, round), and builds one message per participant around a *zero*
   reference; each message then carries θ to its client. In a simulation the messages go out
   as one message per node listing its users (:mod:`fedmaml.federated.dispatch`).
2. Clients reply Δ_i = −g_i (their meta-gradient, as an update relative to zero).
3. ``aggregate_train``: every reply (a simulated node's reply split into one per user) passes
   its own checks (:mod:`fedmaml.federated.replies`:
   keys, shapes, dtype, finiteness after the cast to θ's dtype, example counts, the update-norm
   bound, which is ``dp-clip`` when set); the server writes each reply's aggregation weight
   itself. The wrapped strategy aggregates the good replies exactly as it aggregates model
   updates ("reply − sent" = Δ_i: robust statistics apply unchanged) into Δ̄; with ``dp-noise``
   the server adds N(0, (σC/n)²) to Δ̄ and accounts the release (:mod:`privacy`); then the
   meta-optimizer steps with ḡ = −Δ̄: SGD θ ← θ − β ḡ, or Adam (state kept across rounds). A
   step that would leave θ or Adam's state non-finite is undone.

Under ``secure-aggregation``, steps 2–3 are the SecAgg+ protocol (:mod:`secagg_server`), run in
``configure_train`` with the sampled nodes: the server never sees a reply's Δ_i, only ΣΔ_i and
the number n of clients in it; the per-reply checks run on each device before masking and on
the sum after unmasking, and Δ̄ = ΣΔ_i / n (uniform weights) goes on as above.

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
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.arrays import from_array, to_array
from fedmaml.federated.dispatch import Dispatch
from fedmaml.federated.privacy import PrivacyAccount, add_noise
from fedmaml.federated.records import to_record
from fedmaml.federated.replies import (
    BadReply,
    NormBound,
    TrainUpdate,
    UpdateSpec,
)
from fedmaml.federated.roles import NodeRoles
from fedmaml.federated.round_log import RoundLog
from fedmaml.federated.secagg_server import SecureAggregation, SecureRoundFailed, SecureSum
from fedmaml.federated.users import seeded_sampling
from fedmaml.meta.outer import MetaOptimizer
from fedmaml.meta.params import Params
from fedmaml.rundir.recorder import RunRecorder

#: rounds in a row without enough training nodes after which the run stops
MAX_STARVED_ROUNDS = 3


class _TrainingNodes:
    """A view of the Grid whose connected nodes are the training participants found for this
    round: the wrapped strategy samples among them, and never waits (the waiting was done,
    bounded)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def metrics_content(values: dict[str, float | int]) -> RecordDict:
    """A reply's content as an aggregation strategy reads its metrics (the checked arrays are
    added by :meth:`MetaStrategy._aggregate` when the strategy needs them in the reply)."""
    return RecordDict({keys.METRICS: MetricRecord(values)})


def weighted_metrics(rows: list[dict[str, float | int]], by: str) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` (FedAvg's default ``train_metrics_aggr_fn``) on plain
    dicts: m̄_k = Σ_i (w_i / Σ_j w_j) m_ik over the rows in turn, w_i = row[by], every key but
    ``by`` in each row's order; the same arithmetic in the same order, so the same floats
    (tests/test_many_users.py), without a MetricRecord per row and a checked write per value."""
    total = sum(row[by] for row in rows)
    out: dict[str, float | int] = {}
    for row in rows:
        factor = row[by] / total
        for key, value in row.items():
            if key == by:
                continue
            out[key] = out[key] + value * factor if key in out else value * factor
    return MetricRecord(out)


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
        account: PrivacyAccount | None = None,
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
        self.bound = NormBound(cfg.clip_norm or cfg.max_update_norm)
        self.account = account
        self.secure = (
            SecureAggregation(cfg, self.spec.shapes, timeout) if cfg.secure_aggregation else None
        )
        self._secure_sum: SecureSum | SecureRoundFailed | None = None
        self._sample = (0, 0)
        self._zero = to_record({k: torch.zeros_like(v) for k, v in optimizer.params.items()})
        self._eval_nodes: dict[str, list[int]] = {}
        self._rng = random.Random(cfg.seed)
        self.log = RoundLog(recorder, self.roles, timeout)
        self.dispatch = Dispatch(self.roles, self.log)
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
        self.log.timing.start(grid)
        meta_round = self.meta_round(server_round)
        nodes = self.roles.wait_for_training(grid, meta_round, self.cfg.min_train_nodes)
        if len(nodes) < self.cfg.min_train_nodes:
            self._starve(meta_round, len(nodes))
            self.log.asked["train"] = []
            return []
        self._starved = 0
        round_config = ConfigRecord({**dict(config), keys.META_ROUND: meta_round})
        with seeded_sampling(self.cfg.seed, meta_round):
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
        self._sample = (len(messages), len(nodes))
        if self.account is not None:
            self.account.check_budget(meta_round, *self._sample)
        self.recorder.round_values(meta_round, sampled=len(messages))
        out = self.dispatch.out("train", messages, grid.get_node_ids())
        self.log.timing.configured()
        if self.secure is not None:  # secure aggregation: one user per node, out == messages
            self._secure_sum = self._secure_round(grid, out, meta_round)
            return []
        return out

    def _secure_round(
        self, grid: Grid, messages: list[Message], meta_round: int
    ) -> SecureSum | SecureRoundFailed:
        """The SecAgg+ protocol with the sampled nodes: their sum, or why there is none."""
        try:
            return self.secure.run(grid, messages, meta_round)  # type: ignore[union-attr]
        except SecureRoundFailed as exc:
            return exc

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
        self.log.timing.replied()
        if self.secure is not None:
            return self._aggregate_secure(meta_round), None
        messages: dict[int, Message] = {}
        updates: dict[int, TrainUpdate] = {}
        problems: dict[int, str] = {}
        for m, outcome in self.dispatch.train_updates(replies, self.spec):
            node = m.metadata.src_node_id
            messages[node] = m
            if isinstance(outcome, BadReply):
                problems[node] = str(outcome)
            else:
                updates[node] = outcome
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
        mean, metrics = self._aggregate(server_round, messages, updates)
        if mean is None:
            log(WARNING, "fedmaml round %d: aggregation returned nothing: skipped", meta_round)
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
        return self._update(meta_round, mean, len(updates), values), metrics

    def _aggregate(
        self, server_round: int, messages: dict[int, Message], updates: dict[int, TrainUpdate]
    ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None]:
        """Δ̄ and the mean metrics of the checked updates, as the wrapped strategy aggregates
        them: each update goes back into its reply (cast, maybe clipped, with the server's
        weight) for the strategy's ``aggregate_train``.

        Flower's plain ``FedAvg`` (that class exactly: not a subclass or a wrapper) is computed
        here instead, on the arrays already decoded and checked, with FedAvg's own arithmetic
        and order, Δ̄ = Σ_i (w_i / Σ_j w_j) Δ_i accumulated over the replies in turn
        (bit-identical: tests/test_many_users.py), and its metrics by FedAvg's own
        ``train_metrics_aggr_fn``, Flower's default one computed here the same way
        (:func:`weighted_metrics`). That spares serializing every update into a reply only for
        FedAvg to deserialize it again: most of the server's time per user with many users.
        """
        if type(self.aggregator) is not FedAvg:
            for node, update in updates.items():
                content = metrics_content(self._aggregation_values(update))
                content[keys.ARRAYS] = ArrayRecord(
                    {k: to_array(v) for k, v in update.arrays.items()}
                )
                messages[node].content = content
            aggregated, metrics = self.aggregator.aggregate_train(
                server_round, [messages[n] for n in updates]
            )
            if aggregated is None:
                return None, metrics
            return {k: from_array(v) for k, v in aggregated.items()}, metrics
        by = self.aggregator.weighted_by_key
        rows = [self._aggregation_values(u) for u in updates.values()]
        total = sum(row[by] for row in rows)
        mean: dict[str, np.ndarray] = {}
        for update, row in zip(updates.values(), rows, strict=True):
            factor = row[by] / total
            for name, value in update.arrays.items():
                if name in mean:
                    mean[name] += value * factor
                else:
                    mean[name] = value * factor
        if self.aggregator.train_metrics_aggr_fn is aggregate_metricrecords:
            return mean, weighted_metrics(rows, by)
        records = [metrics_content(row) for row in rows]
        return mean, self.aggregator.train_metrics_aggr_fn(records, by)

    def _aggregate_secure(self, meta_round: int) -> ArrayRecord | None:
        """The round's SecAgg+ outcome: every sampled node's row, then θ's update from the
        unmasked sum (uniform weights: Δ̄ = ΣΔ_i / n)."""
        result, self._secure_sum = self._secure_sum, None
        outcome = dict(result.outcome) if result is not None else {}
        for node in self.log.asked.get("train", []):
            if not isinstance(result, SecureSum) and outcome.get(node, ("ok",))[0] == "ok":
                outcome[node] = ("failed", f"round abandoned: {result}")
            status, reason = outcome.get(node, ("failed", "not in the round's protocol"))
            if status != "ok":
                log(WARNING, "fedmaml round %d: node %d left out: %s", meta_round, node, reason)
            self.log.row(meta_round, "train", node, status, reason=reason, masked=True)
        statuses = [s for s, _ in outcome.values()]
        values: dict[str, Any] = {
            "ok": statuses.count("ok"),
            "failed": statuses.count("failed"),
            "no-reply": statuses.count("no-reply"),
        }
        if not isinstance(result, SecureSum) or result.count < self.cfg.min_train_nodes:
            why = (
                f"{result.count} clients in the sum, fewer than min-train-nodes="
                f"{self.cfg.min_train_nodes}"
                if isinstance(result, SecureSum)
                else str(result or "no training node was sampled")
            )
            log(WARNING, "fedmaml round %d: secure aggregation: %s: skipped", meta_round, why)
            self.log.finish_round(meta_round, values | {"updated": False})
            return None
        n = result.count
        values.update({f"train-{k}": v / n for k, v in result.metrics.items()})
        mean = {k: (v / n).astype(self.spec.dtype) for k, v in result.sums.items()}
        return self._update(meta_round, mean, n, values)

    def _update(
        self, meta_round: int, mean: dict[str, np.ndarray], n: int, values: dict[str, Any]
    ) -> ArrayRecord | None:
        """θ's meta-update from Δ̄, the mean of n updates: DP noise and its accounting when the
        run has them, the optimizer's step, the round's line, the checkpoint."""
        if self.cfg.dp_noise > 0:
            values["dp-noise-std"] = add_noise(mean, n, self.cfg)
            if self.account is not None:
                values["epsilon"] = self.account.compose(*self._sample)
                self.recorder.facts["privacy"] = self.account.summary()
        grads = {k: -torch.from_numpy(np.ascontiguousarray(v)) for k, v in mean.items()}
        try:
            params = self.optimizer.step(grads)
        except FedmamlError as exc:
            log(WARNING, "fedmaml round %d: meta-update skipped: %s", meta_round, exc)
            self.log.finish_round(meta_round, values | {"updated": False})
            return None
        self.log.finish_round(meta_round, values | {"updated": True})
        if self.on_update:
            self.on_update(meta_round, params, self.optimizer)
        return to_record(params)

    def _aggregation_values(self, update: TrainUpdate) -> dict[str, float | int]:
        """A reply's metrics as the aggregation sees them, with the weight the server gives
        the update."""
        weight = update.num_examples if self.cfg.aggregation == "weighted" else 1
        return {**update.metrics, keys.NUM_EXAMPLES: update.num_examples, keys.WEIGHT: weight}

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
        available = {n for role in keys.ROLES for n in self.roles.participants(role, grid)}
        nodes = [n for n in self._evaluation_nodes() if n in available]
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
        messages = [
            Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes
        ]
        return self.dispatch.out("evaluate", messages, grid.get_node_ids())

    def _evaluation_nodes(self) -> list[int]:
        """A fixed, seeded sample of up to eval-clients training and held-out nodes."""
        for role in keys.ROLES:
            if not self._eval_nodes.get(role):
                nodes = self.roles.participants(role)
                self._eval_nodes[role] = sorted(
                    self._rng.sample(nodes, min(self.cfg.eval_clients, len(nodes)))
                )
        return self._eval_nodes["train"] + self._eval_nodes["heldout"]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        meta_round = self.meta_round(server_round)
        replies = self.dispatch.back("evaluate", replies, (keys.METRICS,))
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
            record[keys.RECIPE] = ConfigRecord(dict(recipe))
        nodes = sorted(self.roles.participants("train") + self.roles.participants("heldout"))
        messages = [
            Message(record, dst_node_id=n, message_type=keys.PERSONALIZE_TYPE) for n in nodes
        ]
        replies = grid.send_and_receive(
            self.dispatch.out("personalize", messages, grid.get_node_ids()),
            timeout=self.roles.timeout,
        )
        replies = self.dispatch.back("personalize", replies, (keys.METRICS,))
        summary = self.log.per_group(meta_round, "personalize", replies)
        self.recorder.flush()
        return summary
