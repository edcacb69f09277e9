"""Checkpoint deltas: write delta chains, read them back against a plain numpy reference, and
refuse every broken variant (writer and reader)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.core.checkpoint.manifest import Manifest
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import DeltaWriter, next_version, write_base, write_delta
from services.core.errors import CheckpointError, InvalidArgumentError
from tests.support.tiny_checkpoint import DIM, replace_file, republish, tiny_dense, tiny_spec, tiny_tables

SPEC = tiny_spec(users=50, items=37)


def _rows(seed: int, k: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, DIM), dtype=np.float32)


# Version -> (parent, {table: (ids as given, rows)}, dense seed or None). 4 branches off 2.
CHAIN = {
    2: (1, {"users": (np.array([3, 10, 40]), _rows(2, 3)), "items": (np.array([0, 36]), _rows(3, 2))}, None),
    3: (2, {"users": (np.array([11, 10]), _rows(4, 2))}, 30),
    4: (3, {"users": (np.array([45, 2, 49]), _rows(5, 3)), "items": (np.array([5]), _rows(6, 1))}, None),
    5: (2, {"items": (np.array([1, 36, 20]), _rows(7, 3)), "users": (np.array([], np.int64), np.zeros((0, DIM), np.float32))}, 50),
}


def _reference(version: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tables and dense weights at ``version``, by applying the deltas to numpy copies."""
    if version == 1:
        return {k: v.copy() for k, v in tiny_tables(SPEC).items()}, tiny_dense(SPEC)
    parent, changes, dense_seed = CHAIN[version]
    tables, dense = _reference(parent)
    for name, (ids, rows) in changes.items():
        tables[name][ids] = rows
    return tables, (dense if dense_seed is None else tiny_dense(SPEC, dense_seed))


@pytest.fixture
def root(tmp_path):
    """Base 1 and deltas 2 <- 3 <- 4, and 5 whose parent is 2 (a branch after a rollback)."""
    write_base(tmp_path, 1, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    for version, (parent, changes, dense_seed) in CHAIN.items():
        dense = None if dense_seed is None else tiny_dense(SPEC, dense_seed)
        write_delta(tmp_path, version, parent, SPEC, changes, dense)
    return tmp_path


# ---------------------------------------------------------------- round trip


def test_manifests_chains_and_files(root):
    reader = CheckpointReader(root)
    m = reader.verify(4)
    assert (m.kind, m.parent, m.model) == ("delta", 3, SPEC)
    assert sorted(f.path for f in m.files) == ["tables/items.ids.npy", "tables/items.rows.npy", "tables/users.ids.npy", "tables/users.rows.npy"]
    assert m.delta_tables == ("users", "items")
    assert [c.version for c in reader.chain(4)] == [1, 2, 3, 4]
    assert [c.version for c in reader.chain(5)] == [1, 2, 5]
    assert [c.version for c in reader.chain(1)] == [1]
    assert {reader.chain(v)[0].version for v in range(1, 6)} == {1}
    assert reader.manifest(5).delta_tables == ("items",), "a table with k == 0 is left out"
    assert reader.manifest(3).lists("dense.safetensors") and not reader.manifest(2).lists("dense.safetensors")
    assert next_version(root) == 6


def test_delta_rows_are_sorted_read_only_memory_maps(root):
    reader = CheckpointReader(root)
    ids, rows = reader.delta_rows(4, "users", verify=True)
    np.testing.assert_array_equal(ids, [2, 45, 49])
    given_ids, given_rows = CHAIN[4][1]["users"]
    np.testing.assert_array_equal(rows, given_rows[[1, 0, 2]])  # permuted with the ids
    assert ids.dtype == np.int64 and rows.dtype == np.float32 and rows.shape == (3, DIM)
    assert isinstance(ids, np.memmap) and not ids.flags.writeable and not rows.flags.writeable
    assert reader.delta_rows(3, "items") is None
    with pytest.raises(CheckpointError, match="version 1 is a base, not a delta"):
        reader.delta_rows(1, "users")
    with pytest.raises(CheckpointError, match="model has no table 'nope'"):
        reader.delta_rows(2, "nope")


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_every_access_path_equals_the_numpy_reference(root, version):
    reader = CheckpointReader(root)
    tables, dense = _reference(version)
    rng = np.random.default_rng(version)
    for name, want in tables.items():
        ids = rng.integers(0, len(want), 40)  # any order, duplicates
        ids[:3] = [len(want) - 1, 0, len(want) - 1]
        got = reader.rows_at(version, name, ids)
        assert got.dtype == np.float32 and got.shape == (40, DIM) and got.flags.writeable
        np.testing.assert_array_equal(got, want[ids])
        assert reader.rows_at(version, name, np.array([], np.int64)).shape == (0, DIM)
        for parts in (1, 2, 3):
            for p in range(parts):
                part = reader.partition_rows(version, name, p, parts)
                assert part.flags.c_contiguous and part.flags.writeable and part.dtype == np.float32
                np.testing.assert_array_equal(part, want[p::parts], err_msg=f"{name} v{version} partition {p}/{parts}")
        table = reader.open_table(version, name)
        assert not table.flags.writeable
        np.testing.assert_array_equal(table, want)
        chunks = list(reader.table_chunks(version, name, chunk_bytes=3 * DIM * 4))
        assert [s for s, _ in chunks] == list(range(0, len(want), 3))
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), want)
    state = reader.dense_state(version)
    assert state.keys() == dense.keys()
    for key in dense:
        np.testing.assert_array_equal(state[key], dense[key])


def test_open_table_of_an_unchanged_table_is_the_base_memory_map(root):
    reader = CheckpointReader(root)
    items = reader.open_table(3, "items")  # changed by 2: materialized
    assert not isinstance(items, np.memmap)
    write_delta(root, 6, 1, SPEC, {"users": (np.array([1]), _rows(9, 1))})
    items = reader.open_table(6, "items")
    assert isinstance(items, np.memmap) and str(items.filename).endswith("versions/1/tables/items.npy")


def test_partition_and_ids_arguments_are_checked(root):
    reader = CheckpointReader(root)
    for partition, parts in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(InvalidArgumentError, match=f"partition {partition} of {parts}"):
            reader.partition_rows(4, "users", partition, parts)
    for bad in (50, -1):
        with pytest.raises(InvalidArgumentError, match=rf"table 'users': id {bad} is outside \[0, 50\)"):
            reader.rows_at(4, "users", np.array([1, bad]))
    with pytest.raises(InvalidArgumentError, match="ids must be a 1-D integer array"):
        reader.rows_at(4, "users", np.array([1.0]))


# ---------------------------------------------------------------- changed_ids


def test_changed_ids_forward_backward_and_across_branches(root):
    reader = CheckpointReader(root)
    forward = reader.changed_ids(1, 4, "users")
    assert forward.dtype == np.int64
    np.testing.assert_array_equal(forward, [2, 3, 10, 11, 40, 45, 49])
    np.testing.assert_array_equal(reader.changed_ids(2, 4, "users"), [2, 10, 11, 45, 49])
    np.testing.assert_array_equal(reader.changed_ids(4, 2, "users"), [2, 10, 11, 45, 49])  # rollback
    np.testing.assert_array_equal(reader.changed_ids(4, 5, "items"), [1, 5, 20, 36])  # 4 -> 3 -> 2 -> 5
    np.testing.assert_array_equal(reader.changed_ids(4, 5, "users"), [2, 10, 11, 45, 49])
    np.testing.assert_array_equal(reader.changed_ids(3, 3, "users"), [])
    assert reader.changed_ids(3, 3, "users").dtype == np.int64
    # The ids cover every row that differs, in both directions.
    for a, b in ((1, 4), (4, 5), (5, 3), (4, 1)):
        for name in ("users", "items"):
            ids = reader.changed_ids(a, b, name)
            differ = np.flatnonzero((_reference(a)[0][name] != _reference(b)[0][name]).any(axis=1))
            assert set(differ) <= set(ids), (a, b, name)


def test_changed_ids_is_none_across_bases(root):
    write_base(root, 6, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))  # the same values, another base
    write_delta(root, 7, 6, SPEC, {"users": (np.array([4]), _rows(11, 1))})
    reader = CheckpointReader(root)
    assert reader.changed_ids(4, 6, "users") is None
    assert reader.changed_ids(7, 1, "users") is None
    np.testing.assert_array_equal(reader.changed_ids(6, 7, "users"), [4])
    assert reader.chain(7)[0].version == 6


# ---------------------------------------------------------------- writer refusals


@pytest.fixture
def base(tmp_path):
    write_base(tmp_path, 1, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    return tmp_path


@pytest.mark.parametrize(
    "table, ids, rows, match",
    [
        ("users", [4, 9, 4], _rows(0, 3), "table 'users': id 4 is listed twice"),
        ("users", [4, 50], _rows(0, 2), r"table 'users': id 50 is outside \[0, 50\)"),
        ("users", [-1, 3], _rows(0, 2), r"table 'users': id -1 is outside \[0, 50\)"),
        ("items", np.array([2**63 + 5], np.uint64), _rows(0, 1), r"table 'items': id 9223372036854775813 is outside \[0, 37\)"),
        ("users", np.array([1.0, 2.0]), _rows(0, 2), "table 'users': ids must be a 1-D integer array, got float64"),
        ("users", [[1, 2]], _rows(0, 2), r"ids must be a 1-D integer array, got int64 \[1, 2\]"),
        ("users", [1, 2], _rows(0, 3), r"table 'users': rows must be \[k, dim\] = \[2, 4\] \(one row per id\), got \[3, 4\]"),
        ("users", [1, 2], np.zeros((2, DIM + 1), np.float32), r"got \[2, 5\]"),
        ("users", [1, 2], np.zeros((2, DIM)), "table 'users': rows must be float32, got float64"),
        ("nope", [1], _rows(0, 1), "table 'nope' is not in model 'tiny'"),
    ],
)
def test_write_rows_refuses_bad_ids_and_rows(base, table, ids, rows, match):
    with DeltaWriter(base, 2, 1, SPEC) as w:
        with pytest.raises(CheckpointError, match=match):
            w.write_rows(table, np.asarray(ids), rows)
        assert not list(w.staging_path.rglob("*.npy")), "nothing of a refused table is left"
        w.write_rows("users", np.array([1]), _rows(0, 1))  # the writer is still usable
        w.commit()


def test_write_rows_twice_for_one_table_is_refused(base):
    with DeltaWriter(base, 2, 1, SPEC) as w:
        w.write_rows("users", np.array([1]), _rows(0, 1))
        with pytest.raises(CheckpointError, match="rows of table 'users' were already written to delta 2"):
            w.write_rows("users", np.array([2]), _rows(0, 1))


def test_write_sorted_rows_streams_chunks_and_refuses_unsorted_ids(base):
    with DeltaWriter(base, 2, 1, SPEC) as w:
        with pytest.raises(CheckpointError, match=r"table 'users': ids\[2\] = 3 follows ids\[1\] = 7 \(ids must be sorted strictly increasing\)"):
            w.write_sorted_rows("users", np.array([1, 7, 3]), [_rows(0, 3)])
        with pytest.raises(CheckpointError, match="table 'items': expected 3 rows, got 2"):
            w.write_sorted_rows("items", np.array([1, 3, 7]), [_rows(0, 2)])
        w.write_sorted_rows("items", np.array([1, 3, 7]), [_rows(0, 2), _rows(1, 1)])
        w.commit()
    ids, rows = CheckpointReader(base).delta_rows(2, "items")
    np.testing.assert_array_equal(ids, [1, 3, 7])
    np.testing.assert_array_equal(rows, np.concatenate([_rows(0, 2), _rows(1, 1)]))


def test_delta_writer_refuses_bad_parents(base):
    with pytest.raises(CheckpointError, match="delta 2: parent must be a lower version, got 2"):
        DeltaWriter(base, 2, 2, SPEC)
    with pytest.raises(CheckpointError, match="delta 3: parent 2 is not a complete readable version: .*version 2 does not exist"):
        DeltaWriter(base, 3, 2, SPEC)
    shutil.copytree(base / "versions/1", base / "versions/2")
    (base / "versions/2/COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="parent 2 is not a complete readable version: .*version 2 has no COMPLETE marker"):
        DeltaWriter(base, 3, 2, SPEC)
    with pytest.raises(CheckpointError, match=r"delta 3: model spec differs from parent 1's: table 'items': \[38, 4\] float32, expected \[37, 4\] float32"):
        DeltaWriter(base, 3, 1, tiny_spec(users=50, items=38))
    with pytest.raises(CheckpointError, match="model name 'other', expected 'tiny'"):
        DeltaWriter(base, 3, 1, tiny_spec(users=50, items=37, name="other"))
    assert sorted(p.name for p in (base / "versions").iterdir()) == ["1", "2"], "a refused writer stages nothing"


def test_an_empty_delta_and_a_failed_one(base):
    m = write_delta(base, 2, 1, SPEC, {})
    assert (m.kind, m.parent, m.files) == ("delta", 1, ())
    with pytest.raises(RuntimeError):
        with DeltaWriter(base, 3, 2, SPEC) as w:
            w.write_rows("users", np.array([1]), _rows(0, 1))
            raise RuntimeError("trainer crashed")
    assert sorted(p.name for p in (base / "versions").iterdir()) == ["1", "2"]


def test_next_version_counts_incomplete_folders(tmp_path):
    assert next_version(tmp_path) == 1
    (tmp_path / "versions/7.tmp-abc").mkdir(parents=True)
    assert next_version(tmp_path) == 1
    (tmp_path / "versions/4").mkdir()
    assert next_version(tmp_path) == 5


# ---------------------------------------------------------------- reader refusals


def _damage(root, path: str, fn) -> None:
    file = root / "versions" / path
    data = bytearray(file.read_bytes())
    fn(data)
    file.write_bytes(bytes(data))


def test_unsorted_or_out_of_range_ids_in_a_file_are_refused(root):
    reader = CheckpointReader(root)
    m = reader.manifest(2)
    replace_file(root, m, "tables/users.ids.npy", np.array([3, 40, 10], np.int64))
    message = r"version 2: table 'users' \(tables/users.ids.npy\): ids\[2\] = 10 follows ids\[1\] = 40"
    for read in (lambda: reader.delta_rows(2, "users"), lambda: reader.verify(2), lambda: reader.rows_at(4, "users", [1])):
        with pytest.raises(CheckpointError, match=message):
            read()
    replace_file(root, reader.manifest(2), "tables/users.ids.npy", np.array([3, 10, 50], np.int64))
    with pytest.raises(CheckpointError, match=r"table 'users' \(tables/users.ids.npy\): id 50 is outside \[0, 50\)"):
        reader.partition_rows(3, "users", 0, 2)


@pytest.mark.parametrize(
    "path, array, match",
    [
        ("tables/users.ids.npy", np.array([3, 10, 40], np.int32), r"tables/users.ids.npy\): expected int64 \[k\] C order, got int32 \[3\]"),
        ("tables/users.ids.npy", np.array([[3, 10, 40]]), r"expected int64 \[k\] C order, got int64 \[1, 3\]"),
        ("tables/users.ids.npy", np.array([3, 10], np.int64), r"tables/users.rows.npy\): expected float32 \[2, 4\] C order, got float32 \[3, 4\]"),
        ("tables/users.rows.npy", np.zeros((3, DIM), np.float64), r"tables/users.rows.npy\): expected float32 \[3, 4\] C order, got float64"),
    ],
)
def test_bad_headers_are_refused(root, path, array, match):
    reader = CheckpointReader(root)
    replace_file(root, reader.manifest(2), path, array)
    with pytest.raises(CheckpointError, match=match):
        reader.delta_rows(2, "users")
    with pytest.raises(CheckpointError, match=match):
        reader.verify(2)


@pytest.mark.parametrize("path", ["2/tables/users.ids.npy", "2/tables/users.rows.npy"])
def test_truncated_delta_file_is_a_size_error(root, path):
    size = (root / "versions" / path).stat().st_size
    _damage(root, path, lambda data: data.__delitem__(slice(-8, None)))
    reader = CheckpointReader(root)
    name = path.split("/", 1)[1]
    for read in (lambda: reader.delta_rows(2, "users"), lambda: reader.verify(2, full=False), lambda: reader.open_table(4, "users", verify=False)):
        with pytest.raises(CheckpointError, match=rf"version 2: {name}: size {size - 8} bytes, manifest says {size}"):
            read()


def test_flipped_byte_is_caught_by_sha256_only_when_asked(root):
    _damage(root, "2/tables/users.rows.npy", lambda data: data.__setitem__(-3, data[-3] ^ 0x10))
    reader = CheckpointReader(root)
    reader.delta_rows(2, "users")  # sizes and headers are fine
    reader.verify(2, full=False)
    match = r"version 2: tables/users.rows.npy: sha256 [0-9a-f]{64}, manifest says [0-9a-f]{64} \(corrupt file\)"
    for read in (lambda: reader.delta_rows(2, "users", verify=True), lambda: reader.verify(2), lambda: reader.open_table(3, "users")):
        with pytest.raises(CheckpointError, match=match):
            read()
    reader.verify(3)  # another version of the chain: its own files are fine


def test_missing_complete_of_a_delta_or_its_parent(root):
    (root / "versions/3/COMPLETE").unlink()
    reader = CheckpointReader(root)
    with pytest.raises(CheckpointError, match="version 3 has no COMPLETE marker"):
        reader.delta_rows(3, "users")
    with pytest.raises(CheckpointError, match="version 4: broken chain: delta 4 has parent 3, which is unusable: .*version 3 has no COMPLETE marker"):
        reader.chain(4)
    for read in (lambda: reader.verify(4, full=False), lambda: reader.open_table(4, "items"), lambda: reader.dense_state(4)):
        with pytest.raises(CheckpointError, match="broken chain: delta 4 has parent 3"):
            read()
    reader.verify(5)  # the branch that does not need 3


def test_one_view_reads_what_it_checked_once_and_only_within_the_block(root):
    """A shard applying a version walks the same chains many times inside ``one_view``: the
    manifests and delta files it checked there are taken as they were; outside, every call
    looks again, so a marker removed meanwhile is caught."""
    reader = CheckpointReader(root)
    with reader.one_view():
        want = reader.rows_at(4, "users", np.array([2, 10, 45]))
        (root / "versions/3/COMPLETE").unlink()
        np.testing.assert_array_equal(reader.rows_at(4, "users", np.array([2, 10, 45])), want)
        np.testing.assert_array_equal(reader.changed_ids(2, 4, "users"), [2, 10, 11, 45, 49])
    with pytest.raises(CheckpointError, match="version 3 has no COMPLETE marker"):
        reader.chain(4)


def test_missing_parent_is_named(root):
    shutil.rmtree(root / "versions/2")
    with pytest.raises(CheckpointError, match="version 5: broken chain: delta 5 has parent 2, which is unusable: .*version 2 does not exist"):
        CheckpointReader(root).chain(5)


def test_a_delta_whose_spec_differs_from_its_base_is_refused(root):
    m = CheckpointReader(root).manifest(3)
    republish(root, 3, Manifest(3, m.kind, m.parent, tiny_spec(users=51, items=37), m.files, m.created_at))
    reader = CheckpointReader(root)
    with pytest.raises(CheckpointError, match=r"version 4: broken chain: delta 3 \(parent 2\) has a model spec that differs from its base 1's: table 'users': \[51, 4\]"):
        reader.chain(4)


def test_a_delta_listing_half_a_table_or_a_whole_table_is_refused(root):
    m = CheckpointReader(root).manifest(2)
    republish(root, 2, Manifest(2, m.kind, 1, m.model, tuple(f for f in m.files if f.path != "tables/items.rows.npy"), m.created_at))
    with pytest.raises(CheckpointError, match="version 2: delta lists 'tables/items.ids.npy' but not 'tables/items.rows.npy'"):
        CheckpointReader(root).manifest(2)
    base_entry = CheckpointReader(root).manifest(1).file("tables/users.npy")
    republish(root, 2, Manifest(2, m.kind, 1, m.model, m.files + (base_entry,), m.created_at))
    with pytest.raises(CheckpointError, match="version 2: delta lists 'tables/users.npy'; a delta's table files are"):
        CheckpointReader(root).manifest(2)
