"""The server's side of SecAgg+ on the Message API: one round of the protocol with the nodes
that the wrapped Flower strategy sampled, driven from fedmaml's ServerApp (Flower 1.42 has
SecAgg+ only on its legacy path). The client's side and the stages' contents are in
:mod:`secagg_client`, the vector arithmetic in :mod:`secagg_vector`.

The server learns the sum of the updates of the clients that completed the masking stage, and
their number n, never one client's update: it holds a client's mask seed b_i only if that
client's vector is in the sum, and its key sk1_i only if it is not.

Sets of nodes, as the round goes on: the sampled nodes are arranged in a random ring; each
node's *neighbours* are the k nearest on it, itself included (k = ``secagg-shares``, or all).
S0 answered ``setup`` (public keys); S1 ⊆ S0 answered ``share-keys`` (encrypted shares, only
those addressed to neighbours are forwarded); A ⊆ S1 answered ``collect-masked`` with a
well-formed vector; D = S1 \\ A dropped after sharing their keys. ``unmask`` asks each node of
A for the b-shares of its active neighbours and the sk1-shares of its dropped ones. With t
shares of every b_i (i ∈ A) and every sk1_j (j ∈ D), the server removes the private masks of A
and the pairwise masks between A and D; the pairwise masks within A cancel. A node of A that
does not answer ``unmask`` still counts in the sum. When fewer than t shares come back for some
node, or |A| < 2, the round is abandoned: no sum, no update.

Checks on the sum (the server cannot check the masked updates themselves): every coordinate
of Σq must lie in [0, n·Q] (a vector outside the protocol's range shows up there), and
‖ΣΔ‖ ≤ n·C plus the rounding bound (each Δ_i was clipped to C on its device).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmaml.config import RunConfig
from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.replies import BadReply, error_reason
from fedmaml.federated.secagg_vector import (
    Layout,
    decode_sum,
    from_bytes,
    mask,
    rounding_bound,
    scalar_to_key,
    wrap,
)

#: seconds between pulls of a stage's replies (Flower's deployed grid waits 3 s)
POLL_INTERVAL = 0.2


class SecureRoundFailed(FedmamlError):
    """The round's sum could not be unmasked or failed its checks: no update this round.
    ``outcome`` holds what is known of each node's part (failures, silences)."""

    def __init__(self, reason: str, outcome: dict[int, tuple[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.outcome = outcome if outcome is not None else {}


@dataclass
class SecureSum:
    """What the server learns in a round: Σ Δ_i and Σ metrics over the n clients of A."""

    sums: dict[str, np.ndarray]
    metrics: dict[str, float]
    count: int
    #: every sampled node's part in the round: ``ok`` (in the sum), ``failed`` or ``no-reply``
    #: with the stage and reason
    outcome: dict[int, tuple[str, str]] = field(default_factory=dict)


class SecureAggregation:
    """Runs the four stages for one round's sampled nodes."""

    def __init__(self, cfg: RunConfig, shapes: dict[str, tuple[int, ...]], timeout: float) -> None:
        self.cfg = cfg
        self.shapes = shapes
        self.timeout = timeout
        self.clip_range = cfg.secagg_clip_range or cfg.clip_norm
        self._random = random.SystemRandom()

    def run(self, grid: Grid, messages: list[Message], meta_round: int) -> SecureSum:
        """The protocol over the nodes ``messages`` go to (each carries θ and the round's
        config); :class:`SecureRoundFailed` when no sum can be had."""
        outcome: dict[int, tuple[str, str]] = {}
        try:
            return self._run(grid, messages, meta_round, outcome)
        except SecureRoundFailed as exc:
            raise SecureRoundFailed(str(exc), outcome) from None

    def _run(
        self,
        grid: Grid,
        messages: list[Message],
        meta_round: int,
        outcome: dict[int, tuple[str, str]],
    ) -> SecureSum:
        train = {m.metadata.dst_node_id: m for m in messages}
        nodes = list(train)
        k = min(self.cfg.secagg_share_count, len(nodes))
        t = self.cfg.secagg_threshold or k // 2 + 1
        if len(nodes) < 2 or t > k:
            raise SecureRoundFailed(
                f"{len(nodes)} node(s) sampled: too few for secure aggregation with threshold "
                f"{t} of {k} shares"
            )
        neighbours = self._ring(nodes, k)
        exchange = _Exchange(grid, meta_round, self.timeout, outcome)

        setup = {
            keys.STAGE: keys.SETUP,
            keys.SHARE_NUM: k,
            keys.THRESHOLD: t,
            keys.CLIP_RANGE: float(self.clip_range),
            keys.BITS: self.cfg.secagg_bits,
        }
        public: dict[int, tuple[bytes, bytes]] = {}
        for node, config in exchange.stage(keys.SETUP, {n: _record(setup) for n in nodes}).items():
            with exchange.parsing(node, keys.SETUP):
                public[node] = (_bytes(config, keys.PK1), _bytes(config, keys.PK2))

        def share_keys(node: int) -> RecordDict:
            near = sorted(n for n in neighbours[node] if n in public)
            return _record(
                {
                    keys.STAGE: keys.SHARE_KEYS,
                    keys.NODES: near,
                    keys.PK1: [public[n][0] for n in near],
                    keys.PK2: [public[n][1] for n in near],
                }
            )

        sent: dict[int, list[tuple[int, bytes]]] = {}
        for node, config in exchange.stage(
            keys.SHARE_KEYS, {n: share_keys(n) for n in public}
        ).items():
            with exchange.parsing(node, keys.SHARE_KEYS):
                destinations = _ints(config, keys.NODES)
                ciphertexts = _list(config, keys.CIPHERTEXTS, bytes)
                if len(destinations) != len(ciphertexts):
                    raise BadReply("shares and destinations differ in number")
                sent[node] = list(zip(destinations, ciphertexts, strict=True))
        shared = set(sent)  # S1: these nodes' shares reach their neighbours
        forward: dict[int, list[tuple[int, bytes]]] = {n: [] for n in shared}
        for source, pairs in sent.items():
            for dst, ciphertext in pairs:
                if dst in shared and dst in neighbours[source] and dst != source:
                    forward[dst].append((source, ciphertext))

        def collect(node: int) -> RecordDict:
            content = RecordDict(dict(train[node].content.items()))
            content[keys.SECAGG] = ConfigRecord(
                {
                    keys.STAGE: keys.COLLECT_MASKED,
                    keys.NODES: [s for s, _ in forward[node]],
                    keys.CIPHERTEXTS: [c for _, c in forward[node]],
                }
            )
            return content

        masked = exchange.stage(keys.COLLECT_MASKED, {n: collect(n) for n in sorted(shared)})
        vectors, names = self._vectors(masked, outcome)
        active = set(vectors)
        dead = shared - active
        if len(active) < 2:
            raise SecureRoundFailed(
                f"{len(active)} masked update(s) came back: a sum needs at least 2"
            )

        def unmask(node: int) -> RecordDict:
            return _record(
                {
                    keys.STAGE: keys.UNMASK,
                    keys.ACTIVE: sorted(neighbours[node] & active),
                    keys.DEAD: sorted(neighbours[node] & dead),
                }
            )

        shares = exchange.stage(keys.UNMASK, {n: unmask(n) for n in sorted(active)})
        for node in active:
            outcome.setdefault(node, ("ok", ""))  # in the sum, whether or not it sent shares
        layout = Layout(self.shapes, names, self.clip_range, self.cfg.secagg_bits)
        total = self._unmask(vectors, shares, neighbours, public, dead, t, layout)
        return self._decode(total, layout, len(active), outcome)

    def _ring(self, nodes: list[int], k: int) -> dict[int, set[int]]:
        """Each node's neighbours (itself included): all nodes when k covers them, else the
        k nearest on a random ring, k // 2 on either side."""
        if k >= len(nodes):
            return {n: set(nodes) for n in nodes}
        order = list(nodes)
        self._random.shuffle(order)
        half = k // 2
        return {
            n: {order[(i + d) % len(order)] for d in range(-half, half + 1)}
            for i, n in enumerate(order)
        }

    def _vectors(
        self, replies: dict[int, ConfigRecord], outcome: dict[int, tuple[str, str]]
    ) -> tuple[dict[int, np.ndarray], tuple[str, ...]]:
        """The well-formed masked vectors (the same metric names as most, the right length);
        a malformed one leaves its node dropped (its masks are removed, its vector unused)."""
        named: dict[int, tuple[bytes, tuple[str, ...]]] = {}
        for node, config in replies.items():
            try:
                named[node] = (
                    _bytes(config, keys.MASKED),
                    tuple(_list(config, keys.METRIC_NAMES, str)),
                )
            except BadReply as exc:
                outcome[node] = ("failed", f"{keys.COLLECT_MASKED}: {exc}")
        counts: dict[tuple[str, ...], int] = {}
        for _, names in named.values():
            counts[names] = counts.get(names, 0) + 1
        names = max(counts, key=lambda n: counts[n]) if counts else ()
        size = Layout(self.shapes, names, self.clip_range, self.cfg.secagg_bits).size
        vectors = {}
        for node, (data, node_names) in named.items():
            try:
                if node_names != names:
                    raise ValueError("metric names differ from the other clients'")
                vectors[node] = from_bytes(data, size)
            except ValueError as exc:
                outcome[node] = ("failed", f"{keys.COLLECT_MASKED}: {exc}")
        return vectors, names

    def _unmask(
        self,
        vectors: dict[int, np.ndarray],
        replies: dict[int, ConfigRecord],
        neighbours: dict[int, set[int]],
        public: dict[int, tuple[bytes, bytes]],
        dead: set[int],
        threshold: int,
        layout: Layout,
    ) -> np.ndarray:
        """Σ q_i over the active nodes: their vectors' sum less every remaining mask."""
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
            generate_shared_key,
        )
        from flwr.supercore.primitives.asymmetric import bytes_to_public_key

        seed_shares: dict[int, list[bytes]] = {n: [] for n in vectors}
        key_shares: dict[int, list[bytes]] = {n: [] for n in dead}
        for responder, config in replies.items():
            try:
                for kind, owners_key, shares_key, store in (
                    ("seed", keys.ACTIVE, keys.SEED_SHARES, seed_shares),
                    ("key", keys.DEAD, keys.KEY_SHARES, key_shares),
                ):
                    owners = _ints(config, owners_key)
                    shares = _list(config, shares_key, bytes)
                    if len(owners) != len(shares):
                        raise BadReply(f"{kind} shares and owners differ in number")
                    for owner, share in zip(owners, shares, strict=True):
                        if owner in store and responder in neighbours[owner]:
                            store[owner].append(share)
            except BadReply:
                continue  # a malformed answer counts as none
        short = [n for n, s in (seed_shares | key_shares).items() if len(s) < threshold]
        if short:
            raise SecureRoundFailed(
                f"fewer than {threshold} shares came back for {len(short)} node(s): their "
                "masks cannot be removed (more clients dropped out than the threshold allows)"
            )
        total = np.sum(list(vectors.values()), axis=0, dtype=np.int64)
        try:  # t shares rebuild a secret; more only cost time (interpolation is O(t^2))
            for shares in seed_shares.values():
                total -= mask(combine_shares(shares[:threshold]), layout.size)
            for node, shares in key_shares.items():
                sk1 = scalar_to_key(combine_shares(shares[:threshold]))
                for other in sorted(neighbours[node] & set(vectors)):
                    pairwise = mask(
                        generate_shared_key(sk1, bytes_to_public_key(public[other][0])),
                        layout.size,
                    )
                    # ``other`` added the mask when its id is larger, subtracted it otherwise
                    total = total - pairwise if other > node else total + pairwise
        except ValueError as exc:  # shares that do not combine into a seed or a key
            raise SecureRoundFailed(f"the shares do not rebuild the masks ({exc})") from None
        return wrap(total)

    def _decode(
        self, total: np.ndarray, layout: Layout, n: int, outcome: dict[int, tuple[str, str]]
    ) -> SecureSum:
        """Check the unmasked Σq, then decode it into ΣΔ and Σ metrics."""
        if total.max(initial=0) > n * layout.levels:
            raise SecureRoundFailed(
                f"the unmasked sum leaves the range of {n} quantized updates: a client sent a "
                "vector outside the protocol; no update is used this round"
            )
        sums, metrics = decode_sum(layout, total, n)
        norm = math.sqrt(sum(float(np.square(v).sum()) for v in sums.values()))
        bound = n * self.cfg.clip_norm + rounding_bound(layout, n)
        if not norm <= bound:
            raise SecureRoundFailed(
                f"the unmasked sum has norm {norm:.4g}, above {n} clients x the norm bound "
                f"({bound:.4g}): a client did not clip its update; no update is used this round"
            )
        return SecureSum(sums, metrics, n, outcome)


class _Exchange:
    """One stage's round trip: push a message per node, pull the replies until all are in or
    the round timeout passes. Failed and silent nodes are recorded in ``outcome``."""

    def __init__(
        self, grid: Grid, meta_round: int, timeout: float, outcome: dict[int, tuple[str, str]]
    ) -> None:
        self.grid, self.meta_round, self.timeout = grid, meta_round, timeout
        self.outcome = outcome

    def stage(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, ConfigRecord]:
        """The ``secagg`` ConfigRecord of every node that answered this stage well."""
        messages = [
            Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(self.meta_round),
            )
            for node, content in contents.items()
        ]
        answers: dict[int, ConfigRecord] = {}
        for reply in self._send_and_receive(messages):
            node = reply.metadata.src_node_id
            if node not in contents:
                continue
            if reply.has_error():
                self.outcome[node] = ("failed", f"{stage}: {error_reason(reply)}")
            elif keys.SECAGG not in reply.content.config_records:
                self.outcome[node] = ("failed", f"{stage}: the reply lacks {keys.SECAGG!r}")
            else:
                answers[node] = reply.content.config_records[keys.SECAGG]
        for node in contents:
            if node not in answers and node not in self.outcome:
                self.outcome[node] = (
                    "no-reply",
                    f"{stage}: no reply within round-timeout={self.timeout:g} s (node lost?)",
                )
        return answers

    @contextlib.contextmanager
    def parsing(self, node: int, stage: str) -> Iterator[None]:
        """Reading one node's answer: a malformed one is that node's failure, nobody else's."""
        try:
            yield
        except BadReply as exc:
            self.outcome[node] = ("failed", f"{stage}: {exc}")

    def _send_and_receive(self, messages: list[Message]) -> Iterable[Message]:
        """Flower's ``send_and_receive`` with a short pull interval: four stages a round."""
        if not messages:
            return []
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.timeout
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            pulled = list(self.grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(POLL_INTERVAL)
        return replies


def _record(values: dict[str, Any]) -> RecordDict:
    return RecordDict({keys.SECAGG: ConfigRecord(values)})


def _bytes(config: ConfigRecord, key: str) -> bytes:
    value = config.get(key)
    if not isinstance(value, bytes):
        raise BadReply(f"{key!r} is not bytes")
    return value


def _list(config: ConfigRecord, key: str, kind: type) -> list[Any]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise BadReply(f"{key!r} is not a list of {kind.__name__}")
    return value


def _ints(config: ConfigRecord, key: str) -> list[int]:
    values = _list(config, key, int)
    if any(isinstance(v, bool) for v in values):
        raise BadReply(f"{key!r} is not a list of int")
    return values
