"""Which client a node is, and its data.

In simulation a node's ``partition-id`` p names its client: p < num-train-clients is training
client p, the next num-heldout-clients partitions are held-out (unseen) clients. A deployed
SuperNode says the same with ``--node-config "role='train' client-index=3"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.tasks.episodes import ClientData

ROLES = ("train", "heldout")


@dataclass(frozen=True)
class NodeIdentity:
    role: str
    index: int


def identify(node_config: Mapping[str, Any], cfg: RunConfig) -> NodeIdentity:
    """The node's role and client index, from its node config."""
    if "partition-id" in node_config:
        p = int(node_config["partition-id"])
        if p < cfg.num_train_clients:
            return NodeIdentity("train", p)
        if p < cfg.num_train_clients + cfg.num_heldout_clients:
            return NodeIdentity("heldout", p - cfg.num_train_clients)
        raise FedmamlError(
            f"partition {p} is beyond num-train-clients + num-heldout-clients "
            f"({cfg.num_train_clients} + {cfg.num_heldout_clients}); run with that many "
            "supernodes"
        )
    role = str(node_config.get("role", "train"))
    if role not in ROLES:
        raise FedmamlError(f"node config role={role!r}; use role='train' or role='heldout'")
    return NodeIdentity(role, int(node_config.get("client-index", 0)))


def load_client(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[NodeIdentity, ClientData]:
    """This node's identity and data (cached per process: a simulation actor keeps it)."""
    return _load(tuple(sorted(node_config.items())), cfg)


@lru_cache(maxsize=8)
def _load(items: tuple[tuple[str, Any], ...], cfg: RunConfig) -> tuple[NodeIdentity, ClientData]:
    from fedmaml.tasks.registry import open_source

    node_config = dict(items)
    identity = identify(node_config, cfg)
    return identity, open_source(cfg).client(identity.index, identity.role)
