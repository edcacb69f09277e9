"""One ``embedding_bag`` per held partition, pooling and weighting over all of a request's
groups (``Snapshot.batches``): the same answer as each group pooled alone, at the primary and at
an overlaid version, in every pooling mode, with weights; the same error as the first bad group
alone; and the finite check skipped only where the rows' bound proves it needless."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.core import pooling
from services.core.errors import InvalidArgumentError
from services.core.types import PartitionId, PoolingType, TableSpec
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore

ROWS, DIM, P = 600, 8, 2
SPEC = TableSpec("t", ROWS, DIM)
KEYS = [PartitionId("t", p, P) for p in range(P)]
SUM, MEAN, MAX = PoolingType.SUM, PoolingType.MEAN, PoolingType.MAX


def _store(table: np.ndarray) -> TableStore:
    store = TableStore({"t": SPEC}, {"t": P})
    store.install(1, {k: torch.from_numpy(table[k.partition :: P].copy()) for k in KEYS})
    return store


def _group(rng, partition: int, mode: PoolingType, *, weighted: bool = False, bags: int = 30) -> BagGroup:
    lengths = rng.integers(0, 9, size=bags).astype(np.int32)
    ids = (rng.integers(0, ROWS // P, size=int(lengths.sum())) * P + partition).astype(np.int64)
    weights = rng.uniform(-2, 2, size=len(ids)).astype(np.float32) if weighted else None
    return BagGroup("t", partition, mode, ids, lengths, weights)


@pytest.mark.parametrize("version", [2, 1], ids=["primary", "overlaid"])
def test_groups_pooled_together_equal_each_group_pooled_alone(version):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    store = _store(table)
    changed = np.unique(rng.integers(0, ROWS, 80))
    store.apply(2, {k: (changed[changed % P == k.partition] // P, torch.from_numpy(rng.standard_normal((int((changed % P == k.partition).sum()), DIM)).astype(np.float32))) for k in KEYS})
    groups = [
        _group(rng, 0, SUM), _group(rng, 1, MEAN), _group(rng, 0, SUM, weighted=True), _group(rng, 0, MAX),
        _group(rng, 0, SUM), _group(rng, 1, MEAN), _group(rng, 0, SUM, bags=0), _group(rng, 1, MAX),
        _group(rng, 0, SUM, weighted=True), _group(rng, 0, MEAN),
    ]  # fmt: skip
    snapshot = store.state
    keys = {(g.partition, g.pooling, g.weights is not None) for g in groups}
    assert len(snapshot.batches(groups, version, strict=True)) == len(keys)
    calls = []
    real = pooling.pool

    def counted(*args, **kw):
        calls.append(len(args[2]))
        return real(*args, **kw)

    pooling.pool = counted
    try:
        together = snapshot.lookup(groups, version=version, map_version=0).results
    finally:
        pooling.pool = real
    assert len(calls) <= 2 * len(keys)  # one per batch, two where an overlay splits it
    alone = [snapshot.lookup([g], version=version, map_version=0).results[0] for g in groups]
    for (got, counts), (want, want_counts), g in zip(together, alone, groups):
        assert got.shape == (len(g.lengths), DIM)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(counts, want_counts)
    held = store.partitions()[KEYS[0]]
    assert held.lookups == 2 * sum(g.partition == 0 for g in groups)  # groups, not batches


def test_a_bad_group_gets_the_error_it_gets_alone():
    store = _store(np.zeros((ROWS, DIM), np.float32))
    rng = np.random.default_rng(4)
    good, other = _group(rng, 0, SUM), _group(rng, 0, SUM)
    out_of_range = BagGroup("t", 0, SUM, np.array([0, 2 * ROWS], np.int64), np.array([2], np.int32))
    wrong_partition = BagGroup("t", 0, SUM, np.array([0, 3], np.int64), np.array([2], np.int32))
    unknown = BagGroup("nope", 0, SUM, np.array([0], np.int64), np.array([1], np.int32))
    for groups, message in [
        ([good, out_of_range, unknown, other], rf"table 't': id {2 * ROWS} out of range \[0, {ROWS}\)"),
        ([good, unknown, out_of_range], "unknown table 'nope'"),
        ([good, wrong_partition, other], "id 3 is not in partition 0 of 2"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            store.lookup(groups, version=0, map_version=0)


def test_the_finite_check_follows_the_rows_bound():
    table = np.ones((ROWS, DIM), np.float32)
    store = _store(table)
    ids, one = np.array([4, 4], np.int64), np.array([2], np.int32)
    np.testing.assert_array_equal(store.lookup([BagGroup("t", 0, SUM, ids, one)], version=0, map_version=0).results[0][0], [[2.0] * DIM])
    # a delta brings rows near float32's limit: the bound rises before they are served
    store.apply(2, {KEYS[0]: (np.array([2]), torch.full((1, DIM), 3e38))})
    with pytest.raises(FloatingPointError, match="pooled output is not finite"):
        store.lookup([BagGroup("t", 0, SUM, ids, one)], version=0, map_version=0)
    with pytest.raises(InvalidArgumentError, match="beyond float16's range"):
        store.lookup([BagGroup("t", 0, SUM, np.array([0], np.int64), np.array([1], np.int32), np.array([1e5], np.float32))],
                     version=0, map_version=0, out_dtype=np.float16)  # fmt: skip
    nan = table.copy()
    nan[7] = np.nan
    with pytest.raises(FloatingPointError):
        _store(nan).lookup([BagGroup("t", 1, MAX, np.array([7], np.int64), np.array([1], np.int32))], version=0, map_version=0)
