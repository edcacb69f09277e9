"""Producing and retiring deltas: diff_versions, compact_version, collect_garbage, on real files
(their ``shardrec checkpoint`` commands: test_cli_checkpoint.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.core.checkpoint.delta import collect_garbage, compact_version, diff_versions, split_version_path
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_base, write_delta
from services.core.errors import CheckpointError, ConfigError
from tests.support.tiny_checkpoint import DIM, tiny_dense, tiny_spec, tiny_tables

SPEC = tiny_spec(users=50, items=37)
SMALL_CHUNK = 3 * DIM * 4  # three rows a chunk: every table crosses many chunk boundaries


def _rows(seed: int, k: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, DIM), dtype=np.float32)


def _tables_at(reader: CheckpointReader, version: int) -> dict[str, np.ndarray]:
    return {t: np.array(reader.open_table(version, t)) for t in SPEC.table_names}


@pytest.fixture
def live(tmp_path):
    """The serving root: base 1."""
    write_base(tmp_path / "live", 1, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    return tmp_path / "live"


# ---------------------------------------------------------------- diff_versions


def test_diff_holds_exactly_the_changed_rows_and_reproduces_the_target(tmp_path):
    live = tmp_path / "live"
    old = tiny_tables(SPEC)
    old["items"][5, 0] = 0.0
    write_base(live, 1, SPEC, old, tiny_dense(SPEC))
    tables = {k: v.copy() for k, v in old.items()}
    tables["users"][[0, 7, 8, 49]] += 1.0
    tables["users"][20, 1] = np.nextafter(tables["users"][20, 1], np.float32(9))  # one ulp counts
    tables["items"][5, 0] = -0.0  # equal as a value, other bytes: a change
    write_base(tmp_path / "export", 1, SPEC, tables, tiny_dense(SPEC))

    summary = diff_versions(live, 1, tmp_path / "export", 1, chunk_bytes=SMALL_CHUNK)
    m = summary.manifest
    assert (m.version, m.kind, m.parent) == (2, "delta", 1)
    assert dict(summary.rows_changed) == {"users": 5, "items": 1} and not summary.dense_changed
    assert m.delta_tables == ("users", "items") and not m.lists("dense.safetensors")
    reader = CheckpointReader(live)
    ids, rows = reader.delta_rows(2, "users", verify=True)
    np.testing.assert_array_equal(ids, [0, 7, 8, 20, 49])
    np.testing.assert_array_equal(rows, tables["users"][[0, 7, 8, 20, 49]])
    np.testing.assert_array_equal(reader.delta_rows(2, "items")[0], [5])
    for name, want in tables.items():
        got = reader.open_table(2, name)
        assert got.tobytes() == want.tobytes(), name
    assert summary.size_bytes == sum(f.size_bytes for f in m.files)


def test_diff_against_a_delta_of_another_root_with_new_dense(live, tmp_path):
    export = tmp_path / "export"
    write_base(export, 1, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    write_delta(export, 2, 1, SPEC, {"items": (np.array([36, 4]), _rows(1, 2))}, tiny_dense(SPEC, 7))
    write_delta(export, 3, 2, SPEC, {"items": (np.array([4]), _rows(2, 1)), "users": (np.array([9]), _rows(3, 1))})
    write_delta(live, 2, 1, SPEC, {"users": (np.array([9, 10]), _rows(4, 2))})  # the live root moved on too

    summary = diff_versions(live, 2, export, 3, version=5, chunk_bytes=SMALL_CHUNK)
    assert summary.manifest.version == 5 and summary.manifest.parent == 2
    assert dict(summary.rows_changed) == {"users": 2, "items": 2} and summary.dense_changed
    live_reader, export_reader = CheckpointReader(live), CheckpointReader(export)
    np.testing.assert_array_equal(live_reader.delta_rows(5, "users")[0], [9, 10])  # 10 goes back to the base value
    for name in SPEC.table_names:
        np.testing.assert_array_equal(live_reader.open_table(5, name), export_reader.open_table(3, name))
    for key, want in tiny_dense(SPEC, 7).items():
        np.testing.assert_array_equal(live_reader.dense_state(5)[key], want)


def test_diff_of_equal_versions_is_an_empty_delta(live, tmp_path):
    summary = diff_versions(live, 1, live, 1)
    assert summary.manifest.files == () and set(summary.rows_changed.values()) == {0}


def test_diff_refuses_other_specs_incomplete_parents_and_corrupt_inputs(live, tmp_path):
    other = tiny_spec(users=50, items=38)
    write_base(tmp_path / "other", 1, other, tiny_tables(other), tiny_dense(other))
    with pytest.raises(CheckpointError, match=r"the model specs differ: table 'items': \[38, 4\] float32, expected \[37, 4\]"):
        diff_versions(live, 1, tmp_path / "other", 1)
    with pytest.raises(CheckpointError, match="version 3 does not exist"):
        diff_versions(live, 3, live, 1)
    write_base(tmp_path / "export", 1, SPEC, tiny_tables(SPEC, 1), tiny_dense(SPEC))
    path = tmp_path / "export/versions/1/tables/items.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"version 1: tables/items.npy: sha256 .* \(corrupt file\)"):
        diff_versions(live, 1, tmp_path / "export", 1)
    assert CheckpointReader(live).store.list_versions() == [1], "a refused diff publishes nothing"


# ---------------------------------------------------------------- compact


def test_compact_writes_a_base_equal_to_the_delta_version(live):
    write_delta(live, 2, 1, SPEC, {"users": (np.array([1, 30]), _rows(1, 2))}, tiny_dense(SPEC, 3))
    write_delta(live, 3, 2, SPEC, {"items": (np.array([2]), _rows(2, 1)), "users": (np.array([30, 49]), _rows(3, 2))})
    reader = CheckpointReader(live)
    m = compact_version(live, 3, chunk_bytes=SMALL_CHUNK)
    assert (m.version, m.kind, m.parent) == (4, "base", None)
    reader.verify(4)
    for name, want in _tables_at(reader, 3).items():
        got = reader.open_table(4, name)
        assert isinstance(got, np.memmap)
        np.testing.assert_array_equal(got, want)
    for key, want in reader.dense_state(3).items():
        np.testing.assert_array_equal(reader.dense_state(4)[key], want)
    assert compact_version(live, 3, as_version=9).version == 9


def test_compact_refuses_a_corrupt_delta(live):
    write_delta(live, 2, 1, SPEC, {"users": (np.array([1, 30]), _rows(1, 2))})
    path = live / "versions/2/tables/users.rows.npy"
    data = bytearray(path.read_bytes())
    data[-2] ^= 4
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"version 2: tables/users.rows.npy: sha256"):
        compact_version(live, 2)
    assert CheckpointReader(live).store.list_versions() == [1, 2]


# ---------------------------------------------------------------- gc


@pytest.fixture
def history(live):
    """1 base <- 2 <- 3; 4 base <- 5; 6 (parent 3: a rollback to the first line)."""
    write_delta(live, 2, 1, SPEC, {"users": (np.array([1]), _rows(1, 1))})
    write_delta(live, 3, 2, SPEC, {"users": (np.array([2]), _rows(2, 1))})
    write_base(live, 4, SPEC, tiny_tables(SPEC, 4), tiny_dense(SPEC))
    write_delta(live, 5, 4, SPEC, {"items": (np.array([3]), _rows(3, 1))})
    write_delta(live, 6, 3, SPEC, {"items": (np.array([4]), _rows(4, 1))})
    return live


def test_gc_keeps_every_chain_a_kept_or_protected_version_needs(history):
    reader = CheckpointReader(history)
    before = {v: _tables_at(reader, v) for v in (5, 6)}
    assert collect_garbage(history, keep=1, protect=[5]) == []  # 6 needs 1, 2, 3; 5 needs 4
    assert collect_garbage(history, keep=1) == [4, 5]
    assert reader.store.list_versions() == [1, 2, 3, 6]
    reader.verify(6)
    for name, want in before[6].items():
        np.testing.assert_array_equal(reader.open_table(6, name), want)
    assert not list((history / "versions").glob("*.gc-*"))


def test_gc_deletes_old_partial_folders_but_not_a_writer_at_work(history):
    write_base(history, 9, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    for v in (7, 10):  # 7: abandoned below the kept versions; 10: a writer busy above the newest
        shutil.copytree(history / "versions/5", history / f"versions/{v}")
        (history / f"versions/{v}/COMPLETE").unlink()
    (history / "versions/8.tmp-abc").mkdir()  # a writer's staging folder
    assert collect_garbage(history, keep=1, protect=[6]) == [4, 5, 7]
    assert collect_garbage(history, keep=1) == [1, 2, 3, 6]
    assert sorted(p.name for p in (history / "versions").iterdir()) == ["10", "8.tmp-abc", "9"]


def test_gc_refusals_delete_nothing(history):
    with pytest.raises(ConfigError, match="keep must be a positive int"):
        collect_garbage(history, keep=0)
    with pytest.raises(CheckpointError, match="protected version 7 is not a complete version"):
        collect_garbage(history, keep=1, protect=[7])
    (history / "versions/2/COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="nothing deleted: cannot tell which versions version 6 needs .*delta 3 has parent 2"):
        collect_garbage(history, keep=1)
    assert CheckpointReader(history).store.list_versions() == [1, 2, 3, 4, 5, 6]


def test_split_version_path():
    store, version = split_version_path("file:///data/ckpt/versions/12")
    assert (store.uri, version) == ("/data/ckpt", 12)
    for bad in ("/data/ckpt", "/data/ckpt/versions/012", "/data/ckpt/3"):
        with pytest.raises(CheckpointError, match="is not a version folder"):
            split_version_path(bad)
