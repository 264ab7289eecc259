"""The ClientApp's side of messages that list users (:mod:`fedmaml.federated.users`): one
message, many users, computed together.

A message whose config holds ``users`` (``["train-3", "train-17", ...]``) asks the node to
compute for each of them. A simulated node (its node config has Flower's ``partition-id``)
serves any user of the run's task source, all of which it can open; a deployed node serves its
own user only. The handlers compute all users at once where the core can
(:meth:`fedmaml.problem.Problem.users_meta_gradients`,
:meth:`~fedmaml.problem.Problem.evaluation_curves`) and reply each user's records separately,
named ``<record>.<user>`` (the training updates stacked, a row per user); a user that fails is
listed with its reason in ``user-errors`` and the others are unaffected. Each user's records
hold exactly what a one-user reply holds, so the server checks each one as it checks a node's
reply.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.client_errors import reason
from fedmaml.federated.records import (
    describe_content,
    evaluation_content,
    from_record,
    run_config,
    to_record,
    train_values,
)
from fedmaml.federated.users import User

if TYPE_CHECKING:
    from fedmaml.tasks.episodes import ClientData

Handler = Callable[[Message, Context], Message]


def listed_users(msg: Message) -> list[User] | None:
    """The users a message asks for, or None for a message to the node's own user."""
    config = msg.content.config_records.get(keys.CONFIG)
    if config is None or keys.USERS not in config:
        return None
    return [User.parse(u) for u in config[keys.USERS]]  # type: ignore[union-attr]


def train(msg: Message, context: Context, users: list[User]) -> Message:
    """Δ_u = −g_u and the query metrics of each listed user, computed in one batch. The users'
    Δ_u travel stacked, one array per parameter with a row per user (``user-arrays``, the rows'
    users in ``user-rows``): one array to encode here and to decode on the server instead of
    one per user and parameter; each user's metrics travel as ``metrics.<user>``, its
    ``compute-s`` being an equal share of the batch's seconds."""
    cfg, work = _work(context)
    clients = _clients(context.node_config, cfg, users)
    params = from_record(msg.content[keys.ARRAYS])
    meta_round = int(msg.content[keys.CONFIG][keys.META_ROUND])
    ready = [u for u in users if not isinstance(clients[u], Exception)]
    started = time.perf_counter()
    results = work.users_meta_gradients(params, [(clients[u], u.index) for u in ready], meta_round)
    share = (time.perf_counter() - started) / max(1, len(ready))
    outcome: dict[User, RecordDict | Exception] = {
        u: clients[u] for u in users if isinstance(clients[u], Exception)
    }
    updates: dict[User, dict[str, Any]] = {}
    for user, result in zip(ready, results, strict=True):
        if isinstance(result, Exception):
            outcome[user] = result
            continue
        grads, metrics = result
        metrics[keys.COMPUTE_S] = share
        updates[user], values = train_values(cfg, grads, metrics)
        outcome[user] = RecordDict({keys.METRICS: values})
    reply = _reply(msg, users, outcome, clients)
    if updates:
        rows = list(updates.values())
        reply.content[keys.USER_ARRAYS] = to_record(
            {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        )
        reply.content[keys.USER_ROWS] = ConfigRecord({keys.USERS: [u.key for u in updates]})
    return reply


def evaluate(msg: Message, context: Context, users: list[User]) -> Message:
    """Each listed user's held-out metrics after k = 0..eval-steps steps, in one batch."""
    cfg, work = _work(context)
    clients = _clients(context.node_config, cfg, users)
    params = from_record(msg.content[keys.ARRAYS])
    ready = [u for u in users if not isinstance(clients[u], Exception)]
    results = work.evaluation_curves(params, [(clients[u], u.index) for u in ready])
    outcome: dict[User, RecordDict | Exception] = {
        u: clients[u] for u in users if isinstance(clients[u], Exception)
    }
    for user, result in zip(ready, results, strict=True):
        if isinstance(result, Exception):
            outcome[user] = result
            continue
        outcome[user] = evaluation_content(*result)
    return _reply(msg, users, outcome, clients)


def personalize(msg: Message, context: Context, users: list[User]) -> Message:
    """Personalize θ for each listed user (one at a time); each model stays on this node."""
    from fedmaml.federated.node import NodeIdentity
    from fedmaml.federated.node_personalize import personalize_content

    cfg, work = _work(context)
    clients = _clients(context.node_config, cfg, users)
    outcome: dict[User, RecordDict | Exception] = {}
    for user in users:
        client = clients[user]
        if isinstance(client, Exception):
            outcome[user] = client
            continue
        who = NodeIdentity(user.role, user.index)
        try:
            outcome[user] = personalize_content(msg, context.node_config, cfg, work, client, who)
        except FedmamlError as exc:
            outcome[user] = exc
    return _reply(msg, users, outcome, clients)


def describe(msg: Message, context: Context, users: list[User]) -> Message:
    """Who each listed user is (role, index, data identity, examples), as this node serves it,
    and the simulated federation's size."""
    clients = _clients(context.node_config, run_config(context), users)
    partitions = int(context.node_config.get(keys.NUM_PARTITIONS, 0))
    outcome: dict[User, RecordDict | Exception] = {
        user: client
        if isinstance(client, Exception)
        else describe_content(user.role, user.index, client, partitions)
        for user, client in clients.items()
    }
    return _reply(msg, users, outcome, clients)


HANDLERS: dict[str, Callable[[Message, Context, list[User]], Message]] = {
    "train": train,
    "evaluate": evaluate,
    keys.PERSONALIZE_TYPE: personalize,
    keys.DESCRIBE_TYPE: describe,
}


def serves_users(handler: Handler) -> Handler:
    """A ClientApp handler that answers messages listing users with this module's handler of
    the same message type, and every other message itself."""

    @functools.wraps(handler)
    def serve(msg: Message, context: Context) -> Message:
        users = listed_users(msg)
        if users is None:
            return handler(msg, context)
        return HANDLERS[msg.metadata.message_type](msg, context, users)

    return serve


def _work(context: Context) -> tuple[RunConfig, Any]:
    from fedmaml.federated.node import node_run_config
    from fedmaml.problem import problem_for

    cfg = node_run_config(context.node_config, run_config(context))
    return cfg, problem_for(cfg)


def _clients(
    node_config: Mapping[str, Any], cfg: RunConfig, users: list[User]
) -> dict[User, ClientData | Exception]:
    """Each listed user's data, or why this node cannot serve it."""
    from fedmaml.federated.node import identify, load_client, user_data

    simulated = "partition-id" in node_config
    own = None if simulated else identify(node_config, cfg)
    out: dict[User, ClientData | Exception] = {}
    for user in users:
        try:
            if simulated:
                out[user] = user_data(cfg, user.role, user.index)
            elif (own.role, own.index) == (user.role, user.index):  # type: ignore[union-attr]
                out[user] = load_client(node_config, cfg)[1]
            else:
                raise FedmamlError(
                    f"this node serves its own data only ({own.role}-{own.index}), "  # type: ignore[union-attr]
                    f"not user {user.key}"
                )
        except FedmamlError as exc:
            out[user] = exc
    return out


def _reply(
    msg: Message,
    users: list[User],
    outcome: Mapping[User, RecordDict | Exception],
    clients: Mapping[User, ClientData | Exception],
) -> Message:
    """One reply: each user's records as ``<record>.<user>``, failures in ``user-errors`` (one
    line each), data identities in ``user-names``."""
    content = RecordDict()
    errors: dict[str, str] = {}
    for user in users:
        result = outcome[user]
        if isinstance(result, Exception):
            errors[user.key] = reason(result)
            continue
        for name, record in result.items():
            content[keys.user_record(name, user.key)] = record
    content[keys.USER_ERRORS] = ConfigRecord(errors)  # type: ignore[arg-type]
    content[keys.USER_NAMES] = ConfigRecord(
        {u.key: c.client_id for u, c in clients.items() if not isinstance(c, Exception)}
    )
    return Message(content, reply_to=msg)
