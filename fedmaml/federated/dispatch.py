"""A phase's messages to the nodes, and its replies back, one per participant.

MetaStrategy and its aggregation strategy think in *participants*: one message to each, one
reply from each (:mod:`fedmaml.federated.users`). A deployed node is its own participant, so its
messages go out as they are. In a simulation the participants are users: :meth:`Dispatch.out`
sends each node one message listing the users it computes (``config["users"]``, dealt by
:meth:`fedmaml.federated.roles.NodeRoles.route`), and :meth:`Dispatch.back` turns each node's
reply into one reply per user (:func:`fedmaml.federated.users.user_replies`), addressed from
that user's participant id, so that every check and aggregation downstream sees users exactly
as it would see nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedmaml.federated import keys
from fedmaml.federated.replies import (
    BadReply,
    TrainUpdate,
    UpdateSpec,
    train_update,
    user_update,
)
from fedmaml.federated.roles import NodeRoles
from fedmaml.federated.round_log import RoundLog
from fedmaml.federated.users import user_names, user_replies, user_rows


class Dispatch:
    def __init__(self, roles: NodeRoles, log: RoundLog) -> None:
        self.roles = roles
        self.log = log
        #: per phase: the message each participant was asked with (what its reply answers)
        self._asked: dict[str, dict[int, Message]] = {}
        #: per phase: the participants each node was asked to compute
        self._nodes: dict[str, dict[int, list[int]]] = {}

    def out(self, phase: str, messages: list[Message], nodes: Iterable[int]) -> list[Message]:
        """The messages to send for ``messages`` (one per participant, addressed to it, all
        with the same content): these same messages for deployed nodes; in a simulation one
        message per connected node (``nodes``) that computes users, listing them."""
        self.log.asked[phase] = [m.metadata.dst_node_id for m in messages]
        self.log.routed[phase] = {}
        self._nodes[phase] = {}
        if self.roles.population is None or not messages:
            return messages
        self._asked[phase] = {m.metadata.dst_node_id: m for m in messages}
        first = messages[0]
        out = []
        for node, participants in self.roles.route(self.log.asked[phase], nodes).items():
            self._nodes[phase][node] = participants
            self.log.routed[phase].update(dict.fromkeys(participants, node))
            users = [self.roles.user(p).key for p in participants]  # type: ignore[union-attr]
            content = RecordDict(dict(first.content.items()))
            config = dict(first.content.config_records.get(keys.CONFIG, {}))
            content[keys.CONFIG] = ConfigRecord({**config, keys.USERS: users})
            out.append(Message(content, dst_node_id=node, message_type=first.metadata.message_type))
        return out

    def back(
        self, phase: str, replies: Iterable[Message], records: tuple[str, ...]
    ) -> list[Message]:
        """One reply per participant: the replies as they are for deployed nodes; in a
        simulation each node's reply split into its users' (``records`` under their plain
        names, or the user's failure). Replies from nodes that were not asked are dropped."""
        if not self._nodes.get(phase):
            return list(replies)
        split = self._split(phase, replies, records)
        return [m for _, per_user in split for m in per_user.values()]

    def train_updates(
        self, replies: Iterable[Message], spec: UpdateSpec
    ) -> list[tuple[Message, TrainUpdate | BadReply]]:
        """One (reply, checked update or why not) per training participant: a deployed node's
        reply checked as it is (:func:`train_update`); in a simulation each user's part of its
        node's reply, its row of the stacked update read once per reply (:func:`user_rows`)
        and checked as a node's update is (:func:`user_update`)."""
        if not self._nodes.get("train"):
            return [(m, _checked(train_update, m, spec)) for m in replies]
        out = []
        for reply, per_user in self._split("train", replies, (keys.METRICS,)):
            rows = user_rows(reply, list(per_user), spec)
            out.extend((m, _checked(user_update, m, rows[u], spec)) for u, m in per_user.items())
        return out

    def _split(
        self, phase: str, replies: Iterable[Message], records: tuple[str, ...]
    ) -> Iterator[tuple[Message, dict[str, Message]]]:
        """Each asked node's reply with its users' plain replies (by user key); the data
        identities the reply gives its users are kept for the tables."""
        nodes, asked = self._nodes[phase], self._asked[phase]
        for reply in replies:
            participants = nodes.get(reply.metadata.src_node_id)
            if participants is None:
                continue
            by_key = {self.roles.user(p).key: p for p in participants}  # type: ignore[union-attr]
            for key, name in user_names(reply).items():
                if key in by_key:
                    self.roles.names[by_key[key]] = name
            yield reply, user_replies(reply, {k: asked[p] for k, p in by_key.items()}, records)


def _checked(check: Callable[..., TrainUpdate], *args: Any) -> TrainUpdate | BadReply:
    try:
        return check(*args)
    except BadReply as exc:
        return exc
