"""The frontend's embedding cache (docs/cache.md), without a process: its index and frequency
sketch against plain Python models, admission (a scan does not flush the hot rows), eviction
within the byte bound, precise invalidation by a delta's changed ids, a rollback, a branch and a
new base; and ``CachedLookupClient`` in front of an in-process lookup at any version, every
pooled vector equal to ``core.reference`` at its version."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.core import synth
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.delta import compact_version
from services.core.checkpoint.writer import write_delta
from services.core.reference import reference_pool
from services.core.types import FeatureSide, Version
from services.frontend.batch import Bags
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats
from services.frontend.lookup.cache.client import CachedLookupClient
from services.frontend.lookup.cache.store import RowCache, capacity_for, version_changes
from services.frontend.lookup.cache.table import FrequencySketch, SlotIndex, mix

SPEC = synth.model_spec("small")
ROW_BYTES = SPEC.dense_arch.embedding_dim * 4
RTOL, ATOL = 1e-5, 1e-6


def test_slot_index_agrees_with_a_dict_through_puts_and_deletes():
    rng = np.random.default_rng(1)
    index, model = SlotIndex(2000), {}
    for _ in range(300):
        fresh = np.setdiff1d(np.unique(rng.integers(0, 1 << 44, int(rng.integers(1, 40)))), np.fromiter(model, np.int64))
        fresh = fresh[: max(0, 2000 - len(model))]
        slots = rng.integers(0, 2000, len(fresh)).astype(np.int32)
        placed = index.put(fresh, slots)
        model.update({int(k): int(s) for k, s, p in zip(fresh, slots, placed) if p})
        if model and rng.random() < 0.5:
            gone = rng.choice(np.fromiter(model, np.int64), size=min(len(model), 25), replace=False)
            held = index.delete(np.concatenate([gone, [1 << 45]]))
            assert held.tolist() == [model.pop(int(k)) for k in gone] + [-1]
        probe = np.concatenate([np.fromiter(model, np.int64), rng.integers(0, 1 << 44, 50)])
        assert index.get(probe).tolist() == [model.get(int(k), -1) for k in probe]
    assert index.live == len(model) and len(model) > 1000


def test_sketch_never_underestimates_until_it_ages_then_halves():
    rng = np.random.default_rng(2)
    sketch = FrequencySketch(1000)
    keys = np.arange(500, dtype=np.int64) * 7919
    true = np.zeros(500, dtype=np.int64)
    for _ in range(8):
        counts = rng.integers(0, 3, 500)
        sketch.add(mix(keys[counts > 0]), counts[counts > 0])
        true += counts
    assert sketch.resets == 0 and (sketch.estimate(mix(keys)) >= np.minimum(true, 255)).all()
    before = sketch.estimate(mix(keys))
    sketch.add(mix(np.array([1])), np.array([sketch.sample]))  # pass the sample size
    assert sketch.resets == 1 and (sketch.estimate(mix(keys)) <= before // 2 + 1).all()


def rows_for(keys: np.ndarray) -> np.ndarray:
    return np.repeat((keys % 1000).astype(np.float32)[:, None], SPEC.dense_arch.embedding_dim, axis=1)


def test_capacity_fits_the_byte_bound():
    for budget in (10_000, 123_456, 1 << 20, 5 << 20):
        n = capacity_for(budget, SPEC.dense_arch.embedding_dim)
        cache = RowCache(SPEC, budget, 1)
        assert cache.capacity == n and cache.nbytes <= budget
        assert n * ROW_BYTES > budget // 3  # the rows take most of it


def test_a_scan_of_rows_seen_once_does_not_flush_the_hot_rows():
    cache = RowCache(SPEC, 200 * (ROW_BYTES + 64), 1)
    hot = cache.keys("items", np.arange(cache.capacity, dtype=np.int64))
    for _ in range(5):
        cache.record(hot, np.ones(len(hot), dtype=np.int64))
    assert cache.offer(hot, rows_for(hot)) == cache.capacity
    scan = cache.keys("items", np.arange(1000, 4000, dtype=np.int64))
    for chunk in np.array_split(scan, 30):  # rows read once each, 15x the capacity, while the hot rows are still read
        cache.record(hot, np.ones(len(hot), dtype=np.int64))
        cache.record(chunk, np.ones(len(chunk), dtype=np.int64))
        cache.offer(chunk, rows_for(chunk))
    # A few scan rows share all four sketch counters with hot rows (count-min overestimates:
    # 11 of 3,000 here); an LRU would keep none of the hot rows.
    assert (cache.find(hot) >= 0).mean() >= 0.9 and cache.evicted <= 0.1 * cache.capacity
    assert cache.rejected >= len(scan) - cache.evicted and cache.rows_held == cache.capacity


def test_more_frequent_rows_displace_the_least_frequent_within_the_bound():
    cache = RowCache(SPEC, 200 * (ROW_BYTES + 64), 1)
    old = cache.keys("items", np.arange(cache.capacity, dtype=np.int64))
    cache.record(old, np.ones(len(old), dtype=np.int64))
    cache.offer(old, rows_for(old))
    new = cache.keys("tags", np.arange(50, dtype=np.int64))
    cache.record(new, np.full(len(new), 4, dtype=np.int64))
    assert cache.offer(new, rows_for(new)) == 50 and cache.evicted == 50
    assert (cache.find(new) >= 0).all() and cache.rows_held == cache.capacity
    slots = cache.find(new)
    np.testing.assert_array_equal(cache.read(slots), rows_for(new))
    assert cache.nbytes <= 200 * (ROW_BYTES + 64)


def test_advance_drops_exactly_the_changed_rows_or_a_whole_table():
    cache = RowCache(SPEC, 1 << 20, 1)
    items = cache.keys("items", np.arange(100, dtype=np.int64))
    tags = cache.keys("tags", np.arange(40, dtype=np.int64))
    both = np.concatenate([items, tags])
    cache.record(both, np.ones(len(both), dtype=np.int64))
    cache.offer(both, rows_for(both))
    assert cache.advance(1, 2, {"items": np.array([3, 50, 4000]), "users": np.array([1])}) == 2
    held = cache.find(items) >= 0
    assert not held[[3, 50]].any() and held.sum() == 98 and (cache.find(tags) >= 0).all()
    assert cache.version == 2 and cache.invalidated == 2
    assert cache.advance(2, 3, {"tags": None}) == 40 and not (cache.find(tags) >= 0).any() and cache.rows_held == 98
    assert cache.advance(7, 4, {}) == 98 and cache.rows_held == 0  # not at the old version: flushed
    cache.offer(items, rows_for(items))
    assert cache.advance(4, 5, None) == 100 and cache.flushed == 40 + 98 + 100 and cache.version == 5


# -- CachedLookupClient over every version of a real checkpoint ---------------------------------


class VersionedLookup:
    """An in-process ``LookupClient`` that pools at whatever version it is asked, with the
    reference's own pooling (the oracle): a stand-in for the shards."""

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.stats = LookupStats()
        self._tables: dict[tuple[int, str], np.ndarray] = {}
        self.asked: list[int] = []

    def table(self, version: Version, name: str) -> np.ndarray:
        if (version, name) not in self._tables:
            self._tables[(version, name)] = np.asarray(self.reader.open_table(version, name, verify=False))
        return self._tables[(version, name)]

    async def lookup(self, features, *, version, timeout_s, request_id) -> LookupResult:
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        self.asked.append(sum(len(f.bags.rows) for f in features))
        pooled = {
            f.feature: reference_pool(self.table(version, f.table), f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
            for f in features
        }
        return LookupResult(pooled, version, 3)

    async def close(self) -> None:
        pass


def random_features(rng: np.random.Generator, bags: int = 20) -> list[FeatureLookup]:
    """A batch of every feature of the small model: power-law rows (hot rows repeat), bags of
    0 to max_bag_len ids, some of the SUM ones weighted."""
    out = []
    for f in SPEC.sparse_features:
        rows = SPEC.table(f.table).rows
        lengths = np.ones(bags, dtype=np.int32) if f.max_bag_len == 1 else rng.integers(0, f.max_bag_len + 1, bags).astype(np.int32)
        ids = synth.power_law_ids(rng, int(lengths.sum()), rows)
        weights = rng.random(len(ids)).astype(np.float32) if f.pooling.value == "sum" and rng.random() < 0.3 else None
        out.append(FeatureLookup(f.name, f.table, f.pooling, Bags(ids, lengths, weights), f.side))
    return out


def hot_drift(root: str, version: int, parent: int, seed: int) -> None:
    """A delta over ``parent`` changing the 10 hottest rows of every table and 3% at random."""
    reader = CheckpointReader(root)
    rng = np.random.default_rng(seed)
    rows = {}
    for t in SPEC.tables:
        ids = np.unique(np.concatenate([np.arange(min(10, t.rows)), rng.choice(t.rows, max(1, t.rows * 3 // 100), replace=False)]))
        rows[t.name] = (ids, rng.normal(0, 2, (len(ids), t.dim)).astype(np.float32))
    write_delta(root, version, parent, reader.manifest(parent).model, rows)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> str:
    """Base 1, deltas 2 (parent 1) and 3 (parent 2), 4 (parent 2: a branch after a rollback to
    2), and 5, a new base (3 compacted)."""
    root = str(tmp_path_factory.mktemp("cache-lineage"))
    synth.synthesize(root, "small", seed=4)
    hot_drift(root, 2, 1, 2)
    hot_drift(root, 3, 2, 3)
    hot_drift(root, 4, 2, 4)
    compact_version(root, 3, 5)
    return root


def run_batches(client: CachedLookupClient, remote: VersionedLookup, version: int, seed: int, n: int = 6) -> None:
    rng = np.random.default_rng(seed)

    async def main():
        for _ in range(n):
            features = random_features(rng)
            got = await client.lookup(features, version=version, timeout_s=5, request_id="t")
            assert got.version == version
            for f in features:
                want = reference_pool(remote.table(version, f.table), f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
                np.testing.assert_allclose(got.pooled[f.feature], want, rtol=RTOL, atol=ATOL, err_msg=f"{f.feature} at {version}")

    asyncio.run(main())


def test_every_batch_equals_the_reference_at_its_version_across_deltas_a_rollback_a_branch_and_a_base(lineage):
    reader = CheckpointReader(lineage)
    remote = VersionedLookup(reader)
    cache = RowCache(SPEC, 600 * (ROW_BYTES + 64), 1)
    client = CachedLookupClient(remote, cache)
    tables = [t.name for t in SPEC.tables]
    run_batches(client, remote, 1, seed=0)
    assert cache.rows_held > 0 and cache.hits > 0
    for step, version in enumerate((2, 3, 2, 4, 5, 4)):
        old = cache.version
        changes = version_changes(reader, old, version, tables)
        held_before = cache.rows_held
        changed_held = sum(int((cache.find(cache.keys(t, ids)) >= 0).sum()) for t, ids in (changes or {}).items())
        dropped = cache.advance(old, version, changes)
        if changes is None:  # 5 is another base: everything goes
            assert version == 5 or old == 5
            assert dropped == held_before and cache.rows_held == 0
        else:  # precisely the rows the deltas on the path change; the others stay
            assert dropped == changed_held > 0 and cache.rows_held == held_before - dropped > 0
        hits = cache.hits
        run_batches(client, remote, version, seed=step + 1)
        assert cache.hits > hits
    assert cache.bypassed == 0 and cache.evicted > 0


def test_without_the_invalidation_the_same_batches_would_be_wrong(lineage):
    """The check above can fail: skipping the changed ids leaves old rows that the reference
    catches."""
    reader = CheckpointReader(lineage)
    remote = VersionedLookup(reader)
    client = CachedLookupClient(remote, RowCache(SPEC, 600 * (ROW_BYTES + 64), 1))
    run_batches(client, remote, 1, seed=0)
    client.cache.advance(1, 2, {})  # pretends nothing changed
    with pytest.raises(AssertionError):
        run_batches(client, remote, 2, seed=1)


def test_a_batch_at_another_version_bypasses_the_cache_and_leaves_it_alone(lineage):
    reader = CheckpointReader(lineage)
    remote = VersionedLookup(reader)
    client = CachedLookupClient(remote, RowCache(SPEC, 600 * (ROW_BYTES + 64), 2))
    features = random_features(np.random.default_rng(9))
    got = asyncio.run(client.lookup(features, version=1, timeout_s=5, request_id="t"))
    n = sum(len(f.bags.rows) for f in features)
    assert client.cache.bypassed == n and client.cache.rows_held == 0 and remote.asked == [n]
    want = reference_pool(remote.table(1, "items"), features[5].bags.rows, features[5].bags.lengths, features[5].pooling, features[5].bags.weights)
    np.testing.assert_allclose(got.pooled["item_id"], want, rtol=RTOL, atol=ATOL)


def test_a_batch_served_wholly_from_the_cache_sends_nothing():
    class Never(VersionedLookup):
        async def lookup(self, features, **kw):
            raise AssertionError("no row should be fetched")

    cache = RowCache(SPEC, 1 << 20, 1)
    rows = np.arange(5, dtype=np.int64)
    keys = cache.keys("items", rows)
    cache.offer(keys, rows_for(keys))
    client = CachedLookupClient(Never(None), cache, map_version=lambda: 7)
    f = FeatureLookup("item_id", "items", SPEC.sparse_features[5].pooling, Bags(np.array([4, 0, 4]), np.ones(3, dtype=np.int32)), FeatureSide.ITEM)
    got = asyncio.run(client.lookup([f], version=1, timeout_s=5, request_id="t"))
    np.testing.assert_array_equal(got.pooled["item_id"], rows_for(keys[[4, 0, 4]]))
    assert got.shard_map_version == 7 and cache.hits == 3 and cache.misses == 0 and client.stats.batches == 1
