"""The shard's versioned table store against plain numpy tables pooled by ``core.reference``.

Every version a store holds (its primary and the overlaid ones) must pool exactly like the
table of that version, during and after in-place swaps, rollbacks and drops.
"""

import threading

import numpy as np
import pytest
import torch

from services.core.errors import FailedPreconditionError, InvalidArgumentError
from services.core.reference import reference_pool
from services.core.types import PartitionId, PoolingType, TableSpec
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore

RTOL, ATOL = 1e-5, 1e-6
ROWS, DIM, P = 600, 8, 2
SPEC = TableSpec("t", ROWS, DIM)
KEYS = [PartitionId("t", 0, P), PartitionId("t", 1, P)]
MODES = [PoolingType.SUM, PoolingType.MEAN, PoolingType.MAX]
NO_IDS = np.empty(0, dtype=np.int64)


def _held(snapshot, version, partition):
    """The partition of the store's layout at ``version`` (as a Lookup of no ids resolves it)."""
    return snapshot.resolve(version, "t", partition, NO_IDS, strict=True)[0]


def _one(snapshot, version, table, partition, ids, lengths=None, mode=PoolingType.SUM, *, strict=True):
    """One group through the Lookup path (map version 0 = strict routing)."""
    ids = np.asarray(ids, np.int64)
    lengths = np.array([len(ids)], np.int32) if lengths is None else lengths
    return snapshot.lookup([BagGroup(table, partition, mode, ids, lengths)], version=version, map_version=0 if strict else 1).results[0][0]


def _bags(rng, bags=40, max_len=12):
    lengths = rng.integers(0, max_len + 1, size=bags).astype(np.int32)
    ids = (rng.zipf(1.3, size=int(lengths.sum())) - 1) % ROWS  # hot low ids, as in serving
    return ids.astype(np.int64), lengths


def _drift(rng, table, k):
    """A new version of ``table``: k distinct rows replaced (hot rows more likely)."""
    ids = np.unique((rng.zipf(1.2, size=4 * k) - 1) % ROWS)[:k]
    new = table.copy()
    new[ids] = rng.standard_normal((len(ids), DIM)).astype(np.float32) * 3 - 1  # negatives exercise MAX
    return ids, new


def _changes(ids, table):
    """Per partition: local ids and rows of ``table`` at those global ids (what the shard's
    loader reads from a delta)."""
    out = {}
    for key in KEYS:
        mine = ids[ids % P == key.partition]
        out[key] = (mine // P, torch.from_numpy(table[mine].copy()))
    return out


def _store(table):
    store = TableStore({"t": SPEC}, {"t": P})
    store.install(1, {k: torch.from_numpy(table[k.partition :: P].copy()) for k in KEYS})
    return store


def _pool(store, version, ids, lengths, mode):
    """Pool global ids through the store the way the frontend does for a row-wise table."""
    groups = []
    for key in KEYS:
        sel = ids % P == key.partition
        sub_lengths = np.bincount(np.repeat(np.arange(len(lengths)), lengths)[sel], minlength=len(lengths)).astype(np.int32)
        sub_mode = PoolingType.SUM if mode is PoolingType.MEAN else mode
        groups.append(BagGroup("t", key.partition, sub_mode, ids[sel], sub_lengths))
    parts = store.lookup(groups, version=version, map_version=0).results  # one snapshot for every group
    from services.core.sharding import merge_partials

    return merge_partials(parts, mode)


def _check(store, version, table, rng):
    ids, lengths = _bags(rng)
    for mode in MODES:
        np.testing.assert_allclose(_pool(store, version, ids, lengths, mode), reference_pool(table, ids, lengths, mode), rtol=RTOL, atol=ATOL)


def test_apply_serves_both_versions_exactly():
    rng = np.random.default_rng(1)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    store = _store(v1)
    ids, v2 = _drift(rng, v1, 60)
    store.apply(2, _changes(ids, v2))
    assert store.primary == 2 and store.versions_ready == [1, 2]
    _check(store, 2, v2, rng)
    _check(store, 1, v1, rng)
    _check(store, 0, v2, rng)  # version 0: the primary
    # Extra memory is the overwritten rows, not a copy of the table.
    assert store.overlay_bytes() == len(ids) * (DIM * 4 + 8)


def test_chain_keeps_every_held_version_exact_then_drop_frees():
    rng = np.random.default_rng(2)
    tables = {1: rng.standard_normal((ROWS, DIM)).astype(np.float32)}
    store = _store(tables[1])
    for v in (2, 3, 4):
        ids, tables[v] = _drift(rng, tables[v - 1], 40)
        store.apply(v, _changes(ids, tables[v]))
    assert store.versions_ready == [1, 2, 3, 4]
    for v, t in tables.items():
        _check(store, v, t, rng)
    store.drop(1)
    store.drop(2)
    store.drop(4)  # the primary is never dropped
    assert store.versions_ready == [3, 4]
    _check(store, 3, tables[3], rng)
    _check(store, 4, tables[4], rng)
    with pytest.raises(FailedPreconditionError, match="version 1 is not ready"):
        _pool(store, 1, *_bags(rng), PoolingType.SUM)


def test_rollback_to_a_held_version_uses_its_rows():
    rng = np.random.default_rng(3)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    store = _store(v1)
    ids, v2 = _drift(rng, v1, 50)
    store.apply(2, _changes(ids, v2))
    store.promote(1)
    assert store.primary == 1
    _check(store, 1, v1, rng)
    _check(store, 2, v2, rng)  # still held, now as the overlaid one
    store.drop(2)
    assert store.overlay_bytes() == 0
    with store.reading() as view:
        for key in KEYS:
            np.testing.assert_array_equal(_held(view, 1, key.partition).weight.numpy(), v1[key.partition :: P])


def test_install_of_another_base_keeps_the_old_weights():
    rng = np.random.default_rng(4)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    v2 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    store = _store(v1)
    store.install(2, {k: torch.from_numpy(v2[k.partition :: P].copy()) for k in KEYS})
    _check(store, 1, v1, rng)
    _check(store, 2, v2, rng)
    store.promote(1)
    _check(store, 0, v1, rng)


def test_lookups_during_a_swap_never_mix_versions():
    """Readers hammer version 1 while the primary moves to 2 in place: every answer is
    exactly version 1 (the quiescence before the in-place write)."""
    rng = np.random.default_rng(5)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    ids, v2 = _drift(rng, v1, 200)
    hot = np.repeat(ids[:50], 2)  # every bag hits rows the swap rewrites
    lengths = np.full(50, 2, dtype=np.int32)
    want = reference_pool(v1, hot, lengths, PoolingType.SUM)
    store = _store(v1)
    stop, bad, done = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            got = _pool(store, 1, hot, lengths, PoolingType.SUM)
            if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
                bad.append(got)
            done[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for v, table in ((2, v2), (1, v1), (2, v2), (1, v1)):  # swap back and forth under load
        store.promote(v) if v in store.versions_ready else store.apply(v, _changes(ids, table))
    stop.set()
    for t in threads:
        t.join()
    assert done[0] > 0 and not bad


def test_a_paced_swap_serves_every_version_exactly_between_its_steps(monkeypatch):
    """A paced apply (and a rollback by promote) writes rows a few at a time: at every step
    between them, every held version pools exactly, from the primary's rows or its overlay,
    while readers on other threads check the old version too (the Pacer sleeps in the steps)."""
    from services.embedding_shard import store as store_module
    from services.embedding_shard.loader import Pacer

    monkeypatch.setattr(store_module, "_WRITE_ROWS", 16)  # many steps for a small table
    rng = np.random.default_rng(6)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    ids, v2 = _drift(rng, v1, 150)
    store = _store(v1)
    stop, bad, done = threading.Event(), [], [0]
    hot, lengths = np.repeat(ids[:40], 2), np.full(40, 2, dtype=np.int32)
    want = reference_pool(v1, hot, lengths, PoolingType.SUM)

    def reader():
        while not stop.is_set():
            if not np.allclose(_pool(store, 1, hot, lengths, PoolingType.SUM), want, rtol=RTOL, atol=ATOL):
                bad.append(1)
            done[0] += 1

    steps = [0]
    pacer = Pacer(0.5)

    def pace():
        steps[0] += 1
        for version, table in ((1, v1), (2, v2)):
            if version in store.versions_ready:
                _check(store, version, table, rng)
        pacer.step()

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        pacer.begin()
        store.apply(2, _changes(ids, v2), pace=pace)
        assert steps[0] > len(KEYS) + 2  # overlays per partition, then the writes in steps
        store.promote(1, pace=pace)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert done[0] > 0 and not bad
    assert store.primary == 1
    _check(store, 1, v1, rng)
    _check(store, 2, v2, rng)


def test_bad_requests_name_the_problem():
    rng = np.random.default_rng(6)
    store = _store(rng.standard_normal((ROWS, DIM)).astype(np.float32))
    with store.reading() as view:
        with pytest.raises(InvalidArgumentError, match="unknown table 'nope'"):
            _one(view, 1, "nope", 0, NO_IDS)
        with pytest.raises(InvalidArgumentError, match="partition 5 out of range"):
            _one(view, 1, "t", 5, NO_IDS)
        with pytest.raises(InvalidArgumentError, match="id 3 is not in partition 0"):
            _one(view, 1, "t", 0, np.array([3]))
        with pytest.raises(FailedPreconditionError, match="version 9 is not ready"):
            _one(view, 9, "t", 0, NO_IDS)


def _partition(table, pid):
    return torch.from_numpy(table[pid.partition :: pid.num_partitions].copy())


def _lookup(store, version, pid, ids, lengths, mode, *, strict=False):
    """The pooled bags and the held partition that served them."""
    with store.reading() as view:
        served_by = view.resolve(version, "t", pid.partition, ids, strict=strict)[0].table.pid
        return _one(view, version, "t", pid.partition, ids, lengths, mode, strict=strict), served_by


def test_add_partition_serves_it_at_every_held_version():
    """A partition added while the store holds versions 1 and 2 (primary 2) pools exactly at
    both: full rows at the primary, version 1's differing rows as its overlay."""
    rng = np.random.default_rng(7)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    store = TableStore({"t": SPEC}, {"t": P})
    store.install(1, {KEYS[0]: _partition(v1, KEYS[0])})
    ids, v2 = _drift(rng, v1, 80)
    store.apply(2, {KEYS[0]: _changes(ids, v2)[KEYS[0]]})
    with pytest.raises(ValueError, match="the node holds \\[1, 2\\]"):
        store.add_partition(KEYS[1], {2: _partition(v2, KEYS[1])}, {})
    local, rows = _changes(ids, v1)[KEYS[1]]
    store.add_partition(KEYS[1], {2: _partition(v2, KEYS[1])}, {1: (local, rows)})
    assert store.held() == KEYS and store.versions_ready == [1, 2]
    _check(store, 1, v1, rng)
    _check(store, 2, v2, rng)
    store.drop(1)
    _check(store, 2, v2, rng)


def test_a_lookup_is_served_by_any_held_partition_holding_its_rows():
    """During a rebalance that makes a row-wise table whole, the node holds t/0of2 and t/0of1:
    a request for partition 1 of 2 is served from the whole table; once t/0of1 is removed it is
    FAILED_PRECONDITION, except with strict routing where a wrong id is the caller's error."""
    rng = np.random.default_rng(8)
    v1 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    whole = PartitionId("t", 0, 1)
    store = TableStore({"t": SPEC}, {"t": P})
    store.install(1, {KEYS[0]: _partition(v1, KEYS[0]), whole: _partition(v1, whole)})
    odd = np.array([1, 3, 5, 7], np.int64)
    lengths = np.array([3, 1], np.int32)
    got, served_by = _lookup(store, 1, KEYS[1], odd, lengths, PoolingType.SUM)
    assert served_by == whole
    np.testing.assert_allclose(got, reference_pool(v1, odd, lengths, PoolingType.SUM), rtol=RTOL, atol=ATOL)
    even = odd - 1
    assert _lookup(store, 1, KEYS[0], even, lengths, PoolingType.SUM)[1] == KEYS[0]  # the layout's first
    with store.reading() as before:  # a lookup running across the removal keeps its snapshot
        store.remove_partition(whole)
        got = _one(before, 1, "t", 1, odd, lengths, strict=False)
        np.testing.assert_allclose(got, reference_pool(v1, odd, lengths, PoolingType.SUM), rtol=RTOL, atol=ATOL)
    assert store.held() == [KEYS[0]]
    with pytest.raises(FailedPreconditionError, match="table 't' partition 1 is not held"):
        _lookup(store, 1, KEYS[1], odd, lengths, PoolingType.SUM)
    with pytest.raises(FailedPreconditionError, match="table 't' partition 0 is not held"):
        _lookup(store, 1, KEYS[0], odd, lengths, PoolingType.SUM)  # routed with another map
    with pytest.raises(InvalidArgumentError, match="id 1 is not in partition 0 of 2"):
        _lookup(store, 1, KEYS[0], odd, lengths, PoolingType.SUM, strict=True)
    with pytest.raises(InvalidArgumentError, match="partition 2 out of range"):
        _lookup(store, 1, PartitionId("t", 2, 3), even, lengths, PoolingType.SUM, strict=True)
    with pytest.raises(InvalidArgumentError, match="id 600 out of range"):
        _lookup(store, 1, KEYS[0], np.array([0, 600]), lengths, PoolingType.SUM)
    store.set_layout({"t": 1})
    assert store.num_partitions == {"t": 1}
