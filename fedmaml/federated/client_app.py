"""fedmaml's Flower ClientApp: each client is one task.

* ``query.describe``: the node's role (train / held-out), client index and data identity, so
  that the server trains only on training clients;
* ``train``: receive θ (∪ α), draw this round's episodes from the client's own data, reply the
  *update* Δ = −g (g = mean meta-gradient of the local episodes) with metrics, Δ clipped to the
  norm bound C on the device when the run has one (``dp-clip``; under secure aggregation also
  ``max-update-norm``). The server's aggregation strategy sees Δ relative to a zero reference,
  exactly as it sees model updates; under ``secure-aggregation`` the
  :mod:`~fedmaml.federated.secagg_client` mod masks the reply, and the server sees only a sum;
* ``evaluate``: held-out query loss (and accuracy) after 0..eval-steps adaptation steps;
* ``query.personalize``: adapt the final θ on the client's own data with the run's
  personalization recipe when the server sends one, keep the personalized model on the device
  (node config ``personalized-path``), reply metrics only.

A message that lists users (a simulation, many users per node) is answered for each of them
by :mod:`fedmaml.federated.many_users`. A failing handler replies one plain line
(:mod:`fedmaml.federated.client_errors`). Torch and the
core are imported inside the handlers: a deployed node starts a new process per message, and
``describe`` needs neither.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmaml.federated import keys
from fedmaml.federated.app_logging import through_flower
from fedmaml.federated.client_errors import one_line_errors
from fedmaml.federated.many_users import serves_users
from fedmaml.federated.records import (
    describe_content,
    evaluation_content,
    from_record,
    run_config,
    train_content,
)
from fedmaml.federated.secagg_client import secure_aggregation_mod

if TYPE_CHECKING:
    from fedmaml.config import RunConfig
    from fedmaml.federated.node import NodeIdentity
    from fedmaml.problem import Problem
    from fedmaml.tasks.episodes import ClientData

app = ClientApp(mods=[one_line_errors, secure_aggregation_mod])
through_flower()


def _node(context: Context) -> tuple[RunConfig, NodeIdentity, ClientData, Problem]:
    """The run config as this node applies it, who the node is, its data and its workload."""
    from fedmaml.federated.node import load_client, node_run_config
    from fedmaml.problem import problem_for

    cfg = node_run_config(context.node_config, run_config(context))
    identity, client = load_client(context.node_config, cfg)
    return cfg, identity, client, problem_for(cfg)


@app.query("describe")
@serves_users
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: role, client index, the data's identity and size, and (simulation) the
    federation's size."""
    from fedmaml.federated.node import load_client

    identity, client = load_client(context.node_config, run_config(context))
    partitions = int(context.node_config.get(keys.NUM_PARTITIONS, 0))
    content = describe_content(identity.role, identity.index, client, partitions)
    return Message(content, reply_to=msg)


@app.train()
@serves_users
def train(msg: Message, context: Context) -> Message:
    """Δ = −g for this client's episodes of the round (clipped to the run's norm bound, if
    any), its query metrics, and the seconds g took (``compute-s``)."""
    cfg, identity, client, work = _node(context)
    params = from_record(msg.content[keys.ARRAYS])
    meta_round = int(msg.content[keys.CONFIG][keys.META_ROUND])
    started = time.perf_counter()
    grads, metrics = work.client_meta_gradient(params, client, identity.index, meta_round)
    metrics[keys.COMPUTE_S] = time.perf_counter() - started
    return Message(train_content(cfg, grads, metrics), reply_to=msg)


@app.evaluate()
@serves_users
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out query metrics after k = 0..eval-steps steps (``loss-k``, ``accuracy-k``)."""
    _, identity, client, work = _node(context)
    curve, num_query = work.evaluation_curve(
        from_record(msg.content[keys.ARRAYS]), client, identity.index
    )
    return Message(evaluation_content(curve, num_query), reply_to=msg)


@app.query("personalize")
@serves_users
def personalize(msg: Message, context: Context) -> Message:
    """Personalize θ on this device: adapt on the client's training pool, evaluate on its
    held-out pool, save θ'_K on the device; only the metrics leave it."""
    from fedmaml.federated.node_personalize import personalize_content

    cfg, identity, client, work = _node(context)
    content = personalize_content(msg, context.node_config, cfg, work, client, identity)
    return Message(content, reply_to=msg)
