"""What a round leaves in the run directory and the log: one ``clients.csv`` row per node that
was asked (its reply's metrics, its failure, or its silence, beside the client's identity), and
the round's line in ``rounds.csv``.

:class:`RoundLog` remembers which participants (nodes, or a simulation's users) each phase
(train, evaluate, personalize) asked and which node computed each, so that one that never
answered is recorded by name rather than forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log

from fedmaml.federated import keys
from fedmaml.federated.replies import BadReply, evaluation_metrics
from fedmaml.federated.roles import NodeRoles
from fedmaml.federated.round_timing import RoundTiming
from fedmaml.rundir.recorder import RunRecorder


class RoundLog:
    def __init__(self, recorder: RunRecorder, roles: NodeRoles, round_timeout: float) -> None:
        self.recorder = recorder
        self.roles = roles
        self.round_timeout = round_timeout
        self.asked: dict[str, list[int]] = {}
        #: per phase, the node that computes each participant (absent: the participant itself)
        self.routed: dict[str, dict[int, int]] = {}
        self.timing = RoundTiming()

    def row(self, meta_round: int, phase: str, node: int, status: str, **values: Any) -> None:
        """One participant's row in ``clients.csv``: round, phase, the node that computed it,
        the client, status."""
        self.recorder.client_row(
            round=meta_round,
            phase=phase,
            node_id=self.routed.get(phase, {}).get(node, node),
            **self.roles.identity(node),
            status=status,
            **values,
        )

    def silent(self, phase: str, meta_round: int, replied: Iterable[int]) -> int:
        """A row for every node asked in ``phase`` that did not answer in time; their number."""
        missing = sorted(set(self.asked.get(phase, [])) - set(replied))
        for node in missing:
            reason = f"no reply within round-timeout={self.round_timeout:g} s (node lost?)"
            log(WARNING, "fedmaml round %d: node %d: %s", meta_round, node, reason)
            self.row(meta_round, phase, node, "no-reply", reason=reason)
        return len(missing)

    def finish_round(self, meta_round: int, values: dict[str, Any]) -> None:
        """The round's line in ``rounds.csv`` (tables flushed), with where its time went
        (:class:`~fedmaml.federated.round_timing.RoundTiming`), and in the log."""
        self.recorder.round_values(
            meta_round,
            elapsed_s=round(self.recorder.elapsed(), 3),
            **values,
            **self.timing.values(),
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

    def per_group(
        self, meta_round: int, phase: str, replies: Iterable[Message]
    ) -> dict[str, float]:
        """Record every reply (or failure, or silence) of an evaluation-like phase; the mean of
        each metric over the seen (training) and unseen (held-out) clients that replied, by the
        role the server knows for the node (never the node's own word)."""
        groups: dict[str, list[dict[str, float]]] = {"seen": [], "unseen": []}
        replied = []
        for m in replies:
            node = m.metadata.src_node_id
            replied.append(node)
            try:
                metrics = evaluation_metrics(m)
            except BadReply as exc:
                log(WARNING, "fedmaml round %d: %s on node %d: %s", meta_round, phase, node, exc)
                self.row(meta_round, phase, node, "failed", reason=str(exc))
                continue
            heldout = self.roles.role(node) == "heldout"
            metrics[keys.HELDOUT] = int(heldout)
            self.row(meta_round, phase, node, "ok", **metrics)
            groups["unseen" if heldout else "seen"].append(metrics)
        self.silent(phase, meta_round, replied)
        names = {k for rows in groups.values() for row in rows for k in row} - set(keys.IDENTITY)
        return {
            f"{group}-{name}": float(np.mean([r[name] for r in rows if name in r]))
            for group, rows in groups.items()
            for name in sorted(names)
            if any(name in r for r in rows)
        }
