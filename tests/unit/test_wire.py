import numpy as np
import pytest

from services._proto.shardrec.v1 import tensor_pb2
from services.core import wire
from services.core.errors import InvalidArgumentError


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_round_trip(dtype):
    a = (np.arange(12).reshape(3, 4) * 3).astype(dtype)
    t = tensor_pb2.Tensor.FromString(wire.encode(a).SerializeToString())
    np.testing.assert_array_equal(wire.decode(t, "x", dtype=dtype, ndim=2), a)


def test_bytes_disagreeing_with_shape_are_refused():
    t = wire.encode(np.arange(6, dtype=np.int64))
    t.data = t.data[:-3]
    with pytest.raises(InvalidArgumentError, match=r"ids: shape \[6\] of int64 needs 48 bytes, got 45"):
        wire.decode(t, "ids", dtype="int64", ndim=1)


def test_wrong_dtype_and_rank_are_refused():
    t = wire.encode(np.zeros(3, dtype=np.int32))
    with pytest.raises(InvalidArgumentError, match="lengths: dtype must be int64"):
        wire.decode(t, "lengths", dtype="int64", ndim=1)
    with pytest.raises(InvalidArgumentError, match="expected 2 dimension"):
        wire.decode(t, "lengths", dtype="int32", ndim=2)


@pytest.mark.parametrize("bags", [0, 1, 3, 200])
def test_hand_encoded_lookup_response_is_what_protobuf_writes(bags):
    from services._proto.shardrec.v1 import embedding_pb2

    rng = np.random.default_rng(bags)
    results = [
        (rng.standard_normal((bags, 16)).astype(np.float32), rng.integers(0, 9, bags).astype(np.int32)),
        (rng.standard_normal((bags, 16)).astype(np.float16), np.zeros(bags, np.int32)),
    ]
    for version, map_version in ((0, 0), (7, 300)):
        want = embedding_pb2.LookupResponse(version=version, shard_map_version=map_version)
        for pooled, counts in results:
            r = want.results.add()
            wire.encode(pooled, r.pooled)
            wire.encode(counts, r.counts)
        got = wire.encode_lookup_response(version, map_version, results)
        assert got == want.SerializeToString(deterministic=True)
        parsed = embedding_pb2.LookupResponse.FromString(got)
        np.testing.assert_array_equal(wire.decode(parsed.results[0].pooled, "p", dtype="float32", ndim=2), results[0][0])
