"""The shard's own LookupRequest reader (``core.lookup_request``) against protobuf: the same
request, field for field, with the arrays left as views of the request's bytes; and for every
body protobuf refuses (the bad bodies of tests/integration/test_shard_bad_input.py and random
damage to good ones), the same refusal."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from services._proto.shardrec.v1 import embedding_pb2, tensor_pb2
from services.core import wire
from services.core.errors import InvalidArgumentError
from services.core.lookup_request import RawLookup, _NotCanonical, _Reader, from_message, parse_lookup_request
from services.core.types import PoolingType
from tests.integration.test_shard import request
from tests.integration.test_shard_bad_input import bad_inputs

SUM, MEAN = PoolingType.SUM, PoolingType.MEAN


def _flat(r: RawLookup) -> tuple:
    tensors = lambda g: tuple((t.dtype, t.shape, bytes(t.data)) for t in (g.ids, g.lengths, g.weights))  # noqa: E731
    return r.request_id, r.version, r.shard_map_version, r.output_dtype, tuple((g.table, g.partition, g.pooling, tensors(g)) for g in r.groups)


def _protobuf(payload: bytes) -> RawLookup:
    return from_message(embedding_pb2.LookupRequest.FromString(payload))


def _good() -> list[embedding_pb2.LookupRequest]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**40, 300)
    many = request([("users", 1, SUM, ids, [100, 0, 200], None), ("items", 0, MEAN, ids[:7], [7], None),
                    ("ünïcode", 0, SUM, ids[:3], [1, 2], [0.5, -1.0, 3.0])],
                   version=2**62, shard_map_version=300, output_dtype=tensor_pb2.DTYPE_FLOAT16)  # fmt: skip
    many.request_id = "b0-17 ✓"
    no_ids = request([("users", 0, SUM, np.empty(0, np.int64), np.zeros(4, np.int32), None)])
    partial = embedding_pb2.LookupRequest()
    partial.groups.add()  # every field at its default
    g = partial.groups.add(table="t")
    g.ids.dtype = tensor_pb2.DTYPE_INT64  # dtype only: no dims, no data
    g.lengths.dims.add(size=0)
    return [embedding_pb2.LookupRequest(), many, no_ids, partial]


@pytest.mark.parametrize("index", range(4))
def test_a_canonical_request_is_read_as_protobuf_reads_it_without_copying_its_arrays(index):
    payload = _good()[index].SerializeToString()
    got = _Reader(payload).request()  # the reader itself: no fallback to protobuf
    assert _flat(got) == _flat(_protobuf(payload))
    for g in got.groups:
        for t in (g.ids, g.lengths, g.weights):
            if len(t.data):
                assert isinstance(t.data, memoryview) and t.data.obj is payload
    if index == 1:
        ids = wire.decode(got.groups[0].ids, "ids", dtype="int64", ndim=1)
        assert not ids.flags.writeable and np.shares_memory(ids, np.frombuffer(payload, np.uint8))


def _same_outcome(payload: bytes) -> None:
    """parse_lookup_request and protobuf agree on ``payload``: the same request or the same
    refusal; and whenever the reader itself accepts it, protobuf reads the same."""
    try:
        want = _flat(_protobuf(payload))
    except DecodeError as e:
        with pytest.raises(InvalidArgumentError) as info:
            parse_lookup_request(payload)
        assert str(info.value) == f"malformed LookupRequest: {e}"
        with pytest.raises(_NotCanonical):
            _Reader(payload).request()
        return
    assert _flat(parse_lookup_request(payload)) == want
    try:
        fast = _Reader(payload).request()
    except _NotCanonical:
        return
    assert _flat(fast) == want


def test_bodies_the_shard_refuses_get_protobufs_refusal():
    """Every body of the integration test's bad inputs (read here without a cluster: a shard
    map of two nodes as plain data)."""
    users = SimpleNamespace(partitions=[["shard-0"], ["shard-1"]])
    cluster = SimpleNamespace(smap=SimpleNamespace(version=3, tables={"users": users}))
    bodies = [body for _, method, body, _, _ in bad_inputs(cluster) if method == "Lookup"]
    assert len(bodies) > 20
    for body in bodies:
        _same_outcome(body)


def test_damaged_and_merged_bodies_get_what_protobuf_makes_of_them():
    rng = np.random.default_rng(7)
    goods = [r.SerializeToString() for r in _good()]
    extra = [
        b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # version -1: a 10-byte varint
        b"\x28\xff\xff\xff\xff\x0f",  # output_dtype as a 5-byte varint
        b"\x78\x01",  # an unknown field
        b"\x22\x03\x10\x80\x01",  # a group with partition 128
        b"\x0a\x02\xc3\x28",  # request_id that is not UTF-8
        b"\x22\x04\x22\x02\x12\x00",  # ids with one empty Dim
        b"\x22\x06\x22\x04\x12\x02\x08\x05",  # ids declaring [5]
    ]
    cases = [*goods, *extra, goods[1] + goods[2], goods[2] + goods[2], goods[1] + extra[0]]
    for _ in range(600):
        body = bytearray(goods[int(rng.integers(1, len(goods)))])
        kind = int(rng.integers(0, 4))
        at = int(rng.integers(0, len(body)))
        if kind == 0:
            body[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            del body[at:]
        elif kind == 2:
            body[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
        else:
            body[at] = int(rng.integers(0, 256))
        cases.append(bytes(body))
    for body in cases:
        _same_outcome(body)
