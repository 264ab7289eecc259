"""Open the data source a run's configuration names."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import EpisodeSpec
from fedmaml.tasks.femnist import FemnistSource
from fedmaml.tasks.local import LocalSource
from fedmaml.tasks.omniglot import OmniglotSource
from fedmaml.tasks.protocol import SupportQuerySource
from fedmaml.tasks.sine import SineFamily
from fedmaml.tasks.source import TaskSource
from fedmaml.tasks.tables import RowPartition, TableSource

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
}


def open_source(cfg: RunConfig) -> TaskSource:
    """The clients of ``cfg.task`` (train, validation and held-out) from ``cfg.data_path``:
    Omniglot alphabets, FEMNIST writers or a table's users; clients too small for the episodes
    ``episode_spec(cfg)`` asks for are skipped (logged) before the counts are checked. With
    ``support-fraction`` every client is split into its support and query sets
    (:mod:`fedmaml.tasks.protocol`). Task ``local`` has no clients here: each deployed node
    reads its own data (:mod:`fedmaml.tasks.local`)."""
    source = _open(cfg)
    if cfg.support_fraction > 0 and cfg.task != "local":
        return SupportQuerySource(source, cfg.support_fraction, cfg.seed)
    return source


def _open(cfg: RunConfig) -> TaskSource:
    if cfg.task == "sine":
        return SineFamily(
            seed=cfg.seed,
            num_train=cfg.num_train_clients,
            num_heldout=cfg.num_heldout_clients,
            num_val=cfg.num_val_clients,
        )
    if cfg.task == "omniglot":
        return OmniglotSource(
            cfg.data_path,
            seed=cfg.seed,
            num_train_clients=cfg.num_train_clients,
            num_heldout_clients=cfg.num_heldout_clients,
            num_val_clients=cfg.num_val_clients,
            spec=episode_spec(cfg),
            cache_dir=cfg.cache_dir or None,
        )
    if cfg.task == "femnist":
        return FemnistSource.from_path(
            cfg.data_path,
            seed=cfg.seed,
            num_train_clients=cfg.num_train_clients,
            num_heldout_clients=cfg.num_heldout_clients,
            num_val_clients=cfg.num_val_clients,
            spec=episode_spec(cfg),
        )
    if cfg.task == "table":
        return TableSource(
            cfg.data_path,
            label_column=cfg.label_column,
            user_column=cfg.user_column,
            feature_columns=cfg.feature_column_list,
            seed=cfg.seed,
            num_heldout_clients=cfg.num_heldout_clients,
            num_train_clients=cfg.num_train_clients,
            num_val_clients=cfg.num_val_clients,
            spec=episode_spec(cfg),
            partition=RowPartition(
                scheme=cfg.partition,
                alpha=cfg.partition_alpha,
                classes_per_partition=cfg.partition_classes,
            ),
        )
    if cfg.task == "local":
        return LocalSource(cfg.model_name, cfg.input_dims, cfg.num_classes, cfg.ways)
    raise FedmamlError(
        f"task {cfg.task!r} has no data source; use sine, omniglot, femnist, table or local"
    )


def loss_function(source: TaskSource) -> Callable[[Tensor, Tensor], Tensor]:
    return LOSSES[source.loss]


def episode_spec(cfg: RunConfig) -> EpisodeSpec:
    return EpisodeSpec(
        support=cfg.support_size,
        query=cfg.query_size,
        ways=cfg.ways or None,
        fraction=cfg.support_fraction or None,
    )
