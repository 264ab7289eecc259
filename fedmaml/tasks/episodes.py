"""The one Task type every data source produces and every consumer takes.

A *client* holds a pool of labelled examples (its own data, split into a training part and a
held-out part). An *episode* (a MAML task instance) is drawn from that pool:

* regression or natural labels (``ways is None``): ``support`` and ``query`` examples drawn
  without replacement from the pool;
* N-way K-shot classification (``ways = N``): N classes drawn from the client's classes,
  ``support`` examples (shots) and ``query`` examples per class, labels renumbered 0..N-1;
* whole sets (``fraction`` set, the FedMeta protocol): the client's data was split once into a
  support set and a query set (:func:`fedmaml.tasks.partition.support_query_split`, held as its
  training and held-out pools); every episode, training or evaluation, adapts on the whole
  support set and is scored on the whole query set. ``support`` and ``query`` are then the
  smallest sizes a client's two sets may have.

Sampling takes an explicit :class:`torch.Generator`, so episodes are reproducible from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmaml.errors import FedmamlError

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Task:
    """One episode: a support set to adapt on and a query set to evaluate the adapted model."""

    support: Batch
    query: Batch
    task_id: str = ""

    @property
    def num_query(self) -> int:
        return int(self.query[0].shape[0])


@dataclass(frozen=True)
class EpisodeSpec:
    """How many examples an episode takes: per class when ``ways`` is set, in all otherwise;
    with ``fraction`` (the share of a client's data in its support set) the whole support and
    query sets, which must hold at least ``support`` and ``query`` examples."""

    support: int
    query: int
    ways: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.support < 1 or self.query < 1:
            raise FedmamlError(
                f"support and query sizes must be >= 1 (got support={self.support}, "
                f"query={self.query}); set support-size and query-size to positive integers"
            )
        if self.ways is not None and self.ways < 2:
            raise FedmamlError(f"ways must be >= 2 for N-way episodes (got {self.ways})")
        if self.fraction is not None:
            if not 0 < self.fraction < 1:
                raise FedmamlError(
                    f"the support fraction must be in (0, 1) (got {self.fraction}); e.g. 0.2"
                )
            if self.ways is not None:
                raise FedmamlError(
                    "whole support/query sets (a support fraction) keep the data's own labels; "
                    "set ways = 0 or drop the support fraction"
                )


@dataclass(frozen=True)
class ClientData:
    """A client's own examples: a training pool and an optional held-out pool."""

    client_id: str
    x: Tensor
    y: Tensor
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (x, y) in {"train": (self.x, self.y), "test": (self.x_test, self.y_test)}.items():
            if x is None and y is None and name == "test":
                continue
            if x is None or y is None or x.shape[0] != y.shape[0]:
                raise FedmamlError(
                    f"client {self.client_id!r}: {name} inputs and labels differ in length; "
                    "give one label per example"
                )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_classification(self) -> bool:
        return not torch.is_floating_point(self.y)


def _pick(n_available: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n_available, generator=generator)[:n]


def _class_indices(y: Tensor) -> dict[int, Tensor]:
    return {int(c): (y == c).nonzero(as_tuple=True)[0] for c in torch.unique(y)}


def sample_episode(
    client: ClientData,
    spec: EpisodeSpec,
    generator: torch.Generator,
    *,
    held_out: bool = False,
) -> Task:
    """Draw one episode from ``client``.

    With ``held_out=False`` support and query are disjoint draws from the training pool (the
    meta-training episode). With ``held_out=True`` the support set comes from the training pool
    and the query set from the held-out pool (evaluation on data the client never trained on).
    """
    if (held_out or spec.fraction is not None) and client.x_test is None:
        raise FedmamlError(
            f"client {client.client_id!r} has no held-out data; give it a test split"
        )
    if spec.fraction is not None:
        return _whole_sets(client, spec)
    if spec.ways is None:
        return _plain_episode(client, spec, generator, held_out)
    return _n_way_episode(client, spec, generator, held_out)


def _whole_sets(client: ClientData, spec: EpisodeSpec) -> Task:
    """The client's whole support set (its training pool) and query set (its held-out pool)."""
    assert client.x_test is not None and client.y_test is not None
    for name, n, need in (
        ("support", len(client), spec.support),
        ("query", int(client.x_test.shape[0]), spec.query),
    ):
        if n < need:
            raise FedmamlError(
                f"client {client.client_id!r} has {n} {name} examples but at least {need} are "
                f"asked for (support-size / query-size); lower them, or give the client more data"
            )
    return Task(
        support=(client.x, client.y), query=(client.x_test, client.y_test), task_id=client.client_id
    )


def _plain_episode(
    client: ClientData, spec: EpisodeSpec, generator: torch.Generator, held_out: bool
) -> Task:
    n = len(client)
    need = spec.support if held_out else spec.support + spec.query
    if n < need:
        raise FedmamlError(
            f"client {client.client_id!r} has {n} training examples but an episode needs "
            f"{need}; lower support-size/query-size or give the client more data"
        )
    order = _pick(n, need, generator)
    s = order[: spec.support]
    support = (client.x[s], client.y[s])
    if held_out:
        assert client.x_test is not None and client.y_test is not None
        n_test = int(client.x_test.shape[0])
        if n_test < 1:
            raise FedmamlError(f"client {client.client_id!r} has an empty held-out split")
        q = _pick(n_test, min(spec.query, n_test), generator)
        query = (client.x_test[q], client.y_test[q])
    else:
        q = order[spec.support :]
        query = (client.x[q], client.y[q])
    return Task(support=support, query=query, task_id=client.client_id)


def _n_way_episode(
    client: ClientData, spec: EpisodeSpec, generator: torch.Generator, held_out: bool
) -> Task:
    assert spec.ways is not None
    train_idx = _class_indices(client.y)
    test_idx = _class_indices(client.y_test) if held_out and client.y_test is not None else {}
    per_class = spec.support if held_out else spec.support + spec.query
    eligible = [
        c
        for c, idx in train_idx.items()
        if len(idx) >= per_class and (not held_out or len(test_idx.get(c, ())) >= 1)
    ]
    if len(eligible) < spec.ways:
        raise FedmamlError(
            f"client {client.client_id!r} has {len(eligible)} classes with at least {per_class} "
            f"examples each, but a {spec.ways}-way episode needs {spec.ways}; lower ways or shots"
        )
    chosen = [eligible[int(i)] for i in _pick(len(eligible), spec.ways, generator)]
    sx, sy, qx, qy = [], [], [], []
    for label, c in enumerate(chosen):
        idx = train_idx[c][_pick(len(train_idx[c]), per_class, generator)]
        sx.append(client.x[idx[: spec.support]])
        if held_out:
            assert client.x_test is not None
            t = test_idx[c]
            q = t[_pick(len(t), min(spec.query, len(t)), generator)]
            qx.append(client.x_test[q])
        else:
            qx.append(client.x[idx[spec.support :]])
        sy.append(torch.full((spec.support,), label, dtype=torch.long))
        qy.append(torch.full((qx[-1].shape[0],), label, dtype=torch.long))
    return Task(
        support=(torch.cat(sx), torch.cat(sy)),
        query=(torch.cat(qx), torch.cat(qy)),
        task_id=client.client_id,
    )


def episode_generator(seed: int, step: int, client_index: int, stream: int = 0) -> torch.Generator:
    """The generator for client ``client_index``'s episodes at meta-step (round) ``step``.

    Federated clients and the centralized trainer both draw episodes through this function, so
    the same (seed, step, client) yields the same episode wherever it is computed. The mixed
    seed is taken modulo 2**64, the range ``manual_seed`` accepts, so any seed works.
    """
    return torch.Generator().manual_seed(
        (((seed * 1_000_003 + step) * 1_000_033 + client_index) * 4 + stream) % 2**64
    )


def training_episodes(
    client: ClientData, spec: EpisodeSpec, *, seed: int, step: int, index: int, count: int = 1
) -> list[Task]:
    """The ``count`` episodes client ``index`` trains on at meta-step ``step``: one definition
    shared by federated clients and the centralized trainer, so both see the same tasks."""
    g = episode_generator(seed, step, index)
    return [sample_episode(client, spec, g) for _ in range(count)]
