"""Flower ``Array`` ↔ numpy, byte for byte as Flower does it, without its per-array costs.

Flower stores an array as a ``.npy`` file in memory (``stype`` ``numpy.ndarray``): ``np.save``
on the way in (``Array.from_numpy_ndarray``), ``np.load`` on the way out (``Array.numpy``),
which formats the header each time and parses it back with ``ast.literal_eval``. That is most
of what a small model's θ costs a client per message, and the server per reply.

The header of a C-ordered array depends only on its dtype and shape, so it is built once per
(dtype, shape) with numpy's own writer (``numpy.lib.format.write_array_header_1_0``, the
version ``np.save`` writes for every header under 64 KiB) and cached:

* :func:`to_array`: header + the array's bytes in C order: the very bytes ``np.save`` writes
  for a C-contiguous array. Anything else (Fortran order, object dtypes) goes through Flower.
* :func:`from_array`: when an Array's bytes are exactly that header followed by
  ``prod(shape) × itemsize`` bytes, the values are read straight from them (a writable copy,
  as ``np.load`` gives); any other Array (another header, other lengths, another ``stype``,
  a malformed one) is read by Flower's ``Array.numpy``, which also raises its errors.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType
from numpy.lib import format as npy


@lru_cache(maxsize=512)
def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    npy.write_array_header_1_0(
        buffer, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def to_array(values: np.ndarray) -> Array:
    """``values`` as a Flower Array, the bytes ``Array.from_numpy_ndarray`` would hold."""
    if values.dtype.hasobject or not values.flags.c_contiguous:
        return Array.from_numpy_ndarray(values)
    shape = tuple(values.shape)
    data = npy_header(values.dtype, shape) + values.tobytes()
    return Array(dtype=str(values.dtype), shape=shape, stype=SType.NUMPY, data=data)


def from_array(array: Array) -> np.ndarray:
    """An Array's values, as ``array.numpy()`` returns them (a writable array of its own)."""
    values = _direct(array)
    return array.numpy() if values is None else values


def _direct(array: Array) -> np.ndarray | None:
    """The values read straight from a C-ordered ``.npy`` Array with the expected header, or
    None when the Array is anything else."""
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
        if array.stype != SType.NUMPY or dtype.hasobject or min(shape, default=0) < 0:
            return None
        header = npy_header(dtype, shape)
    except (TypeError, ValueError):
        return None
    data = array.data
    if len(data) != len(header) + math.prod(shape) * dtype.itemsize or not data.startswith(header):
        return None
    return np.frombuffer(data, dtype, offset=len(header)).reshape(shape).copy()
