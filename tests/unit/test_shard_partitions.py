"""The shard's partition manager and load meter over a real TableStore and a real (tiny)
checkpoint; the shard maps are plain ShardMap values handed in as the watches would."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_base, write_delta
from services.core.placement import ShardMap, TablePlacement
from services.core.reference import reference_pool
from services.core.types import PartitionId, PoolingType, ShardingType
from services.embedding_shard.loader import load_changes, load_rows, loaders_for
from services.embedding_shard.meter import LoadMeter
from services.embedding_shard.partition_manager import PartitionManager
from services.embedding_shard.snapshot import BagGroup
from services.embedding_shard.store import TableStore
from tests.support.tiny_checkpoint import DIM, tiny_dense, tiny_spec, tiny_tables
from tests.support.waiting import wait_for

SPEC = tiny_spec(users=10, items=7)
RW, REP = ShardingType.ROW_WISE, ShardingType.REPLICATED
# users row-wise over a and b; items on both.
ACTIVE = ShardMap(1, {"users": TablePlacement(RW, (("a",), ("b",))), "items": TablePlacement(REP, (("a", "b"),))}, ("a", "b"))
# users whole on both.
TARGET = ShardMap(2, {"users": TablePlacement(REP, (("a", "b"),)), "items": TablePlacement(REP, (("a", "b"),))}, ("a", "b"))
WHOLE, HALF = PartitionId("users", 0, 1), PartitionId("users", 0, 2)


@pytest.fixture
def node(tmp_path):
    """Node "a" holding its partitions of ACTIVE at versions 1 and 2 (primary 2)."""
    tables = {1: tiny_tables(SPEC)}
    write_base(tmp_path, 1, SPEC, tables[1], tiny_dense(SPEC))
    ids = np.array([0, 3, 4], np.int64)
    rows = np.full((3, DIM), 7.0, np.float32)
    write_delta(tmp_path, 2, 1, SPEC, {"users": (ids, rows)})
    tables[2] = {k: v.copy() for k, v in tables[1].items()}
    tables[2]["users"][ids] = rows
    reader = CheckpointReader(tmp_path)
    store = TableStore({t.name: t for t in SPEC.tables}, {"users": 2, "items": 1})
    store.install(1, load_rows(loaders_for(reader, 1, ACTIVE.partition_ids_of("a"))))
    store.apply(2, load_changes(loaders_for(reader, 2, store.held(), over=1)))
    return store, reader, tables


def _manager(store, reader, zk: dict, **kw) -> PartitionManager:
    """``zk`` stands for what ZooKeeper holds now ("active", "target"); the watches are the
    set_* calls the test makes."""
    pm = PartitionManager("a", store, reader, stop=threading.Event(), read_maps=lambda: (zk.get("target"), zk["active"]), **kw)
    pm.set_active(zk["active"])
    return pm


def _pool(store, version, table, partition, ids):
    lengths = np.array([len(ids)], np.int32)
    group = BagGroup(table, partition, PoolingType.SUM, np.asarray(ids, np.int64), lengths)
    return store.lookup([group], version=version, map_version=1).results[0][0], lengths


def test_loads_what_the_target_gives_at_every_version_then_drops_what_no_map_gives(node):
    store, reader, tables = node
    zk = {"active": ACTIVE, "target": TARGET}
    pm = _manager(store, reader, zk, drain_s=0.0)
    pm.set_target(TARGET)
    assert pm.reconcile() == 0.0  # loaded one: more may follow at once
    assert WHOLE in store.held() and HALF in store.held() and store.versions_ready == [1, 2]
    for v in (1, 2):  # the new partition pools exactly at both versions
        ids = [1, 3, 4, 9]
        got, lengths = _pool(store, v, "users", 1, ids)
        np.testing.assert_allclose(got, reference_pool(tables[v]["users"], ids, lengths, PoolingType.SUM), rtol=1e-5, atol=1e-6)
    assert pm.reconcile() is None and pm.status()["partitions_loading"] == ()
    # The switch: the target's deletion is watched before the active map's change. A fresh
    # read (target, then active) says users/0of1 is still owned: nothing drops.
    zk.update(active=TARGET, target=None)
    pm.set_target(None)
    pm.reconcile()
    assert WHOLE in store.held() and HALF in store.held()
    pm.set_active(TARGET)  # now the old half goes (drain 0)
    pm.reconcile()
    assert store.held() == [PartitionId("items", 0, 1), WHOLE]
    assert store.num_partitions == {"users": 1, "items": 1}


def test_drops_after_the_drain_and_reports_it(node):
    store, reader, _ = node
    zk = {"active": ACTIVE}
    pm = _manager(store, reader, zk, drain_s=30.0)
    zk["active"] = narrowed = ShardMap(2, {"users": TablePlacement(RW, (("b",), ("b",))), "items": ACTIVE.tables["items"]}, ("a", "b"))
    pm.set_active(narrowed)
    wait = pm.reconcile()
    assert 29.0 < wait <= 30.0 and HALF in store.held()
    assert pm.status()["partitions_draining"] == (str(HALF),)


def test_a_load_is_abandoned_when_the_target_goes(node):
    store, reader, _ = node
    zk = {"active": ACTIVE, "target": TARGET}
    pm = _manager(store, reader, zk, load_rate_bytes_s=1)  # the throttle would take minutes
    pm.set_target(TARGET)
    t = threading.Thread(target=pm.reconcile)
    t.start()
    wait_for(lambda: pm.loading == WHOLE, 10, "the load to start")
    pm.set_target(None)  # aborted
    t.join(10)
    assert not t.is_alive() and WHOLE not in store.held()


def test_load_meter_reports_ids_per_second_over_the_window(node):
    store, _, _ = node
    now = [100.0]
    changes = []
    meter = LoadMeter(store, interval_s=5.0, window_s=60.0, clock=lambda: now[0], on_change=lambda: changes.append(1))
    assert meter.tick() == 5.0 and not changes  # not due yet
    now[0] += 5.0
    meter.tick()
    store.partitions()[HALF].ids += 500
    now[0] += 5.0
    meter.tick()
    report = meter.report()
    assert report[str(HALF)].ids == 500 and report[str(HALF)].ids_per_s == 100.0
    assert report[str(HALF)].size_bytes == store.size_bytes(HALF) and changes
