"""Staging and publishing one checkpoint version (docs/checkpoint.md, "Root and layout"): the
staging folder, synced file writes, hashing, the manifest and COMPLETE written last, and the
atomic rename to ``versions/<N>``. ``writer.VersionWriter`` (a base) and ``writer.DeltaWriter``
(a delta) add what each holds; this module is the publishing code they share.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Self

import numpy as np

from services.core.checkpoint.manifest import (
    COMPLETE_FILE,
    DENSE_FILE,
    KIND_BASE,
    MANIFEST_FILE,
    TABLE_DTYPE,
    FileEntry,
    Manifest,
    ModelSpec,
    version_dir,
)
from services.core.checkpoint.storage import CheckpointStore
from services.core.errors import CheckpointError
from services.core.types import TableSpec, Version

# Rows copied per step when a whole (possibly memory-mapped) array is given to write_table.
_COPY_CHUNK_BYTES = 64 << 20


def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_version_number(what: str, version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise CheckpointError(f"{what} must be a positive int, got {version!r}")
    return int(version)


def _iter_chunks(data: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    """A whole array in 64 MiB row slices (memory maps stay mostly unread), or the chunks given."""
    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            yield data  # rejected with a clear message by the caller
            return
        step = max(1, _COPY_CHUNK_BYTES // max(1, data.shape[1] * data.itemsize))
        for start in range(0, max(1, data.shape[0]), step):
            yield data[start : start + step]
        return
    yield from data


def write_rows_npy(path: pathlib.Path, table: TableSpec, rows: int, data: np.ndarray | Iterable[np.ndarray]) -> None:
    """Write a float32 ``[rows, table.dim]`` C-order .npy at ``path`` from one array or an
    iterable of ``[k, dim]`` chunks (only one chunk is ever resident). CheckpointError naming
    the table when a chunk is not float32 ``[k, dim]`` or the row count is not ``rows``; the
    partial file is then removed. Serves base tables and delta rows alike."""
    name = table.name
    # open_memmap writes numpy's own header and sizes the file; the rows are then streamed
    # through a plain file handle, so only one chunk is ever resident (a mapping of the
    # whole table would keep every written page in this process's RSS).
    header = np.lib.format.open_memmap(path, mode="w+", dtype=TABLE_DTYPE, shape=(rows, table.dim), fortran_order=False)
    data_offset = header.offset
    del header
    try:
        filled = 0
        with open(path, "r+b") as f:
            f.seek(data_offset)
            for chunk in _iter_chunks(data):
                chunk = np.asarray(chunk)
                if chunk.ndim != 2 or chunk.shape[1] != table.dim:
                    raise CheckpointError(f"table {name!r}: expected chunks of shape [k, {table.dim}], got {list(chunk.shape)}")
                if chunk.dtype.kind != "f" or chunk.dtype.itemsize != 4:
                    raise CheckpointError(f"table {name!r}: expected dtype float32, got {chunk.dtype} (cast with .astype(np.float32))")
                if filled + chunk.shape[0] > rows:
                    raise CheckpointError(f"table {name!r}: more than the expected {rows} rows were given")
                f.write(np.ascontiguousarray(chunk, dtype=TABLE_DTYPE).data)
                filled += chunk.shape[0]
        if filled != rows:
            raise CheckpointError(f"table {name!r}: expected {rows} rows, got {filled}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise


class StagedWriter:
    """Owns one staging folder and publishes it as ``versions/<N>``: the checks of the target,
    dense weights, hashing, manifest, COMPLETE last and the atomic rename. ``VersionWriter`` and
    ``DeltaWriter`` add what a base or a delta holds; the publishing code is this one."""

    _kind = KIND_BASE

    def __init__(
        self,
        store: CheckpointStore,
        version: Version,
        parent: Version | None,
        spec: ModelSpec,
        *,
        created_at: str | None,
        replace_partial: bool,
    ) -> None:
        spec.validate()
        for t in spec.tables:
            if t.dtype != "float32":
                raise CheckpointError(f"table {t.name!r}: format v1 stores float32, spec says {t.dtype!r}")
            if t.rows < 1 or t.dim < 1:
                raise CheckpointError(f"table {t.name!r}: rows and dim must be >= 1, got [{t.rows}, {t.dim}]")
        self._store = store
        self._version = version
        self._parent = parent
        self._spec = spec
        self._created_at = created_at
        self._replace_partial = replace_partial
        self._final = self._store.local_path(version_dir(self._version))
        self._check_target()
        versions = self._store.local_path("versions")
        versions.mkdir(parents=True, exist_ok=True)
        self._staging = versions / f"{self._version}.tmp-{secrets.token_hex(6)}"
        self._staging.mkdir()
        self._written: list[str] = []  # relpaths inside the version folder, in write order
        self._state = "open"  # open -> committed | aborted

    @property
    def version(self) -> Version:
        return self._version

    @property
    def staging_path(self) -> pathlib.Path:
        """The private folder files are written to before the commit renames it."""
        return self._staging

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == "open":
            self.abort()

    # ---------------------------------------------------------------- checks
    def _check_target(self) -> None:
        if not self._final.exists():
            return
        where = f"{self._store.uri}: {version_dir(self._version)}"
        if (self._final / COMPLETE_FILE).exists():
            raise CheckpointError(f"{where} is already complete; a complete version is never overwritten")
        if not self._replace_partial:
            raise CheckpointError(
                f"{where} exists without a COMPLETE marker (a partial write or a writer in progress); "
                f"remove it or pass replace_partial=True"
            )

    def _check_open(self) -> None:
        if self._state != "open":
            raise CheckpointError(f"version {self._version}: writer is already {self._state}")

    def _table(self, name: str) -> TableSpec:
        try:
            return self._spec.table(name)
        except KeyError:
            raise CheckpointError(f"table {name!r} is not in model {self._spec.name!r} (tables: {list(self._spec.table_names)})") from None

    def _staged(self, rel: str) -> pathlib.Path:
        """Where ``rel`` is written in the staging folder (its parent folder created)."""
        path = self._staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _missing(self) -> list[str]:
        """Files this kind of version needs before it may be committed."""
        return []

    # ---------------------------------------------------------------- writes
    def write_dense(self, state: Mapping[str, np.ndarray]) -> None:
        """Write ``dense.safetensors`` (no pickle): exactly the names and shapes of
        ``spec.dense_arch.param_shapes()``, each float32."""
        self._check_open()
        if DENSE_FILE in self._written:
            raise CheckpointError(f"dense weights were already written to version {self._version}")
        expected = self._spec.dense_arch.param_shapes()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise CheckpointError(f"dense weights do not match the architecture: missing {missing}, unexpected {extra}")
        tensors: dict[str, np.ndarray] = {}
        for pname, shape in expected.items():
            arr = np.asarray(state[pname])
            if tuple(arr.shape) != shape:
                raise CheckpointError(f"dense weight {pname!r}: expected shape {list(shape)}, got {list(arr.shape)}")
            if arr.dtype != np.float32:
                raise CheckpointError(f"dense weight {pname!r}: expected dtype float32, got {arr.dtype}")
            tensors[pname] = np.ascontiguousarray(arr, dtype=TABLE_DTYPE)
        from safetensors.numpy import save

        # save() + our own write (not save_file): the file gets the usual umask permissions.
        _write_synced(self._staged(DENSE_FILE), save(tensors))
        self._written.append(DENSE_FILE)

    # ---------------------------------------------------------------- publish
    def commit(self) -> Manifest:
        """Hash and fsync every file, write manifest.json, then COMPLETE last, and publish the
        version with an atomic rename. Returns the manifest written."""
        self._check_open()
        missing = self._missing()
        if missing:
            raise CheckpointError(f"version {self._version}: cannot commit a {self._kind} without {missing}")
        try:
            entries = []
            staging_rel = f"versions/{self._staging.name}"
            for rel in sorted(self._written):
                path = self._staging / rel
                _fsync_file(path)
                digest = self._store.sha256(f"{staging_rel}/{rel}")
                entries.append(FileEntry(rel, path.stat().st_size, digest))
            created_at = self._created_at
            if created_at is None:
                created_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            manifest = Manifest(self._version, self._kind, self._parent, self._spec, tuple(entries), created_at)
            data = manifest.to_bytes()
            if (self._staging / "tables").exists():
                _fsync_dir(self._staging / "tables")
            _write_synced(self._staging / MANIFEST_FILE, data)
            _write_synced(self._staging / COMPLETE_FILE, (hashlib.sha256(data).hexdigest() + "\n").encode())
            _fsync_dir(self._staging)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return manifest

    def _publish(self) -> None:
        self._check_target()
        if self._final.exists():  # replace_partial=True and a partial version is in the way
            shutil.rmtree(self._final)
        try:
            os.rename(self._staging, self._final)
        except OSError as e:
            raise CheckpointError(
                f"{self._store.uri}: cannot publish {version_dir(self._version)} "
                f"(another writer published it meanwhile?): {e}"
            ) from e
        _fsync_dir(self._final.parent)

    def abort(self) -> None:
        """Remove the staging folder; the version is not published. Idempotent."""
        if self._state == "committed":
            raise CheckpointError(f"version {self._version} is already committed")
        self._state = "aborted"
        shutil.rmtree(self._staging, ignore_errors=True)
