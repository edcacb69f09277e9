"""numpy arrays <-> ``shardrec.v1.Tensor`` as raw little-endian bytes (dtype + dims + data).

Decoding is zero-copy (``np.frombuffer`` over the message's bytes, read-only) and validates that
the bytes agree with the declared dtype and shape; a mismatch raises InvalidArgumentError naming
the field. It reads a ``Tensor`` message or a ``lookup_request.RawTensor`` (a request's tensor
read without protobuf) alike.
"""

from __future__ import annotations

import math

import numpy as np

from services._proto.shardrec.v1 import tensor_pb2
from services.core.errors import InvalidArgumentError
from services.core.lookup_request import RawTensor

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


def declared_shape(t: tensor_pb2.Tensor | RawTensor, field: str, *, dtype: str, ndim: int) -> tuple[int, ...]:
    """The shape ``t`` declares, after checking its dtype is ``dtype``, it has ``ndim``
    dimensions and none is negative, without touching its bytes (so a caller can check caps
    before anything is copied). InvalidArgumentError naming ``field`` otherwise."""
    want = np.dtype(dtype).newbyteorder("<")
    got = _TO_NP.get(t.dtype)
    if got != want:
        raise InvalidArgumentError(f"{field}: dtype must be {want.name}, got {tensor_pb2.DType.Name(t.dtype) if t.dtype in _TO_NP else t.dtype}")
    shape = t.shape if isinstance(t, RawTensor) else tuple(d.size for d in t.dims)
    if len(shape) != ndim:
        raise InvalidArgumentError(f"{field}: expected {ndim} dimension(s), got shape {list(shape)}")
    if any(n < 0 for n in shape):
        raise InvalidArgumentError(f"{field}: negative dimension in shape {list(shape)}")
    return shape


def decode(t: tensor_pb2.Tensor | RawTensor, field: str, *, dtype: str, ndim: int) -> np.ndarray:
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


def is_set(t: tensor_pb2.Tensor | RawTensor) -> bool:
    """True when the optional tensor field carries a value (a dtype was given)."""
    return t.dtype != tensor_pb2.DTYPE_UNSPECIFIED


# -- hand-encoded LookupResponse -------------------------------------------------------------
# A Lookup answer is megabytes of pooled vectors. Building it as a message and serializing it
# copies every byte three times (tobytes, into the message, out of it); writing the protobuf
# wire format directly copies them once. Byte-for-byte what upb writes (tests/unit/test_wire.py).


_SMALL = [bytes([n]) for n in range(0x80)]  # one-byte varints, the common case
_DTYPE_HEAD = {np.dtype(k).newbyteorder("="): b"\x08" + bytes([v]) for k, v in _FROM_NP.items()}


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tensor(tag: bytes, array: np.ndarray) -> list:
    """A Tensor field (``tag`` and length first), its data as a view of ``array``'s bytes."""
    arr = np.ascontiguousarray(array)
    head = _DTYPE_HEAD.get(arr.dtype)
    if head is None:  # a byte order other than this machine's
        head = b"\x08" + _varint(_FROM_NP[arr.dtype.newbyteorder("<")])
    for n in arr.shape:
        head += b"\x12\x00" if n == 0 else b"\x12" + _varint(1 + len(_varint(n))) + b"\x08" + _varint(n)
    n = arr.nbytes
    if not n:
        return [tag + _varint(len(head)) + head]
    head += b"\x1a" + _varint(n)
    return [tag + _varint(len(head) + n) + head, memoryview(arr).cast("B")]


def encode_lookup_response(version: int, shard_map_version: int, results: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Serialized ``LookupResponse`` with one PooledGroup per ``(pooled, counts)``."""
    parts: list = []
    if version:
        parts.append(b"\x08" + _varint(version))
    if shard_map_version:
        parts.append(b"\x10" + _varint(shard_map_version))
    for pooled, counts in results:
        group = _tensor(b"\x0a", pooled) + _tensor(b"\x12", counts)
        parts.append(b"\x1a" + _varint(sum(len(p) for p in group)))
        parts += group
    return b"".join(parts)
