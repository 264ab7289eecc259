"""Users: what the server samples, and which node computes which user in a simulation.

A *user* is one client (task) of the run: ``train-i`` (i < num-train-clients) or ``heldout-j``
(j < num-heldout-clients). In a simulation the federation's N simulated nodes hold
``users-per-node`` = U users each: node p holds the population's slots pU..pU+U−1, in the order
train-0..train-(T−1), heldout-0..heldout-(H−1), so the federation holds the first min(T+H, NU)
of them (:class:`Population`). Every simulated node opens the same task source, so any node can
compute any user: the server sends each round's users to the connected nodes round-robin
(:func:`route`), one message per node listing its users (``config["users"]``), and never has to
ask each node who it is. A deployed node serves only its own data, so there a node is its own
(single) user, found by asking it (:mod:`fedmaml.federated.roles`).

The server hands its aggregation strategy one *participant* per user: an integer id
(:meth:`Population.id_of`, slot + 1) under which the strategy samples and aggregates, exactly as
it would nodes. Sampling is seeded (:func:`seeded_sampling`): the users of round t depend only on
(seed, t, population), whatever the number of nodes.

A reply to a message that listed users holds each user's records under ``<record>.<user>``
(:func:`fedmaml.federated.keys.user_record`), the reasons of users that failed in the
ConfigRecord ``user-errors``, and their data identities in ``user-names``;
:func:`user_replies` turns it back into one plain reply per user, which then passes the same
checks as a node's reply (:mod:`fedmaml.federated.replies`). A training reply stacks its users'
updates, one array per parameter with a row per user (``user-arrays``, ``user-rows``), read
once for all its users (:func:`user_rows`); each row is then checked as a node's update is.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from flwr.app import Error, Message, RecordDict

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.replies import BadReply, UpdateSpec, error_reason, stacked_arrays

#: error code of a per-user failure inside a many-users reply (Flower's "ClientApp raised")
USER_ERROR_CODE = 2


@dataclass(frozen=True, order=True)
class User:
    role: str
    index: int

    @property
    def key(self) -> str:
        return f"{self.role}-{self.index}"

    @classmethod
    def parse(cls, key: object) -> User:
        """``train-3`` -> User("train", 3); anything else is one clear error."""
        role, _, index = str(key).rpartition("-")
        if role not in keys.ROLES or not index.isdigit():
            raise FedmamlError(f"{key!r} does not name a user (e.g. train-3 or heldout-0)")
        return cls(role, int(index))


@dataclass(frozen=True)
class Population:
    """The users a simulated federation of ``num_nodes`` nodes × ``users_per_node`` holds."""

    num_train: int
    num_heldout: int
    num_nodes: int
    users_per_node: int

    @classmethod
    def of(cls, cfg: RunConfig, num_nodes: int) -> Population:
        slots = min(cfg.num_train_clients + cfg.num_heldout_clients, num_nodes * cfg.users_per_node)
        train = min(cfg.num_train_clients, slots)
        return cls(
            train, min(cfg.num_heldout_clients, slots - train), num_nodes, cfg.users_per_node
        )

    def count(self, role: str) -> int:
        return self.num_train if role == "train" else self.num_heldout

    def ids(self, role: str) -> list[int]:
        """The participant ids of ``role``'s users, in user order."""
        first = 1 if role == "train" else 1 + self.num_train
        return list(range(first, first + self.count(role)))

    def id_of(self, user: User) -> int:
        return 1 + user.index + (self.num_train if user.role == "heldout" else 0)

    def user_of(self, participant: int) -> User:
        slot = participant - 1
        if 0 <= slot < self.num_train:
            return User("train", slot)
        if 0 <= slot - self.num_train < self.num_heldout:
            return User("heldout", slot - self.num_train)
        raise KeyError(participant)


def route(participants: list[int], nodes: list[int]) -> dict[int, list[int]]:
    """The participants each node computes: sorted participants dealt round-robin over the
    sorted nodes (at most ⌈len(participants) / len(nodes)⌉ each)."""
    ordered = sorted(nodes)
    routed: dict[int, list[int]] = {}
    for i, participant in enumerate(sorted(participants)):
        routed.setdefault(ordered[i % len(ordered)], []).append(participant)
    return routed


@contextlib.contextmanager
def seeded_sampling(seed: int, meta_round: int) -> Iterator[None]:
    """Flower's strategies sample with the module-level ``random``; inside this block it is
    seeded by (seed, round), and its state is restored after."""
    state = random.getstate()
    random.seed(f"fedmaml-sampling-{seed}-{meta_round}")
    try:
        yield
    finally:
        random.setstate(state)


def user_replies(
    reply: Message, asked: dict[str, Message], records: tuple[str, ...]
) -> dict[str, Message]:
    """One plain reply per user of a many-users ``reply``: for each user key in ``asked`` (the
    per-user message it answers), a Message replying to it whose content holds that user's
    ``records`` under their plain names, or an error (the whole reply's error, the user's own
    reason, or its missing records). Records of users that were not asked are ignored."""
    out: dict[str, Message] = {}
    if reply.has_error():
        reason = error_reason(reply)
        return {u: _failed(sent, reason) for u, sent in asked.items()}
    content = reply.content
    errors = content.config_records.get(keys.USER_ERRORS, {})
    for user, sent in asked.items():
        if user in errors:
            out[user] = _failed(sent, str(errors[user])[:500])
            continue
        parts = {}
        for record in records:
            name = keys.user_record(record, user)
            if name not in content:
                break
            parts[record] = content[name]
        else:
            out[user] = Message(RecordDict(parts), reply_to=sent)
            continue
        out[user] = _failed(sent, f"the reply holds no {keys.user_record(records[0], user)!r}")
    return out


def user_rows(
    reply: Message, users: list[str], spec: UpdateSpec
) -> dict[str, dict[str, np.ndarray] | BadReply | None]:
    """Each user's row of a many-users training reply's stacked update (``user-arrays``, the
    rows' users in ``user-rows``), read once for all of them (:func:`stacked_arrays`): the
    user's arrays, the reason the stack cannot be read (then every user of the reply fails
    with it), or None when no row is the user's."""
    if reply.has_error() or keys.USER_ARRAYS not in reply.content.array_records:
        return dict.fromkeys(users)
    content = reply.content
    order = content.config_records.get(keys.USER_ROWS, {}).get(keys.USERS, [])
    order = [str(u) for u in order] if isinstance(order, list) else []
    try:
        stack = stacked_arrays(content[keys.USER_ARRAYS], spec, rows=len(order))
    except BadReply as exc:
        return dict.fromkeys(users, exc)
    row = {user: i for i, user in enumerate(order)}
    return {
        u: {name: values[row[u]] for name, values in stack.items()} if u in row else None
        for u in users
    }


def user_names(reply: Message) -> dict[str, str]:
    """The data identities (client ids) a many-users reply gives its users (≤ 200 chars)."""
    if reply.has_error():
        return {}
    names = reply.content.config_records.get(keys.USER_NAMES, {})
    return {str(k): str(v)[:200] for k, v in names.items()}


def _failed(sent: Message, reason: str) -> Message:
    return Message(Error(code=USER_ERROR_CODE, reason=reason), reply_to=sent)
