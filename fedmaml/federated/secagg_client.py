"""The client's side of SecAgg+ on the Message API: a ClientApp mod, fedmaml's port of Flower's
``secaggplus_mod`` (legacy path only in Flower 1.42), on Flower's primitives.

Every protocol message is a ``train`` message holding the ConfigRecord ``secagg``; the mod
answers it by stage and keeps the protocol state in ``context.state`` between messages (both
runtimes keep it per node). Other messages go to the handlers untouched.

1. ``setup`` (share count k, threshold t, clip range r, quantization bits): make two fresh
   ECDH key pairs (SECP384R1): (sk1, pk1) for the pairwise masks, (sk2, pk2) for encrypting
   shares. Reply pk1, pk2.
2. ``share-keys`` (the public keys of the node's neighbours, itself included): check they are
   distinct and that its own are listed as sent; draw a fresh 32-byte mask seed b; split b and
   sk1 into Shamir shares (t of the k rebuild them); encrypt each neighbour's pair of shares
   with the key agreed from sk2 and its pk2 (Fernet: AES-CBC + HMAC), bound to the sender and
   receiver ids. Reply the ciphertexts, addressed to the neighbours.
3. ``collect-masked`` (θ, the round's config, the ciphertexts addressed to this node): decrypt
   and check them, keep the shares. Run the training handler: Δ, already clipped to the norm
   bound there (:func:`fedmaml.federated.privacy.clip_to_norm`), and the metrics. Refuse a
   non-finite Δ or metric (the server could not see it). Quantize, add the private mask of b
   and the pairwise masks shared with every neighbour that sent shares (+ when this node's id
   is larger), reduce mod 2^32 (:mod:`secagg_vector`). Reply the masked vector and the metric
   names only; Δ and the metric values never leave unmasked.
4. ``unmask`` (which neighbours are active, which dropped): refuse when a node is in both lists,
   when this node is listed as dropped, or when fewer than t are active. Reply the b-shares
   of the active neighbours and the sk1-shares of the dropped ones, then forget every secret.

A failure raises :class:`fedmaml.errors.FedmamlError` (one line to the server through
``one_line_errors``); the server treats the node as dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log

from fedmaml.errors import FedmamlError
from fedmaml.federated import keys
from fedmaml.federated.secagg_vector import Layout, encode, key_to_scalar, mask, to_bytes, wrap

Handler = Callable[[Message, Context], Message]


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Answer a SecAgg+ stage message; pass any other message on."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or keys.SECAGG not in msg.content.config_records
    ):
        return call_next(msg, context)
    config = msg.content.config_records[keys.SECAGG]
    stage = config.get(keys.STAGE)
    state = _load(context)
    round_id = msg.metadata.group_id
    node = msg.metadata.dst_node_id
    if stage == keys.SETUP:
        state = {keys.STAGE: keys.SETUP, "round": round_id, "node": node}
        reply = _setup(state, config)
    else:
        _expect(state, stage, round_id)
        if stage == keys.SHARE_KEYS:
            reply = _share_keys(state, config)
        elif stage == keys.COLLECT_MASKED:
            reply = _collect_masked(state, config, msg, context, call_next)
        else:
            reply = _unmask(state, config)
        state[keys.STAGE] = stage
    context.state.config_records[keys.SECAGG_STATE] = ConfigRecord(state)
    return Message(RecordDict({keys.SECAGG: ConfigRecord(reply)}), reply_to=msg)


def _load(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(keys.SECAGG_STATE)
    return dict(record) if record is not None else {}


def _expect(state: dict[str, Any], stage: Any, round_id: str) -> None:
    """Stages come in order, within one round."""
    if stage not in keys.STAGES:
        raise FedmamlError(f"secure aggregation: unknown stage {stage!r}")
    previous = keys.STAGES[keys.STAGES.index(stage) - 1]
    if state.get(keys.STAGE) != previous or state.get("round") != round_id:
        raise FedmamlError(
            f"secure aggregation: stage {stage!r} of round {round_id} came after stage "
            f"{state.get(keys.STAGE)!r} of round {state.get('round')}; the round is aborted"
        )


def _int(config: ConfigRecord, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedmamlError(f"secure aggregation: {key!r} is not an integer")
    return value


def _setup(state: dict[str, Any], config: ConfigRecord) -> dict[str, Any]:
    from flwr.supercore.primitives.asymmetric import (
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    share_num, threshold = _int(config, keys.SHARE_NUM), _int(config, keys.THRESHOLD)
    bits = _int(config, keys.BITS)
    clip_range = config.get(keys.CLIP_RANGE)
    if not (2 <= threshold <= share_num and 2 <= bits <= 30):
        raise FedmamlError(f"secure aggregation: threshold {threshold} of {share_num} shares")
    if not isinstance(clip_range, float) or not (math.isfinite(clip_range) and clip_range > 0):
        raise FedmamlError("secure aggregation: the clip range is not a number > 0")
    state.update({keys.SHARE_NUM: share_num, keys.THRESHOLD: threshold, keys.BITS: bits})
    state[keys.CLIP_RANGE] = clip_range
    for name in ("1", "2"):
        secret, public = generate_key_pairs()
        state[f"sk{name}"] = private_key_to_bytes(secret)
        state[f"pk{name}"] = public_key_to_bytes(public)
    return {keys.PK1: state["pk1"], keys.PK2: state["pk2"]}


def _share_keys(state: dict[str, Any], config: ConfigRecord) -> dict[str, Any]:
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    nodes = [int(n) for n in config.get(keys.NODES, [])]
    pk1s, pk2s = list(config.get(keys.PK1, [])), list(config.get(keys.PK2, []))
    me, threshold = state["node"], state[keys.THRESHOLD]
    if not (len(nodes) == len(pk1s) == len(pk2s) == len(set(nodes))):
        raise FedmamlError("secure aggregation: the neighbours' keys are malformed")
    if len(nodes) < threshold or len(nodes) > state[keys.SHARE_NUM]:
        raise FedmamlError(
            f"secure aggregation: {len(nodes)} neighbours for threshold {threshold} of "
            f"{state[keys.SHARE_NUM]} shares"
        )
    if len(set(pk1s) | set(pk2s)) != 2 * len(nodes):
        raise FedmamlError("secure aggregation: some public keys are identical")
    if me not in nodes or (pk1s[nodes.index(me)], pk2s[nodes.index(me)]) != (
        state["pk1"],
        state["pk2"],
    ):
        raise FedmamlError("secure aggregation: this node's own public keys are not listed")
    state["seed"] = os.urandom(32)
    seed_shares = create_shares(state["seed"], threshold, len(nodes))
    key_shares = create_shares(key_to_scalar(state["sk1"]), threshold, len(nodes))
    sk2 = bytes_to_private_key(state["sk2"])
    state.update({"peers": nodes, "peer-pk1": pk1s, "share-owners": [me]})
    state.update({keys.SEED_SHARES: [], keys.KEY_SHARES: []})
    destinations, ciphertexts = [], []
    for node, pk2, seed_share, key_share in zip(nodes, pk2s, seed_shares, key_shares, strict=True):
        if node == me:
            state[keys.SEED_SHARES].append(seed_share)
            state[keys.KEY_SHARES].append(key_share)
            continue
        shared = generate_shared_key(sk2, bytes_to_public_key(pk2))
        plaintext = share_keys_plaintext_concat(me, node, seed_share, key_share)
        destinations.append(node)
        ciphertexts.append(encrypt(shared, plaintext))
    state["peer-pk2"] = pk2s
    return {keys.NODES: destinations, keys.CIPHERTEXTS: ciphertexts}


def _collect_masked(
    state: dict[str, Any],
    config: ConfigRecord,
    msg: Message,
    context: Context,
    call_next: Handler,
) -> dict[str, Any]:
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    me, peers = state["node"], list(state["peers"])
    sources = [int(n) for n in config.get(keys.NODES, [])]
    ciphertexts = list(config.get(keys.CIPHERTEXTS, []))
    if len(sources) != len(ciphertexts) or len(set(sources)) != len(sources):
        raise FedmamlError("secure aggregation: the forwarded shares are malformed")
    if len(sources) + 1 < state[keys.THRESHOLD]:
        raise FedmamlError(
            f"secure aggregation: shares from {len(sources)} neighbours, fewer than the "
            f"threshold {state[keys.THRESHOLD]} minus this node"
        )
    sk2 = bytes_to_private_key(state["sk2"])
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if source == me or source not in peers:
            raise FedmamlError(f"secure aggregation: shares from {source}, not a neighbour")
        pk2 = bytes_to_public_key(state["peer-pk2"][peers.index(source)])
        try:
            plaintext = decrypt(generate_shared_key(sk2, pk2), ciphertext)
        except Exception:  # cryptography's InvalidToken: tampered or misaddressed
            raise FedmamlError(
                f"secure aggregation: shares from {source} fail to decrypt"
            ) from None
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(plaintext)
        if (sender, receiver) != (source, me):
            raise FedmamlError("secure aggregation: shares addressed to another node")
        state["share-owners"].append(source)
        state[keys.SEED_SHARES].append(seed_share)
        state[keys.KEY_SHARES].append(key_share)

    log(INFO, "fedmaml: secure aggregation round %s: masking this client's update", state["round"])
    reply = call_next(msg, context)
    arrays = reply.content[keys.ARRAYS]
    update = {k: np.asarray(a.numpy(), dtype=np.float64) for k, a in arrays.items()}
    metrics = {
        k: float(v)
        for k, v in dict(reply.content[keys.METRICS]).items()
        if k != keys.NUM_EXAMPLES and isinstance(v, int | float)
    }
    if set(update) != set(msg.content[keys.ARRAYS].keys()):
        raise FedmamlError("secure aggregation: the update's keys differ from θ's")
    if not all(np.isfinite(v).all() for v in update.values()) or not all(
        math.isfinite(v) for v in metrics.values()
    ):
        raise FedmamlError(
            "the meta-gradient or its metrics hold NaN or Inf: not masked, not sent "
            "(e.g. lower inner-lr if the adaptation diverges)"
        )
    layout = Layout(
        shapes={k: tuple(v.shape) for k, v in update.items()},
        metrics=tuple(sorted(metrics)),
        clip_range=state[keys.CLIP_RANGE],
        bits=state[keys.BITS],
    )
    vector = encode(layout, update, metrics) + mask(state["seed"], layout.size)
    sk1 = bytes_to_private_key(state["sk1"])
    for source in sources:
        pk1 = bytes_to_public_key(state["peer-pk1"][peers.index(source)])
        pairwise = mask(generate_shared_key(sk1, pk1), layout.size)
        vector = vector + pairwise if me > source else vector - pairwise
    return {keys.MASKED: to_bytes(wrap(vector)), keys.METRIC_NAMES: list(layout.metrics)}


def _unmask(state: dict[str, Any], config: ConfigRecord) -> dict[str, Any]:
    active = [int(n) for n in config.get(keys.ACTIVE, [])]
    dead = [int(n) for n in config.get(keys.DEAD, [])]
    owners = list(state["share-owners"])
    if set(active) & set(dead):
        raise FedmamlError("secure aggregation: the server asked for both shares of a node")
    if state["node"] not in active:
        raise FedmamlError("secure aggregation: this node sent its vector but is listed dropped")
    if len(active) < state[keys.THRESHOLD]:
        raise FedmamlError(
            f"secure aggregation: {len(active)} active neighbours, fewer than the threshold "
            f"{state[keys.THRESHOLD]}"
        )
    if not set(active + dead) <= set(owners):
        raise FedmamlError("secure aggregation: shares asked for nodes that sent none")
    reply = {
        keys.ACTIVE: active,
        keys.SEED_SHARES: [state[keys.SEED_SHARES][owners.index(n)] for n in active],
        keys.DEAD: dead,
        keys.KEY_SHARES: [state[keys.KEY_SHARES][owners.index(n)] for n in dead],
    }
    for secret in ("sk1", "sk2", "seed", keys.SEED_SHARES, keys.KEY_SHARES):
        state.pop(secret, None)
    return reply
