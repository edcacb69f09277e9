"""What a shard refuses in a Lookup before or instead of answering (docs/overload.md, "Shard
Lookup limits"): caps from declared shapes, partitions no known shard map has, negative
versions, and pooled output that is not finite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.core.config import ShardConfig, ZkConfig
from services.core.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from services.core.types import PartitionId, PoolingType, TableSpec
from services.embedding_shard.limits import DeclaredGroup, LookupLimits, response_bytes
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore

SPEC = TableSpec("t", 12, 4)
SUM = PoolingType.SUM


def _store(layout: int, held: list[PartitionId], rows: np.ndarray | None = None) -> TableStore:
    table = np.arange(SPEC.rows * SPEC.dim, dtype=np.float32).reshape(SPEC.rows, SPEC.dim) if rows is None else rows
    store = TableStore({"t": SPEC}, {"t": layout})
    store.install(1, {pid: torch.from_numpy(table[pid.partition :: pid.num_partitions].copy()) for pid in held})
    return store


def _lookup(store, partition, ids, *, map_version, version=0, weights=None, out_dtype=np.float32):
    ids = np.asarray(ids, np.int64)
    w = None if weights is None else np.asarray(weights, np.float32)
    group = BagGroup("t", partition, SUM, ids, np.array([len(ids)], np.int32), w)
    return store.lookup([group], version=version, map_version=map_version, out_dtype=out_dtype).results[0][0]


def test_a_partition_no_known_map_has_is_invalid_whatever_the_map_version():
    """A whole table (P = 1): partition 7 used to be served with partition 0's rows whenever
    the request named a map version."""
    store = _store(1, [PartitionId("t", 0, 1)])
    for map_version in (0, 1, 99):
        with pytest.raises(InvalidArgumentError, match=r"table 't': partition 7 out of range \[0, 1\)"):
            _lookup(store, 7, [3], map_version=map_version)
        with pytest.raises(InvalidArgumentError, match="partition -1 out of range"):
            _lookup(store, -1, [3], map_version=map_version)
    _lookup(store, 0, [3], map_version=5)  # a map version it does not know: the rows are here


def test_a_partition_of_a_layout_seen_is_served_or_refused_as_not_held():
    """A rebalance from P = 2 to a whole table: requests routed with either map are served from
    the rows held, a partition of the old layout is FAILED_PRECONDITION where its rows are not
    held, and one beyond every layout seen is INVALID_ARGUMENT."""
    half = PartitionId("t", 0, 2)
    store = _store(2, [half])
    with pytest.raises(FailedPreconditionError, match="partition 1 is not held"):
        _lookup(store, 1, [1], map_version=1)
    with pytest.raises(InvalidArgumentError, match=r"partition 2 out of range \[0, 2\) in every shard map this node knows"):
        _lookup(store, 2, [0], map_version=1)
    store.set_layout({"t": 2}, also=[{"t": 3}])  # a target map with P = 3 seen
    with pytest.raises(FailedPreconditionError, match="partition 2 is not held"):
        _lookup(store, 2, [2], map_version=2)
    whole = PartitionId("t", 0, 1)
    store.add_partition(whole, {1: torch.from_numpy(np.arange(48, dtype=np.float32).reshape(12, 4))}, {})
    store.set_layout({"t": 1})  # the switch: P = 2 and 3 stay known
    store.remove_partition(half)
    np.testing.assert_array_equal(_lookup(store, 1, [1, 3], map_version=1), [[16.0, 18.0, 20.0, 22.0]])
    with pytest.raises(InvalidArgumentError, match=r"partition 3 out of range \[0, 3\)"):
        _lookup(store, 3, [3], map_version=1)


def test_negative_version_is_invalid_not_a_reroute():
    store = _store(1, [PartitionId("t", 0, 1)])
    with pytest.raises(InvalidArgumentError, match="version must be >= 0"):
        _lookup(store, 0, [1], map_version=1, version=-1)
    with pytest.raises(InvalidArgumentError, match="version must be >= 0"):
        store.lookup([], version=-1, map_version=1)
    with pytest.raises(FailedPreconditionError, match="version 2 is not ready"):
        _lookup(store, 0, [1], map_version=1, version=2)


def test_pooled_output_is_checked_finite():
    rows = np.ones((SPEC.rows, SPEC.dim), np.float32)
    rows[5] = 3e38
    store = _store(1, [PartitionId("t", 0, 1)], rows)
    with pytest.raises(FloatingPointError, match=r"groups\[0\] \(table 't' partition 0\): pooled output is not finite"):
        _lookup(store, 0, [5, 5], map_version=1)  # the table's own rows overflow: INTERNAL at the edge
    with pytest.raises(InvalidArgumentError, match="the cause is the per-id weights"):
        _lookup(store, 0, [5, 1], map_version=1, weights=[2.0, 1.0])
    with pytest.raises(InvalidArgumentError, match="beyond float16's range: ask for FLOAT32"):
        _lookup(store, 0, [1, 2], map_version=1, weights=[1e5, 1.0], out_dtype=np.float16)
    np.testing.assert_allclose(_lookup(store, 0, [1, 2], map_version=1, weights=[1e6, -1e6]), [[0.0] * 4])


def _declared(ids=0, bags=0, table="t"):
    return DeclaredGroup(table, 0, SUM, ids, bags, False)


def test_caps_sum_over_groups_and_bound_the_answer():
    limits = LookupLimits(max_ids=10, max_bags=100, max_response_bytes=2_000)
    dims = {"t": 4}
    limits.check([_declared(5, 50), _declared(5, 50)], {"t": 1}, 4)
    with pytest.raises(ResourceExhaustedError, match=r"11 ids, over this node's cap of 10 \(--max-ids\)"):
        limits.check([_declared(5, 1), _declared(6, 1)], dims, 4)
    with pytest.raises(ResourceExhaustedError, match=r"101 bags, over this node's cap of 100 \(--max-bags\)"):
        limits.check([_declared(0, 100), _declared(0, 1)], dims, 4)
    with pytest.raises(ResourceExhaustedError, match=r"over this node's cap of 2000 \(--max-message-bytes\)"):
        limits.check([_declared(0, 60), _declared(0, 40)], dims, 4)  # 100 bags x (16 + 4) bytes + framing
    limits.check([_declared(0, 60), _declared(0, 40)], dims, 2)  # float16: half the answer
    assert response_bytes([_declared(0, 10, table="nope")], dims, 4) < 200  # an unknown table: refused later


def test_default_caps_refuse_4m_empty_bags_before_building_an_answer():
    """The issue's request (16 MiB of lengths, no ids) reaches the handler under the default
    caps and is refused from its declared shape: no 272 MiB answer is built."""
    limits = LookupLimits.of(ShardConfig("n", ZkConfig("127.0.0.1:2181", "c")))
    assert limits.max_request_bytes > 16 << 20
    with pytest.raises(ResourceExhaustedError, match=r"4000000 bags, over this node's cap of 1000000 \(--max-bags\)"):
        limits.check([_declared(0, 4_000_000)], {"t": 16}, 4)
    with pytest.raises(ResourceExhaustedError, match="bag groups"):
        limits.check([_declared()] * 10_001, {"t": 16}, 4)
