"""Conversions between fedmaml's objects and Flower records, and the records a client's
training and evaluation replies hold (one node's or each of many users')."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmaml.config import RunConfig
from fedmaml.federated import keys
from fedmaml.federated.arrays import from_array, to_array

if TYPE_CHECKING:
    from fedmaml.tasks.episodes import ClientData


def to_record(params: Mapping[str, Any]) -> ArrayRecord:
    """``{name: tensor}`` as an ArrayRecord (CPU copies, order kept), the bytes Flower's
    ``ArrayRecord(state_dict)`` holds (:func:`fedmaml.federated.arrays.to_array`)."""
    return ArrayRecord({k: to_array(v.detach().cpu().numpy()) for k, v in params.items()})


def from_record(record: ArrayRecord) -> dict[str, Any]:
    """An ArrayRecord back as ``{name: tensor}``, the tensors Flower's
    ``to_torch_state_dict`` gives (:func:`fedmaml.federated.arrays.from_array`)."""
    import torch

    return {k: torch.from_numpy(from_array(v)) for k, v in record.items()}


def run_config(context: Context) -> RunConfig:
    """The run's validated configuration (parsed once per process and run)."""
    return _parse(tuple(sorted(context.run_config.items())))


@lru_cache(maxsize=4)
def _parse(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_mapping(dict(items))


def sent_recipe(msg: Message) -> dict[str, Any] | None:
    """The personalization recipe a ``query.personalize`` message carries (None: none)."""
    record = msg.content.config_records.get(keys.RECIPE)
    return dict(record) if record is not None else None


def train_values(
    cfg: RunConfig, grads: Mapping[str, Any], metrics: dict[str, Any]
) -> tuple[dict[str, Any], MetricRecord]:
    """What a client's training reply says: Δ = −g, clipped on the device to the run's norm
    bound when there is one (``RunConfig.clip_norm``: ``clipped-on-device`` says whether it was
    scaled), and the query metrics with the query count as ``num-examples``. One node replies
    them as :func:`train_content`; a node of many users stacks its users' Δ
    (:func:`fedmaml.federated.many_users.train`)."""
    from fedmaml.federated.privacy import clip_to_norm

    update = {k: -g for k, g in grads.items()}
    values = {
        keys.NUM_EXAMPLES: int(metrics.pop("num_query")),
        **{keys.metric_key(k): v for k, v in metrics.items()},
    }
    if cfg.clip_norm > 0:
        update, clipped = clip_to_norm(update, cfg.clip_norm)
        values[keys.CLIPPED_ON_DEVICE] = float(clipped)
    return update, MetricRecord(values)


def train_content(cfg: RunConfig, grads: Mapping[str, Any], metrics: dict[str, Any]) -> RecordDict:
    """One node's training reply: :func:`train_values` as an ArrayRecord and a MetricRecord."""
    update, values = train_values(cfg, grads, metrics)
    return RecordDict({keys.ARRAYS: to_record(update), keys.METRICS: values})


def evaluation_content(curve: list[dict[str, float]], num_query: int) -> RecordDict:
    """An evaluation reply: the metrics after k = 0..K steps (``loss-k``, ``accuracy-k``)."""
    values: dict[str, float | int] = {keys.NUM_EXAMPLES: num_query}
    for k, entry in enumerate(curve):
        values.update({f"{name}-{k}": v for name, v in entry.items()})
    return RecordDict({keys.METRICS: MetricRecord(values)})


def describe_content(role: str, index: int, client: ClientData, num_partitions: int) -> RecordDict:
    """A ``query.describe`` reply: who the user is (role, client index), its data's identity
    and size, and (simulation) the federation's size."""
    values = {
        keys.ROLE: role,
        keys.CLIENT_INDEX: index,
        keys.CLIENT_ID: client.client_id,
        keys.NUM_EXAMPLES: len(client),
        keys.NUM_PARTITIONS: num_partitions,
    }
    return RecordDict({keys.DESCRIBE: ConfigRecord(values)})  # type: ignore[arg-type]
