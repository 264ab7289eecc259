"""What a client's masked vector holds, and how masks are made and removed: the arithmetic that
the SecAgg+ client (:mod:`secagg_client`) and server (:mod:`secagg_server`) share.

Encoding. A client's contribution is one flat vector: its clipped update Δ (θ's arrays in
sorted key order), then its scalar training metrics (sorted names). Each block is quantized by
Flower's stochastic quantizer (``flwr.common.secure_aggregation.quantization``): a coordinate
x, clipped to [−r, r], becomes an integer in [0, Q] with Q = 2^bits, unbiased:
E[q] = (x + r)·Q/(2r). The update block uses r = ``secagg-clip-range`` (by default the norm
bound C, which no coordinate of a clipped update exceeds), the metric block r = METRIC_RANGE.

Masking. The vector is sent as y_i = q_i + p_i + Σ_j ±s_ij (mod 2^32): p_i a private mask
expanded from a fresh 32-byte seed b_i, s_ij a pairwise mask expanded from the ECDH secret of
clients i and j (+ when i > j, − otherwise, so the pair cancels in a sum). Masks are the
AES-256-CTR keystream of the seed (``cryptography``), the PRG of Bonawitz et al. (CCS 2017);
Flower's own ``pseudo_rand_gen`` folds a 32-byte seed into a 32-bit NumPy seed, and 2^32 seeds
can be searched. Keys are fresh every round, so each key expands one stream.

Keys. A client's mask key sk1 is shared as its 48-byte private scalar (``cryptography``'s
``private_numbers``, rebuilt with ``derive_private_key``), not as the 306-byte PEM Flower's mod
shares: Shamir sharing (PyCryptodome, pure Python) costs per 16-byte chunk, 4 chunks instead of
20.

Decoding. For n unmasked clients, Σq ≤ n·Q < 2^32 (``secagg-bits`` is checked for that), and
Σx = Σq·2r/Q − n·r, up to the rounding noise (at most 2r/Q per coordinate and client).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: masks and sums live in Z_{2^32}
MODULUS_BITS = 32
MODULUS = 2**MODULUS_BITS
#: scalar training metrics (query losses, accuracies) are clipped to [-1000, 1000] when summed
METRIC_RANGE = 1000.0


@dataclass(frozen=True)
class Layout:
    """The order and shapes of the update's arrays and the metric names, and the ranges."""

    shapes: dict[str, tuple[int, ...]]
    metrics: tuple[str, ...]
    clip_range: float
    bits: int

    @property
    def update_size(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def size(self) -> int:
        return self.update_size + len(self.metrics)

    @property
    def levels(self) -> int:
        return 2**self.bits


def encode(layout: Layout, update: dict[str, np.ndarray], metrics: dict[str, float]) -> np.ndarray:
    """Quantize an update and its metrics into one int64 vector with entries in [0, Q]."""
    from flwr.common.secure_aggregation.quantization import quantize

    flat = np.concatenate(
        [np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(layout.shapes)]
    )
    values = np.array([metrics[name] for name in layout.metrics], dtype=np.float64)
    q_update, q_metrics = (
        quantize([block], r, layout.levels)[0].astype(np.int64)
        for block, r in ((flat, layout.clip_range), (values, METRIC_RANGE))
    )
    return np.concatenate([q_update, q_metrics])


def decode_sum(
    layout: Layout, total: np.ndarray, n: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The sums Σ Δ_i (float64 arrays) and Σ metrics of n clients from Σ q_i."""
    from flwr.common.secure_aggregation.quantization import dequantize

    cut = layout.update_size
    sums = []
    for block, r in ((total[:cut], layout.clip_range), (total[cut:], METRIC_RANGE)):
        # Flower's dequantize returns Σq·2r/Q − r: one −r of the n is taken off there
        sums.append(dequantize([block], r, layout.levels)[0] - (n - 1) * r)
    arrays, offset = {}, 0
    for name in sorted(layout.shapes):
        size = math.prod(layout.shapes[name])
        arrays[name] = sums[0][offset : offset + size].reshape(layout.shapes[name])
        offset += size
    return arrays, dict(zip(layout.metrics, (float(v) for v in sums[1]), strict=True))


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform integers in [0, 2^32): the AES-256-CTR keystream of a 32-byte seed (or
    a Fernet-style base64 key from Flower's ``generate_shared_key``)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = seed if len(seed) == 32 else base64.urlsafe_b64decode(seed)
    if len(key) != 32:
        raise ValueError("a mask seed must hold 32 bytes")
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = stream.update(bytes(4 * size)) + stream.finalize()
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def wrap(vector: np.ndarray) -> np.ndarray:
    """Reduce modulo 2^32."""
    return np.bitwise_and(vector, MODULUS - 1)


def to_bytes(vector: np.ndarray) -> bytes:
    """A vector in Z_{2^32} as little-endian uint32 bytes (what travels)."""
    return wrap(vector).astype("<u4").tobytes()


def from_bytes(data: bytes, size: int) -> np.ndarray:
    """The inverse of :func:`to_bytes`; a wrong length is a ValueError."""
    if len(data) != 4 * size:
        raise ValueError(f"a masked vector of {len(data)} bytes, expected {4 * size}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)


def rounding_bound(layout: Layout, n: int) -> float:
    """An upper bound on ‖Σ decoded − Σ true‖ for n clients: each coordinate of each client is
    off by less than one quantization step 2r/Q."""
    return n * math.sqrt(layout.update_size) * 2 * layout.clip_range / layout.levels


def key_to_scalar(private_key_pem: bytes) -> bytes:
    """The 48-byte private scalar of a SECP384R1 key given as PEM (what is secret-shared)."""
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key

    value = bytes_to_private_key(private_key_pem).private_numbers().private_value
    return value.to_bytes(48, "big")


def scalar_to_key(scalar: bytes) -> Any:
    """The SECP384R1 private key of a 48-byte scalar (a rebuilt sk1)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())
