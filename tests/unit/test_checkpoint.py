"""Checkpoint format v1: write a base version, read it back, and refuse every broken variant."""

from __future__ import annotations

import hashlib
import pathlib
import shutil

import numpy as np
import pytest

from services.core.checkpoint.manifest import KIND_DELTA, Manifest, ModelSpec
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.storage import CheckpointStore, absolute_uri
from services.core.checkpoint.writer import VersionWriter, write_base
from services.core.errors import CheckpointError
from tests.support.tiny_checkpoint import DIM, republish, tiny_dense, tiny_spec, tiny_tables


def _spec() -> ModelSpec:
    return tiny_spec()


def _tables(seed: int = 0) -> dict[str, np.ndarray]:
    return tiny_tables(_spec(), seed)


def _dense(seed: int = 0) -> dict[str, np.ndarray]:
    return tiny_dense(_spec(), seed)


@pytest.fixture
def root(tmp_path):
    """A checkpoint root holding complete base version 1."""
    write_base(tmp_path, 1, _spec(), _tables(), _dense())
    return tmp_path


# ---------------------------------------------------------------- round trip


def test_round_trip(root):
    reader = CheckpointReader(root)
    assert reader.latest_version() == 1
    m = reader.verify(1)
    assert m.version == 1 and m.kind == "base" and m.parent is None and m.model == _spec()
    assert sorted(f.path for f in m.files) == ["dense.safetensors", "tables/items.npy", "tables/users.npy"]
    for name, want in _tables().items():
        got = reader.open_table(1, name)
        assert isinstance(got, np.memmap) and got.dtype == np.float32 and got.shape == want.shape
        assert got.flags.c_contiguous and not got.flags.writeable
        np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError):
            got[0, 0] = 1.0
    state = reader.dense_state(1)
    assert state.keys() == _dense().keys()
    for name, want in _dense().items():
        np.testing.assert_array_equal(state[name], want)
    assert not list((root / "versions").glob("*.tmp-*")), "staging folder left behind"


def test_chunked_table_equals_whole_array(tmp_path):
    tables = _tables()
    chunked = dict(tables, users=(tables["users"][i : i + 3] for i in range(0, 10, 3)))
    write_base(tmp_path, 1, _spec(), chunked, _dense())
    np.testing.assert_array_equal(CheckpointReader(tmp_path).open_table(1, "users"), tables["users"])


def test_file_uri_and_plain_path_read_the_same(root):
    by_uri = CheckpointReader(f"file://{root}")
    assert by_uri.store.uri == f"file://{root}"
    assert by_uri.manifest(1) == CheckpointReader(str(root)).manifest(1)


def test_complete_holds_manifest_sha256(root):
    data = (root / "versions/1/manifest.json").read_bytes()
    assert (root / "versions/1/COMPLETE").read_text().strip() == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- reader refusals


def test_missing_complete_is_refused(root):
    (root / "versions/1/COMPLETE").unlink()
    reader = CheckpointReader(root)
    with pytest.raises(CheckpointError, match="version 1 has no COMPLETE marker \\(partial write\\?\\)"):
        reader.manifest(1)
    with pytest.raises(CheckpointError, match="no complete version"):
        reader.latest_version()


def test_corrupted_byte_is_a_checksum_error_naming_the_file(root):
    path = root / "versions/1/tables/users.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = CheckpointReader(root)
    with pytest.raises(CheckpointError, match=r"tables/users\.npy: sha256 [0-9a-f]{64}, manifest says [0-9a-f]{64}"):
        reader.verify(1)
    with pytest.raises(CheckpointError, match=r"tables/users\.npy: sha256"):
        reader.open_table(1, "users")
    reader.verify(1, full=False)  # same size: only a full check sees it
    reader.open_table(1, "items")  # other tables stay readable


def test_truncated_file_is_a_size_error(root):
    path = root / "versions/1/tables/items.npy"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 16)
    reader = CheckpointReader(root)
    for check in (lambda: reader.verify(1, full=False), lambda: reader.open_table(1, "items", verify=False)):
        with pytest.raises(CheckpointError, match=rf"tables/items\.npy: size {size - 16} bytes, manifest says {size}"):
            check()


def test_missing_file_is_named(root):
    (root / "versions/1/dense.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"dense\.safetensors: missing"):
        CheckpointReader(root).verify(1)


def test_wrong_shape_table_is_refused_naming_table_expected_and_actual(root):
    # Same byte count, transposed shape: sizes and checksums agree, the .npy header does not.
    np.save(root / "versions/1/tables/users.npy", _tables()["users"].T.copy())
    reader = CheckpointReader(root)
    m = reader.manifest(1)
    store = CheckpointStore(root)
    files = tuple(
        type(f)(f.path, store.size_bytes(f"versions/1/{f.path}"), store.sha256(f"versions/1/{f.path}")) for f in m.files
    )
    republish(root, 1, Manifest(1, m.kind, None, m.model, files, m.created_at))
    reader.verify(1)
    with pytest.raises(CheckpointError, match=r"table 'users'.*expected float32 \[10, 4\] C order, got float32 \[4, 10\]"):
        reader.open_table(1, "users")


def test_tampered_manifest_mismatches_complete(root):
    path = root / "versions/1/manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"rows": 10', b'"rows": 11'))
    with pytest.raises(CheckpointError, match="COMPLETE holds sha256 .* but manifest.json hashes to"):
        CheckpointReader(root).manifest(1)


def test_manifest_version_must_match_its_folder(root):
    shutil.copytree(root / "versions/1", root / "versions/2")
    with pytest.raises(CheckpointError, match="manifest.json says version 1, its folder says 2"):
        CheckpointReader(root).manifest(2)


def test_manifest_may_not_name_files_outside_the_checkpoint(root):
    m = CheckpointReader(root).manifest(1)
    evil = m.files + (type(m.files[0])("../../etc/passwd", 1, "0" * 64),)
    republish(root, 1, Manifest(1, m.kind, None, m.model, evil, m.created_at))
    with pytest.raises(CheckpointError, match="lists '../../etc/passwd'; paths must be relative to the version folder"):
        CheckpointReader(root).manifest(1)


def test_a_delta_without_files_reads_as_its_parent(root):
    m = CheckpointReader(root).manifest(1)
    (root / "versions/2").mkdir()
    republish(root, 2, Manifest(2, KIND_DELTA, 1, m.model, (), m.created_at))
    reader = CheckpointReader(root)
    assert reader.manifest(2).parent == 1 and [c.version for c in reader.chain(2)] == [1, 2]
    table = reader.open_table(2, "users")
    assert isinstance(table, np.memmap)  # nothing changed: the base's own memory map
    np.testing.assert_array_equal(table, _tables()["users"])
    assert reader.dense_state(2).keys() == _dense().keys()


@pytest.mark.parametrize("uri", ["s3://bucket/ckpt", "gs://bucket/ckpt", "http://host/ckpt", "file://otherhost/ckpt"])
def test_unknown_uri_scheme_is_refused(uri):
    with pytest.raises(CheckpointError, match="checkpoint root"):
        CheckpointStore(uri)
    with pytest.raises(CheckpointError):
        CheckpointReader(uri)


def test_absolute_uri_makes_relative_roots_absolute_and_keeps_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_uri("ckpt") == str(tmp_path / "ckpt")
    assert absolute_uri("./a/../ckpt") == str(tmp_path / "ckpt")
    assert absolute_uri(pathlib.Path("ckpt")) == str(tmp_path / "ckpt")
    assert absolute_uri("file:ckpt") == (tmp_path / "ckpt").as_uri()
    for given in ("/data/ckpt", "file:///data/ckpt", "file://localhost/data/ckpt"):
        assert absolute_uri(given) == given
    # what it returns names the same root from anywhere
    write_base(tmp_path / "ckpt", 1, _spec(), _tables(), _dense())
    uris = [absolute_uri("ckpt"), absolute_uri("file:ckpt")]
    monkeypatch.chdir(tmp_path.parent)
    assert [CheckpointReader(u).latest_version() for u in uris] == [1, 1]
    for bad in ("s3://bucket/ckpt", "file://otherhost/ckpt", "", "  "):
        with pytest.raises(CheckpointError, match="checkpoint root"):
            absolute_uri(bad)


# ---------------------------------------------------------------- versions


def test_latest_version_ignores_incomplete_versions_and_junk(root):
    write_base(root, 3, _spec(), _tables(3), _dense(3))
    shutil.copytree(root / "versions/3", root / "versions/5")
    (root / "versions/5/COMPLETE").unlink()  # partial
    for junk in ("4.tmp-abc123", "007", "0", "-2", "latest", "6x"):
        (root / "versions" / junk).mkdir()
    (root / "versions/9").write_text("a file, not a folder")
    reader = CheckpointReader(root)
    assert reader.store.list_versions() == [1, 3, 5]
    assert reader.complete_versions() == [1, 3]
    assert reader.latest_version() == 3


def test_no_versions_at_all(tmp_path):
    assert CheckpointStore(tmp_path / "absent").list_versions() == []
    with pytest.raises(CheckpointError, match="no complete version"):
        CheckpointReader(tmp_path).latest_version()


# ---------------------------------------------------------------- writer refusals


def test_overwriting_a_complete_version_is_refused(root):
    before = (root / "versions/1/manifest.json").read_bytes()
    with pytest.raises(CheckpointError, match="already complete"):
        write_base(root, 1, _spec(), _tables(9), _dense(9))
    assert (root / "versions/1/manifest.json").read_bytes() == before
    assert not list((root / "versions").glob("*.tmp-*"))


def test_partial_version_is_replaced_only_when_asked(root):
    shutil.copytree(root / "versions/1", root / "versions/2")
    (root / "versions/2/COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="exists without a COMPLETE marker"):
        VersionWriter(root, 2, _spec())
    with VersionWriter(root, 2, _spec(), replace_partial=True) as w:
        for name, arr in _tables(2).items():
            w.write_table(name, arr)
        w.write_dense(_dense(2))
        w.commit()
    np.testing.assert_array_equal(CheckpointReader(root).open_table(2, "items"), _tables(2)["items"])


def test_failed_write_leaves_nothing_published(tmp_path):
    with pytest.raises(RuntimeError):
        with VersionWriter(tmp_path, 1, _spec()) as w:
            w.write_table("users", _tables()["users"])
            raise RuntimeError("trainer crashed")
    assert list((tmp_path / "versions").iterdir()) == []


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("nope", np.zeros((10, DIM), np.float32), "table 'nope' is not in model 'tiny'"),
        ("users", np.zeros((10, DIM), np.float64), "table 'users': expected dtype float32, got float64"),
        ("users", np.zeros((10, DIM + 1), np.float32), r"table 'users': expected chunks of shape \[k, 4\], got \[10, 5\]"),
        ("users", np.zeros((9, DIM), np.float32), "table 'users': expected 10 rows, got 9"),
        ("users", [np.zeros((6, DIM), np.float32)] * 2, "table 'users': more than the expected 10 rows"),
        ("users", np.zeros(10 * DIM, np.float32), r"table 'users': expected chunks of shape \[k, 4\], got \[40\]"),
    ],
)
def test_writer_validates_tables(tmp_path, name, data, match):
    with VersionWriter(tmp_path, 1, _spec()) as w:
        with pytest.raises(CheckpointError, match=match):
            w.write_table(name, data)
        assert not (w.staging_path / "tables/users.npy").exists()


def test_writer_validates_dense_weights(tmp_path):
    dense = _dense()
    with VersionWriter(tmp_path, 1, _spec()) as w:
        with pytest.raises(CheckpointError, match=r"missing \['top_mlp.2.bias'\], unexpected \['extra'\]"):
            w.write_dense({**{k: v for k, v in dense.items() if k != "top_mlp.2.bias"}, "extra": np.zeros(1, np.float32)})
        with pytest.raises(CheckpointError, match=r"dense weight 'bottom_mlp.0.weight': expected shape \[3, 1\], got \[1, 3\]"):
            w.write_dense({**dense, "bottom_mlp.0.weight": dense["bottom_mlp.0.weight"].T})
        with pytest.raises(CheckpointError, match="expected dtype float32, got float64"):
            w.write_dense({**dense, "top_mlp.0.bias": dense["top_mlp.0.bias"].astype(np.float64)})


def test_commit_needs_every_table_and_the_dense_weights(tmp_path):
    with VersionWriter(tmp_path, 1, _spec()) as w:
        w.write_table("users", _tables()["users"])
        with pytest.raises(CheckpointError, match=r"cannot commit a base without \['tables/items.npy', 'dense.safetensors'\]"):
            w.commit()
    assert CheckpointStore(tmp_path).list_versions() == []
