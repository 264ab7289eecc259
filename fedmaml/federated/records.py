"""Conversions between fedmaml's objects and Flower records."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flwr.app import ArrayRecord, Context, Message

from fedmaml.config import RunConfig
from fedmaml.federated import keys


def to_record(params: Mapping[str, Any]) -> ArrayRecord:
    """``{name: tensor}`` as an ArrayRecord (CPU copies, order kept)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in params.items()})


def from_record(record: ArrayRecord) -> dict[str, Any]:
    """An ArrayRecord back as ``{name: tensor}``."""
    return dict(record.to_torch_state_dict())


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
