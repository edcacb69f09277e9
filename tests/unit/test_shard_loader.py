"""The shard's loader over a real (tiny) checkpoint: it verifies only the files its partition
reads, estimates what it will hold, and loads rows or changed rows; a version manager built on
it refuses a corrupt version only on the nodes that hold the corrupt table."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_base, write_delta
from services.core.errors import CheckpointError
from services.core.types import PartitionId
from services.embedding_shard import loader as loader_module
from services.embedding_shard.loader import Pacer, PartitionLoader, load_changes, load_rows, loaders_for, verify_all
from services.embedding_shard.store import TableStore
from services.embedding_shard.version_manager import VersionManager
from tests.support.tiny_checkpoint import DIM, tiny_dense, tiny_spec, tiny_tables

SPEC = tiny_spec(users=10, items=7)
USERS = [PartitionId("users", 0, 2), PartitionId("users", 1, 2)]
ITEMS = [PartitionId("items", 0, 1)]


@pytest.fixture
def ckpt(tmp_path):
    """Base 1, delta 2 changing users and items: (root, tables per version)."""
    tables = {1: tiny_tables(SPEC)}
    write_base(tmp_path, 1, SPEC, tables[1], tiny_dense(SPEC))
    changes = {"users": np.array([1, 4], np.int64), "items": np.array([0, 6], np.int64)}
    rows = {t: np.full((len(ids), DIM), 9.0 + i, np.float32) for i, (t, ids) in enumerate(changes.items())}
    write_delta(tmp_path, 2, 1, SPEC, {t: (changes[t], rows[t]) for t in changes})
    tables[2] = {t: a.copy() for t, a in tables[1].items()}
    for t, ids in changes.items():
        tables[2][t][ids] = rows[t]
    return tmp_path, tables


def _flip_byte(root, path: str) -> None:
    """Same size, another sha256: only a full check sees it."""
    full = os.path.join(root, path)
    with open(full, "r+b") as f:
        f.seek(os.path.getsize(full) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_files_are_the_partitions_own(ckpt):
    root, _ = ckpt
    reader = CheckpointReader(root)
    full = PartitionLoader(reader, USERS[1], 2)
    assert full.full and full.files() == {1: ("tables/users.npy",), 2: ("tables/users.ids.npy", "tables/users.rows.npy")}
    changes = PartitionLoader(reader, ITEMS[0], 2, over=1)
    assert not changes.full and changes.files() == {2: ("tables/items.ids.npy", "tables/items.rows.npy")}
    rollback = PartitionLoader(reader, ITEMS[0], 1, over=2)  # back to the base: its file
    assert rollback.files() == {1: ("tables/items.npy",)}


def test_estimates_match_what_is_loaded(ckpt):
    root, tables = ckpt
    reader = CheckpointReader(root)
    for pid in USERS:
        loader = PartitionLoader(reader, pid, 2)
        rows = loader.load_rows()
        assert loader.estimate_bytes() == rows.numel() * 4
        np.testing.assert_array_equal(rows.numpy(), tables[2]["users"][pid.partition :: 2])
    (loader,) = loaders_for(reader, 2, ITEMS, over=1)
    got = loader.load_changes()
    assert loader.estimate_bytes() == got.local_ids.nbytes + got.rows.numel() * 4
    np.testing.assert_array_equal(got.local_ids, [0, 6])
    np.testing.assert_array_equal(got.rows.numpy(), tables[2]["items"][[0, 6]])


def test_a_corrupt_items_file_is_refused_only_by_items_loaders(ckpt):
    root, tables = ckpt
    _flip_byte(root, "versions/1/tables/items.npy")
    reader = CheckpointReader(root)
    users = loaders_for(reader, 1, USERS)
    verify_all(users)  # the corrupt items file is not read, so not hashed
    loaded = load_rows(users)
    np.testing.assert_array_equal(loaded[USERS[0]].numpy(), tables[1]["users"][0::2])
    with pytest.raises(CheckpointError, match=r"tables/items.npy: sha256 .* \(corrupt file\)"):
        verify_all(loaders_for(reader, 1, ITEMS))


def test_manifests_and_complete_markers_are_always_checked(ckpt):
    root, _ = ckpt
    os.remove(os.path.join(root, "versions/1/COMPLETE"))
    reader = CheckpointReader(root)
    with pytest.raises(CheckpointError, match="broken chain: delta 2 has parent 1.*no COMPLETE marker"):
        loaders_for(reader, 2, USERS, over=1)


def _node(root, pids) -> tuple[TableStore, VersionManager]:
    """A node holding ``pids`` at version 1, with its version manager (no ZooKeeper: the test
    hands the target in as the watch would)."""
    reader = CheckpointReader(root)
    store = TableStore({t.name: t for t in SPEC.tables}, {"users": 2, "items": 1})
    store.install(1, load_rows(loaders_for(reader, 1, pids)))
    return store, VersionManager(store, reader, stop=threading.Event())


def test_a_users_only_node_loads_a_version_whose_items_file_is_corrupt(ckpt):
    root, tables = ckpt
    _flip_byte(root, "versions/2/tables/items.rows.npy")
    users_store, users_node = _node(root, USERS)
    items_store, items_node = _node(root, ITEMS)
    for node in (users_node, items_node):
        node.set_target(2)
        node.reconcile()
    assert users_store.primary == 2 and users_store.versions_ready == [1, 2] and users_node.load_error is None
    for pid in USERS:
        with users_store.reading() as snapshot:
            part, _ = snapshot.resolve(2, "users", pid.partition, np.empty(0, np.int64), strict=True)
            np.testing.assert_array_equal(part.weight.numpy(), tables[2]["users"][pid.partition :: 2])
    assert items_store.primary == 1 and items_store.versions_ready == [1]
    assert items_node.load_error.version == 2 and "tables/items.rows.npy: sha256" in items_node.load_error.error


def test_changes_apply_like_the_old_path(ckpt):
    """Rows of 2 applied over 1, then rolled back to 1 from the base's rows."""
    root, tables = ckpt
    reader = CheckpointReader(root)
    store = TableStore({t.name: t for t in SPEC.tables}, {"users": 2, "items": 1})
    store.install(1, load_rows(loaders_for(reader, 1, USERS + ITEMS)))
    store.apply(2, load_changes(loaders_for(reader, 2, store.held(), over=1)))
    store.drop(1)
    store.apply(1, load_changes(loaders_for(reader, 1, store.held(), over=2)))
    with store.reading() as snapshot:
        part, _ = snapshot.resolve(1, "items", 0, np.empty(0, np.int64), strict=True)
        np.testing.assert_array_equal(part.weight.numpy(), tables[1]["items"])


def test_paced_changes_equal_unpaced_ones(ckpt, monkeypatch):
    root, _ = ckpt
    reader = CheckpointReader(root)
    loaders = loaders_for(reader, 2, USERS + ITEMS, over=1)
    want = load_changes(loaders)
    monkeypatch.setattr(loader_module, "PACE_ROWS", 1)  # a step per row
    pacer = Pacer(0.9)
    pacer.begin()
    verify_all(loaders, pacer)
    got = load_changes(loaders, pacer)
    for pid, (ids, rows) in want.items():
        np.testing.assert_array_equal(got[pid][0], ids)
        np.testing.assert_array_equal(got[pid][1].numpy(), rows.numpy())


def test_a_pacer_holds_the_thread_to_its_share_of_a_core():
    import time

    pacer = Pacer(0.25)
    t0 = time.monotonic()
    pacer.begin()
    for _ in range(4):
        end = time.thread_time() + 0.01
        while time.thread_time() < end:  # 10 ms of CPU, then a step
            pass
        pacer.step()
    wall = time.monotonic() - t0
    assert pacer.cpu_s <= 0.25 * wall + 0.005 and pacer.slept_s > 0
    stop = threading.Event()
    stopped = Pacer(0.01, stop)
    stopped.begin()
    end = time.thread_time() + 0.01
    while time.thread_time() < end:
        pass
    stop.set()
    t0 = time.monotonic()
    stopped.step()  # would sleep ~1 s: a stopping node does not wait
    assert time.monotonic() - t0 < 0.1


def test_a_version_manager_paces_a_swap_and_a_rollback_and_serves_each_version_exactly(ckpt, monkeypatch):
    """With a small CPU share and a step per row, the swap to 2 and the rollback to 1 sleep to
    keep to the share, and each version's rows are then the reference's at that version."""
    from services.embedding_shard import store as store_module

    root, tables = ckpt
    monkeypatch.setattr(loader_module, "PACE_ROWS", 1)
    monkeypatch.setattr(store_module, "_WRITE_ROWS", 1)
    reader = CheckpointReader(root)
    store = TableStore({t.name: t for t in SPEC.tables}, {"users": 2, "items": 1})
    store.install(1, load_rows(loaders_for(reader, 1, USERS + ITEMS)))
    node = VersionManager(store, reader, stop=threading.Event(), swap_cpu_share=0.05)
    for target in (2, 1):
        node.set_target(target)
        node.reconcile()
        assert store.primary == target and node.load_error is None
        assert node.last_paced_s > 0, f"the swap to {target} was not paced"
        with store.reading() as snapshot:
            for pid in USERS + ITEMS:
                part, _ = snapshot.resolve(target, pid.table, pid.partition, np.empty(0, np.int64), strict=True)
                np.testing.assert_array_equal(part.weight.numpy(), tables[target][pid.table][pid.partition :: pid.num_partitions])
