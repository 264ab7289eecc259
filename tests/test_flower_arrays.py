"""fedmaml's Array codec against Flower's own: the same bytes in, the same arrays out, and
Flower's behaviour (values or error) for every Array it does not read itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedmaml.federated.arrays import from_array, to_array
from fedmaml.federated.records import from_record, to_record

DTYPES = ["float32", "float64", "float16", "int64", "int8", "uint8", "bool", ">f4", "complex64"]
SHAPES = [(), (0,), (1,), (7,), (40, 1), (3, 0, 2), (2, 3, 4)]


def values(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(abs(hash((dtype, shape))) % 2**32)
    return np.asarray(rng.standard_normal(shape) * 100).astype(dtype)


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_encodes_flowers_bytes_and_decodes_flowers_arrays(dtype, shape):
    x = values(dtype, shape)
    ours, flowers = to_array(x), Array.from_numpy_ndarray(x)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )
    decoded = from_array(flowers)
    same(decoded, flowers.numpy())
    assert decoded.flags.writeable and decoded.flags.owndata


@pytest.mark.parametrize(
    "layout",
    [
        lambda x: np.asfortranarray(x),  # Fortran order: np.save writes fortran_order True
        lambda x: x[:, ::2],  # neither C- nor F-contiguous
        lambda x: x.T,
    ],
)
def test_other_layouts_are_flowers_bytes_too(layout):
    x = layout(values("float32", (4, 6)))
    ours, flowers = to_array(x), Array.from_numpy_ndarray(x)
    assert ours.data == flowers.data
    same(from_array(ours), x)


def with_data(array: Array, data: bytes, **fields) -> Array:
    return Array(
        dtype=fields.get("dtype", array.dtype),
        shape=fields.get("shape", tuple(array.shape)),
        stype=fields.get("stype", array.stype),
        data=data,
    )


def flower_outcome(array: Array):
    try:
        return array.numpy()
    except Exception as exc:  # the error Flower raises is the expectation
        return exc


@pytest.mark.parametrize(
    "tamper",
    [
        lambda a: with_data(a, a.data[:-4]),  # truncated
        lambda a: with_data(a, a.data + b"\0" * 8),  # trailing bytes: np.load ignores them
        lambda a: with_data(a, a.data[:20] + b"X" + a.data[21:]),  # a damaged header
        lambda a: with_data(a, a.data, shape=(6, 4)),  # fields disagree with the header
        lambda a: with_data(a, a.data, dtype="float64"),
        lambda a: with_data(a, a.data, dtype="no-such-dtype"),
        lambda a: with_data(a, a.data, stype="torch.raw"),
        lambda a: with_data(a, b""),
        lambda a: with_data(a, b"garbage"),
    ],
)
def test_any_other_array_is_read_as_flower_reads_it(tamper):
    array = tamper(Array.from_numpy_ndarray(values("float32", (4, 6))))
    expected = flower_outcome(array)
    if isinstance(expected, Exception):
        with pytest.raises(type(expected)):
            from_array(array)
    else:
        same(from_array(array), expected)


def test_a_big_endian_file_under_a_native_dtype_name_is_read_by_flower():
    x = values(">f4", (3, 2))
    buffer = io.BytesIO()
    np.save(buffer, x)
    array = Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=buffer.getvalue())
    same(from_array(array), array.numpy())


def test_records_round_trip_like_flowers_state_dict():
    params = {"w": torch.randn(40, 1, requires_grad=True), "b": torch.randn(40).double()}
    ours, flowers = to_record(params), ArrayRecord({k: v.detach() for k, v in params.items()})
    assert list(ours) == list(flowers)
    assert all(ours[k].data == flowers[k].data for k in params)
    back, reference = from_record(flowers), flowers.to_torch_state_dict()
    assert list(back) == list(reference)
    for k in params:
        assert back[k].dtype == reference[k].dtype and torch.equal(back[k], reference[k])


class Unparsed(Array):
    """An Array that np.load must not be asked to read."""

    def numpy(self) -> np.ndarray:
        raise AssertionError("parsed by np.load")


@pytest.mark.parametrize("dtype", ["float32", "float64", ">f4", "bool"])
def test_flowers_own_arrays_are_read_without_np_load(dtype):
    flowers = Array.from_numpy_ndarray(values(dtype, (40, 1)))
    array = Unparsed(flowers.dtype, tuple(flowers.shape), flowers.stype, flowers.data)
    same(from_array(array), flowers.numpy())
