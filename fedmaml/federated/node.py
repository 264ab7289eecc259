"""Which client a node is, and its data.

In simulation a node's ``partition-id`` p names its client: p < num-train-clients is training
client p, the next num-heldout-clients partitions are held-out (unseen) clients. A deployed
SuperNode says the same with ``--node-config "role='train' client-index=3"``.

In a run of task ``local`` a deployed node serves its own data (:mod:`fedmaml.tasks.local`),
named in its node config: ``data-path`` (a file or folder on the device), and optionally
``data-format`` (csv, parquet, npz, leaf, images; inferred from the path), ``label-column`` and
``feature-columns`` (tables; default: the run config's), ``user`` (a LEAF file with several
users), ``heldout-fraction`` (0.2; with the run's ``support-fraction`` the device's examples are
split into support and query sets instead, as every client's are) and ``cache-dir`` (where
decoded data is kept between messages; default ``$XDG_CACHE_HOME/fedmaml/local-data``, "" for
none). ``device`` (auto, cpu, cuda, cuda:N) overrides the run config's device on that node
(:func:`node_run_config`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.tasks.episodes import ClientData

HELDOUT_FRACTION = 0.2


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
    if role not in keys.ROLES:
        raise FedmamlError(f"node config role={role!r}; use role='train' or role='heldout'")
    index = node_config.get("client-index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise FedmamlError(
            f"node config client-index={index!r}; give an integer >= 0, e.g. client-index=3"
        )
    return NodeIdentity(role, index)


def node_run_config(node_config: Mapping[str, Any], cfg: RunConfig) -> RunConfig:
    """The run config as this node applies it: its node config's ``device`` wins."""
    if "device" not in node_config:
        return cfg
    return cfg.replace(device=str(node_config["device"]))


def personalized_path(node_config: Mapping[str, Any], cfg: RunConfig, who: NodeIdentity) -> Path:
    """Where this device keeps its personalized model: node config ``personalized-path``; in a
    simulation (every node on one machine) ``out-dir/personalized/<role>-<index>.pt``; else
    ``fedmaml-personalized.pt`` in the SuperNode's working directory."""
    if "personalized-path" in node_config:
        return Path(str(node_config["personalized-path"])).expanduser()
    if "partition-id" in node_config:
        return Path(cfg.out_dir) / "personalized" / f"{who.role}-{who.index}.pt"
    return Path("fedmaml-personalized.pt").resolve()


def load_client(node_config: Mapping[str, Any], cfg: RunConfig) -> tuple[NodeIdentity, ClientData]:
    """This node's identity and data (cached per process: a simulation actor keeps it)."""
    return _load(tuple(sorted(node_config.items())), cfg)


@lru_cache(maxsize=8)
def _load(items: tuple[tuple[str, Any], ...], cfg: RunConfig) -> tuple[NodeIdentity, ClientData]:
    node_config = dict(items)
    identity = identify(node_config, cfg)
    if cfg.task == "local" or "data-path" in node_config:
        return identity, _own_data(node_config, cfg, identity)
    return identity, user_data(cfg, identity.role, identity.index)


def user_data(cfg: RunConfig, role: str, index: int) -> ClientData:
    """Client ``index`` of ``role`` in the run's shared task source. The source is opened once
    per process (:func:`fedmaml.problem.problem_for`) and the clients built are kept, up to
    ``USER_CACHE_BYTES`` of tensors (least recently used first out): a simulation worker serving
    many users builds each one's data once, not once per message."""
    key = (cfg, role, index)
    client = _USERS.get(key)
    if client is None:
        from fedmaml.problem import problem_for

        client = problem_for(cfg).source.client(index, role)
        _USERS.put(key, client)
    return client


#: tensor bytes of clients a process keeps (:func:`user_data`)
USER_CACHE_BYTES = 256 * 2**20


class _ClientCache:
    """Least-recently-used clients, bounded by the bytes of their tensors."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[RunConfig, str, int], ClientData] = OrderedDict()

    def get(self, key: tuple[RunConfig, str, int]) -> ClientData | None:
        client = self._items.get(key)
        if client is not None:
            self._items.move_to_end(key)
        return client

    def put(self, key: tuple[RunConfig, str, int], client: ClientData) -> None:
        self._items[key] = client
        self.bytes += _nbytes(client)
        while self.bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)


def _nbytes(client: ClientData) -> int:
    tensors = (client.x, client.y, client.x_test, client.y_test)
    return sum(t.element_size() * t.nelement() for t in tensors if t is not None)


_USERS = _ClientCache(USER_CACHE_BYTES)


def _own_data(node_config: Mapping[str, Any], cfg: RunConfig, identity: NodeIdentity) -> ClientData:
    """The device's own data file, checked against the run's input shape, classes, episodes."""
    from fedmaml.tasks.local import load_local
    from fedmaml.tasks.partition import support_query_split
    from fedmaml.tasks.registry import episode_spec

    path = str(node_config.get("data-path", ""))
    if cfg.task != "local":
        raise FedmamlError(
            f"this node serves its own data ({path}) but the run's task is {cfg.task!r}; submit "
            "the run with task = 'local' and the data's input-shape and num-classes"
        )
    if not path:
        raise FedmamlError(
            "task 'local' trains on each node's own data but this node names none; start it "
            "with fedmaml client --data PATH (node config data-path='PATH')"
        )
    try:
        heldout = float(node_config.get("heldout-fraction", HELDOUT_FRACTION))
    except ValueError:
        raise FedmamlError(
            f"node config heldout-fraction={node_config['heldout-fraction']!r}; give a number "
            "in [0, 1)"
        ) from None
    columns = cfg.replace(
        label_column=str(node_config.get("label-column", cfg.label_column)),
        feature_columns=str(node_config.get("feature-columns", cfg.feature_columns)),
    )
    client = load_local(
        path,
        fmt=str(node_config["data-format"]) if "data-format" in node_config else None,
        input_shape=cfg.input_dims,
        num_classes=cfg.num_classes,
        label_column=columns.label_column,
        feature_columns=columns.feature_column_list,
        user=str(node_config["user"]) if "user" in node_config else None,
        heldout_fraction=heldout,
        seed=cfg.seed * 1_000_003 + identity.index,
        spec=episode_spec(cfg),
        client_id=f"{identity.role}-{identity.index}",
        cache_dir=str(node_config.get("cache-dir", default_cache_dir())) or None,
    )
    if cfg.support_fraction > 0:  # the protocol's support and query sets, as for every source
        return support_query_split(client, cfg.support_fraction, cfg.seed)
    return client


def default_cache_dir() -> Path:
    """Where a device keeps its decoded data between messages."""
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmaml" / "local-data"
    )
