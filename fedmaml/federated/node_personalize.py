"""A node's answer to ``query.personalize`` for one of its users: adapt the final θ on the
user's training pool with the run's recipe (the one the server sent, if any), evaluate it on
the user's held-out pool, keep θ'_K on the node (:func:`fedmaml.federated.node.personalized_path`)
and reply the metrics only. The one-user handler (:mod:`fedmaml.federated.client_app`) and the
many-users handler (:mod:`fedmaml.federated.many_users`) both answer with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Message, MetricRecord, RecordDict

from fedmaml.config import RunConfig
from fedmaml.federated import keys
from fedmaml.federated.node import NodeIdentity, personalized_path
from fedmaml.federated.records import from_record, sent_recipe

if TYPE_CHECKING:
    from fedmaml.problem import Problem
    from fedmaml.tasks.episodes import ClientData


def personalize_content(
    msg: Message,
    node_config: Mapping[str, Any],
    cfg: RunConfig,
    work: Problem,
    client: ClientData,
    who: NodeIdentity,
) -> RecordDict:
    """The reply's records for user ``who`` (its data ``client``): ``metrics`` only."""
    from fedmaml.personalize import personalize_client

    metrics = personalize_client(
        from_record(msg.content[keys.ARRAYS]),
        cfg.model_name,
        client,
        save_to=personalized_path(node_config, cfg, who),
        model_kwargs=work.model_kwargs,
        config=cfg.to_mapping(),
        seed=cfg.seed,
        recipe=sent_recipe(msg),
        inputs=work.inputs.to_dict(),
    )
    values = {keys.metric_key(k): float(v) for k, v in metrics.items()}
    return RecordDict({keys.METRICS: MetricRecord(values)})
