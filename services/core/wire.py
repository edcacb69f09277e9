"""numpy arrays <-> ``shardrec.v1.Tensor`` as raw little-endian bytes (dtype + dims + data).

Decoding is zero-copy (``np.frombuffer`` over the message's bytes, read-only) and validates that
the bytes agree with the declared dtype and shape; a mismatch raises InvalidArgumentError naming
the field.
"""

from __future__ import annotations

import math

import numpy as np

from services._proto.shardrec.v1 import tensor_pb2
from services.core.errors import InvalidArgumentError

_TO_NP = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NP = {v: k for k, v in _TO_NP.items()}


def encode(array: np.ndarray, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Fill ``out`` (or a new Tensor) with ``array``'s dtype, shape and bytes."""
    arr = np.ascontiguousarray(array)
    dt = _FROM_NP.get(arr.dtype.newbyteorder("<"))
    if dt is None:
        raise TypeError(f"unsupported dtype for the wire: {arr.dtype}")
    t = tensor_pb2.Tensor() if out is None else out
    t.dtype = dt
    del t.dims[:]
    for n in arr.shape:
        t.dims.add(size=n)
    t.data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def declared_shape(t: tensor_pb2.Tensor, field: str, *, dtype: str, ndim: int) -> tuple[int, ...]:
    """The shape ``t`` declares, after checking its dtype is ``dtype``, it has ``ndim``
    dimensions and none is negative, without touching its bytes (so a caller can check caps
    before anything is copied). InvalidArgumentError naming ``field`` otherwise."""
    want = np.dtype(dtype).newbyteorder("<")
    got = _TO_NP.get(t.dtype)
    if got != want:
        raise InvalidArgumentError(f"{field}: dtype must be {want.name}, got {tensor_pb2.DType.Name(t.dtype) if t.dtype in _TO_NP else t.dtype}")
    shape = tuple(d.size for d in t.dims)
    if len(shape) != ndim:
        raise InvalidArgumentError(f"{field}: expected {ndim} dimension(s), got shape {list(shape)}")
    if any(n < 0 for n in shape):
        raise InvalidArgumentError(f"{field}: negative dimension in shape {list(shape)}")
    return shape


def decode(t: tensor_pb2.Tensor, field: str, *, dtype: str, ndim: int) -> np.ndarray:
    """Decode ``t`` as a read-only array of ``dtype`` with ``ndim`` dimensions.

    Raises InvalidArgumentError naming ``field`` when the dtype, rank or byte count is wrong.
    """
    shape = declared_shape(t, field, dtype=dtype, ndim=ndim)
    want = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * want.itemsize  # Python ints: a huge declared shape cannot wrap
    data = t.data  # each access of a bytes field copies it out of the message: read it once
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{field}: shape {list(shape)} of {want.name} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=want).reshape(shape)


def is_set(t: tensor_pb2.Tensor) -> bool:
    """True when the optional tensor field carries a value (a dtype was given)."""
    return t.dtype != tensor_pb2.DTYPE_UNSPECIFIED


# -- hand-encoded LookupResponse -------------------------------------------------------------
# A Lookup answer is megabytes of pooled vectors. Building it as a message and serializing it
# copies every byte three times (tobytes, into the message, out of it); writing the protobuf
# wire format directly copies them once. Byte-for-byte what upb writes (tests/unit/test_wire.py).


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tensor_parts(array: np.ndarray) -> list:
    arr = np.ascontiguousarray(array)
    dt = _FROM_NP[arr.dtype.newbyteorder("<")]
    head = bytearray(b"\x08" + _varint(dt))
    for n in arr.shape:
        dim = b"\x08" + _varint(n) if n else b""
        head += b"\x12" + _varint(len(dim)) + dim
    parts = [bytes(head)]
    if arr.nbytes:
        parts += [b"\x1a" + _varint(arr.nbytes), memoryview(arr).cast("B")]
    return parts


def _message(tag: int, parts: list) -> list:
    size = sum(len(p) for p in parts)
    return [bytes([tag]) + _varint(size), *parts]


def encode_lookup_response(version: int, shard_map_version: int, results: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Serialized ``LookupResponse`` with one PooledGroup per ``(pooled, counts)``."""
    parts: list = []
    if version:
        parts.append(b"\x08" + _varint(version))
    if shard_map_version:
        parts.append(b"\x10" + _varint(shard_map_version))
    for pooled, counts in results:
        group = _message(0x0A, _tensor_parts(pooled)) + _message(0x12, _tensor_parts(counts))
        parts += _message(0x1A, group)
    return b"".join(parts)
