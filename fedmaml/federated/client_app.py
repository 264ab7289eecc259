"""fedmaml's Flower ClientApp: each client is one task.

* ``query.describe``: the node's role (train / held-out) and client index, so that the server
  trains only on training clients;
* ``train``: receive θ (∪ α), draw this round's episodes from the client's own data, reply the
  *update* Δ = −g (g = mean meta-gradient of the local episodes) with metrics. The server's
  aggregation strategy sees Δ relative to a zero reference, exactly as it sees model updates;
* ``evaluate``: held-out query loss (and accuracy) after 0..eval-steps adaptation steps;
* ``query.personalize``: adapt the final θ on the client's own data, keep the personalized model
  on the device (node config ``personalized-path``), reply metrics only.

Torch and the core are imported inside the handlers: a deployed node starts a new process per
message, and ``describe`` needs neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmaml.federated.records import from_record, run_config, to_record

if TYPE_CHECKING:
    from fedmaml.config import RunConfig
    from fedmaml.federated.node import NodeIdentity
    from fedmaml.tasks.episodes import ClientData
    from fedmaml.workload import Workload

app = ClientApp()


def _node(context: Context) -> tuple[RunConfig, NodeIdentity, ClientData, Workload]:
    """The run config as this node applies it, who the node is, its data and its workload."""
    from fedmaml.federated.node import load_client, node_run_config
    from fedmaml.workload import workload_for

    cfg = node_run_config(context.node_config, run_config(context))
    identity, client = load_client(context.node_config, cfg)
    return cfg, identity, client, workload_for(cfg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: role and client index."""
    from fedmaml.federated.node import load_client

    identity, client = load_client(context.node_config, run_config(context))
    content = ConfigRecord(
        {"role": identity.role, "client-index": identity.index, "num-examples": len(client)}
    )
    return Message(RecordDict({"describe": content}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Δ = −g for this client's episodes of the round, and its query metrics."""
    _, identity, client, work = _node(context)
    params = from_record(msg.content["arrays"])
    meta_round = int(msg.content["config"]["meta-round"])
    grads, metrics = work.client_meta_gradient(params, client, identity.index, meta_round)
    update = {k: -g for k, g in grads.items()}
    reply = MetricRecord(
        {
            "num-examples": int(metrics.pop("num_query")),
            "task-weight": 1,
            "client-index": identity.index,
            **{k.replace("_", "-"): v for k, v in metrics.items()},
        }
    )
    return Message(RecordDict({"arrays": to_record(update), "metrics": reply}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out query metrics after k = 0..eval-steps steps (``loss-k``, ``accuracy-k``)."""
    _, identity, client, work = _node(context)
    curve, num_query = work.evaluation_curve(
        from_record(msg.content["arrays"]), client, identity.index
    )
    values: dict[str, float | int] = {
        "num-examples": num_query,
        "heldout": int(identity.role == "heldout"),
        "client-index": identity.index,
    }
    for k, entry in enumerate(curve):
        values.update({f"{name}-{k}": v for name, v in entry.items()})
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


@app.query("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Personalize θ on this device: adapt on the client's training pool, evaluate on its
    held-out pool, save θ'_K on the device; only the metrics leave it."""
    from fedmaml.federated.node import personalized_path
    from fedmaml.personalize import personalize_client

    cfg, identity, client, work = _node(context)
    metrics = personalize_client(
        from_record(msg.content["arrays"]),
        cfg.model_name,
        client,
        save_to=personalized_path(context.node_config, cfg, identity),
        model_kwargs=work.model_kwargs,
        config=cfg.to_mapping(),
        seed=cfg.seed,
    )
    values = {"heldout": int(identity.role == "heldout"), "client-index": identity.index}
    values.update({k.replace("_", "-"): float(v) for k, v in metrics.items()})
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
