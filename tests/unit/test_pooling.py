"""Serving pooling (torch embedding_bag, row-wise split/merge) against the reference pooling."""

import numpy as np
import pytest
import torch

from services.core import pooling, sharding
from services.core.reference import reference_pool
from services.core.types import PoolingType

RTOL, ATOL = 1e-5, 1e-6


def random_bags(rng, rows, bags, max_len):
    lengths = rng.integers(0, max_len + 1, size=bags).astype(np.int32)
    lengths[0] = 0  # an empty bag first
    ids = rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64)
    if len(ids) >= 2:
        ids[0], ids[-1] = 0, rows - 1  # first and last rows
    return ids, lengths


@pytest.mark.parametrize(
    "mode, weighted",
    [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.MAX, False), (PoolingType.SUM, True)],
    ids=["sum", "mean", "max", "weighted-sum"],
)
def test_pool_matches_reference(mode, weighted):
    rng = np.random.default_rng(7)
    table = rng.standard_normal((1000, 8)).astype(np.float32)
    ids, lengths = random_bags(rng, 1000, 64, 9)
    weights = rng.random(len(ids)).astype(np.float32) if weighted else None
    got = pooling.pool(torch.from_numpy(table), ids, lengths, mode, weights)
    want = reference_pool(table, ids, lengths, mode, weights)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_weights_with_mean_are_refused():
    from services.core.errors import InvalidArgumentError

    table = torch.zeros(4, 2)
    with pytest.raises(InvalidArgumentError, match="sum pooling"):
        pooling.pool(table, np.array([1]), np.array([1], np.int32), PoolingType.MEAN, np.ones(1, np.float32))


@pytest.mark.parametrize("num_partitions", [2, 3, 5])
@pytest.mark.parametrize("mode", list(PoolingType))
def test_row_wise_split_merge_matches_reference(num_partitions, mode):
    rng = np.random.default_rng(num_partitions)
    rows = 997
    table = rng.standard_normal((rows, 8)).astype(np.float32)
    ids, lengths = random_bags(rng, rows, 50, 12)
    weights = rng.random(len(ids)).astype(np.float32) if mode is PoolingType.SUM else None
    partials = []
    for sub in sharding.split_bags(ids, lengths, num_partitions, weights):
        assert np.all(sub.ids % num_partitions == sub.partition)
        local = torch.from_numpy(np.ascontiguousarray(table[sub.partition :: num_partitions]))
        pooled = pooling.pool(local, sub.ids // num_partitions, sub.lengths, sharding.partial_pooling(mode), sub.weights)
        partials.append((pooled, sub.lengths))
    got = sharding.merge_partials(partials, mode)
    want = reference_pool(table, ids, lengths, mode, weights)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_split_keeps_every_id_once():
    ids = np.array([5, 2, 7, 4, 9, 0], dtype=np.int64)
    lengths = np.array([2, 0, 3, 1], dtype=np.int32)
    parts = sharding.split_bags(ids, lengths, 2)
    assert [p.ids.tolist() for p in parts] == [[2, 4, 0], [5, 7, 9]]
    assert [p.lengths.tolist() for p in parts] == [[1, 0, 1, 1], [1, 0, 2, 0]]
