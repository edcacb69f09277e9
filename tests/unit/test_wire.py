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
