"""A ``LookupRequest`` read straight from its wire bytes, its arrays left where they arrived
(docs/overload.md, "Shard Lookup limits"; docs/benchmarks.md, "Lookup micro-benchmark").

A Lookup carries megabytes of ids. Parsing it with protobuf copies them into the message, and
reading a ``bytes`` field copies them out again; ``parse_lookup_request`` reads the protobuf
wire format itself and hands out read-only views (``memoryview`` slices) of the request's own
bytes, as ``wire.encode_lookup_response`` writes the answer by hand.

It reads only the canonical encoding a protobuf library writes: known fields with their wire
types, each singular field at most once, varints of up to 9 bytes (every non-negative value),
valid UTF-8 strings. Anything else (an unknown or repeated field, a negative varint, a
truncated or malformed body) goes to protobuf, which either parses it (then converted, with
copies) or refuses it with its own message: the result and the refusals are protobuf's in
every case (tests/unit/test_lookup_request.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from services._proto.shardrec.v1 import embedding_pb2, tensor_pb2
from services.core.errors import InvalidArgumentError

_VARINT, _LEN = 0, 2


def _numbers(message) -> dict[str, int]:  # noqa: ANN001 - a generated message class
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


_REQ = _numbers(embedding_pb2.LookupRequest)
_GROUP = _numbers(embedding_pb2.BagGroup)
_TENSOR = _numbers(tensor_pb2.Tensor)
_DIM = _numbers(tensor_pb2.Tensor.Dim)


def _tag(name: str, numbers: dict[str, int], wire_type: int) -> int:
    tag = numbers[name] << 3 | wire_type
    assert tag < 0x80, name  # one-byte tags: fields 1-15
    return tag


# The tags of the canonical encoding, each in one byte.
_T_REQUEST_ID, _T_VERSION, _T_MAP_VERSION, _T_GROUPS, _T_OUTPUT = (
    _tag("request_id", _REQ, _LEN), _tag("version", _REQ, _VARINT), _tag("shard_map_version", _REQ, _VARINT),
    _tag("groups", _REQ, _LEN), _tag("output_dtype", _REQ, _VARINT),
)  # fmt: skip
_T_TABLE, _T_PARTITION, _T_POOLING, _T_IDS, _T_LENGTHS, _T_WEIGHTS = (
    _tag("table", _GROUP, _LEN), _tag("partition", _GROUP, _VARINT), _tag("pooling", _GROUP, _VARINT),
    _tag("ids", _GROUP, _LEN), _tag("lengths", _GROUP, _LEN), _tag("weights", _GROUP, _LEN),
)  # fmt: skip
_T_DTYPE, _T_DIMS, _T_DATA = _tag("dtype", _TENSOR, _VARINT), _tag("dims", _TENSOR, _LEN), _tag("data", _TENSOR, _LEN)
_T_SIZE = _tag("size", _DIM, _VARINT)


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A ``Tensor`` as sent: its dtype (a ``tensor_pb2.DType`` value), declared shape and bytes
    (a view of the request's bytes; nothing checked yet: ``wire.declared_shape``, ``wire.decode``)."""

    dtype: int = tensor_pb2.DTYPE_UNSPECIFIED
    shape: tuple[int, ...] = ()
    data: memoryview | bytes = b""


@dataclass(frozen=True, slots=True)
class RawGroup:
    """A ``BagGroup`` as sent (``pooling`` an ``embedding_pb2.Pooling`` value)."""

    table: str = ""
    partition: int = 0
    pooling: int = 0
    ids: RawTensor = RawTensor()
    lengths: RawTensor = RawTensor()
    weights: RawTensor = RawTensor()


@dataclass(frozen=True, slots=True)
class RawLookup:
    """A ``LookupRequest`` as sent; ``groups`` in the request's order."""

    request_id: str = ""
    version: int = 0
    shard_map_version: int = 0
    groups: tuple[RawGroup, ...] = ()
    output_dtype: int = tensor_pb2.DTYPE_UNSPECIFIED


def parse_lookup_request(payload: bytes) -> RawLookup:
    """``payload`` read as a LookupRequest (see the module docstring); INVALID_ARGUMENT
    "malformed LookupRequest: <protobuf's message>" when it is not one."""
    try:
        return _Reader(payload).request()
    except _NotCanonical:
        pass
    try:
        message = embedding_pb2.LookupRequest.FromString(payload)
    except DecodeError as e:
        raise InvalidArgumentError(f"malformed LookupRequest: {e}") from None
    return from_message(message)


def from_message(message: embedding_pb2.LookupRequest) -> RawLookup:
    """A parsed message in the same form (its arrays copied out of it)."""
    return RawLookup(
        message.request_id, message.version, message.shard_map_version,
        tuple(RawGroup(g.table, g.partition, g.pooling, _raw(g.ids), _raw(g.lengths), _raw(g.weights)) for g in message.groups),
        message.output_dtype,
    )  # fmt: skip


def _raw(t: tensor_pb2.Tensor) -> RawTensor:
    return RawTensor(t.dtype, tuple(d.size for d in t.dims), t.data)


class _NotCanonical(Exception):
    """Not the canonical encoding this reader knows: protobuf decides."""


_NOT_CANONICAL = _NotCanonical()
_INT32 = 1 << 31


class _Reader:
    """One pass over a request's bytes. Every method raises ``_NotCanonical`` at the first
    byte it does not expect."""

    __slots__ = ("buf", "view")

    def __init__(self, payload: bytes) -> None:
        self.buf = bytes(payload)  # no copy when it is bytes already (what gRPC hands over)
        self.view = memoryview(self.buf)

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        """(value, next position) of a varint of at most 9 bytes (0 .. 2^63 - 1)."""
        buf = self.buf
        if pos >= end:
            raise _NOT_CANONICAL
        b = buf[pos]
        if b < 0x80:
            return b, pos + 1
        value, shift, pos = b & 0x7F, 7, pos + 1
        while pos < end and shift < 63:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, pos
            shift += 7
        raise _NOT_CANONICAL  # truncated, or 10 bytes (a negative value): protobuf's rules

    def span(self, pos: int, end: int) -> tuple[int, int]:
        """(start, end) of a length-delimited field's body."""
        n, pos = self.varint(pos, end)
        if pos + n > end:
            raise _NOT_CANONICAL
        return pos, pos + n

    def string(self, start: int, stop: int) -> str:
        try:
            return self.buf[start:stop].decode("utf-8")
        except UnicodeDecodeError:
            raise _NOT_CANONICAL from None

    def request(self) -> RawLookup:
        pos, end = 0, len(self.buf)
        seen: set[int] = set()
        request_id, version, map_version, output = "", 0, 0, tensor_pb2.DTYPE_UNSPECIFIED
        groups = []
        while pos < end:
            tag = self.buf[pos]
            pos += 1
            if tag == _T_GROUPS:
                start, pos = self.span(pos, end)
                groups.append(self.group(start, pos))
                continue
            if tag in seen:
                raise _NOT_CANONICAL  # a singular field twice: protobuf merges
            seen.add(tag)
            if tag == _T_VERSION:
                version, pos = self.varint(pos, end)
            elif tag == _T_MAP_VERSION:
                map_version, pos = self.varint(pos, end)
            elif tag == _T_OUTPUT:
                output, pos = self.varint(pos, end)
                output = _int32(output)
            elif tag == _T_REQUEST_ID:
                start, pos = self.span(pos, end)
                request_id = self.string(start, pos)
            else:
                raise _NOT_CANONICAL
        return RawLookup(request_id, version, map_version, tuple(groups), output)

    def group(self, pos: int, end: int) -> RawGroup:
        seen: set[int] = set()
        table, partition, pooling = "", 0, 0
        ids = lengths = weights = _EMPTY
        while pos < end:
            tag = self.buf[pos]
            pos += 1
            if tag in seen:
                raise _NOT_CANONICAL
            seen.add(tag)
            if tag == _T_IDS or tag == _T_LENGTHS or tag == _T_WEIGHTS:
                start, pos = self.span(pos, end)
                t = self.tensor(start, pos)
                if tag == _T_IDS:
                    ids = t
                elif tag == _T_LENGTHS:
                    lengths = t
                else:
                    weights = t
            elif tag == _T_TABLE:
                start, pos = self.span(pos, end)
                table = self.string(start, pos)
            elif tag == _T_PARTITION:
                partition, pos = self.varint(pos, end)
                partition = _int32(partition)
            elif tag == _T_POOLING:
                pooling, pos = self.varint(pos, end)
                pooling = _int32(pooling)
            else:
                raise _NOT_CANONICAL
        return RawGroup(table, partition, pooling, ids, lengths, weights)

    def tensor(self, pos: int, end: int) -> RawTensor:
        dtype, dims = tensor_pb2.DTYPE_UNSPECIFIED, []
        data: memoryview | bytes = b""
        seen_dtype = seen_data = False
        while pos < end:
            tag = self.buf[pos]
            pos += 1
            if tag == _T_DIMS:
                start, pos = self.span(pos, end)
                size = 0
                if start < pos:  # a Dim of size 0 may be written empty
                    if self.buf[start] != _T_SIZE:
                        raise _NOT_CANONICAL
                    size, after = self.varint(start + 1, pos)
                    if after != pos:
                        raise _NOT_CANONICAL
                dims.append(size)
            elif tag == _T_DATA and not seen_data:
                start, pos = self.span(pos, end)
                data, seen_data = self.view[start:pos], True
            elif tag == _T_DTYPE and not seen_dtype:
                dtype, pos = self.varint(pos, end)
                dtype, seen_dtype = _int32(dtype), True
            else:
                raise _NOT_CANONICAL
        return RawTensor(dtype, tuple(dims), data)


_EMPTY = RawTensor()


def _int32(value: int) -> int:
    """An int32 or enum field's value (a non-negative one: a negative value takes 10 bytes on
    the wire, and one past 2^31 - 1 is not what a protobuf library writes)."""
    if value >= _INT32:
        raise _NOT_CANONICAL
    return value
