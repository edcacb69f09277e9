"""CheckpointReader: finds, checks and opens versions of a checkpoint (format v1).

A version is accepted only as a whole. ``manifest(N)`` refuses a version when:

- ``versions/N/COMPLETE`` is missing (a partial write, or a writer still busy);
- COMPLETE does not hold the sha256 hex of ``manifest.json`` (the manifest was changed or torn);
- the manifest is malformed, names a version other than N, or a base lacks a table or
  ``dense.safetensors`` of its model spec.

``verify(N)`` then checks every listed file: present, the listed size and (``full=True``) the
listed sha256. ``open_table`` memory-maps a table read-only after checking its size (and, with
``verify=True``, its sha256) and its .npy header against the spec.

Every refusal is a CheckpointError whose message names the version, file or table and the
expected and actual values.

Deltas (``kind: delta`` with a parent, ``tables/<t>.ids.npy`` + ``.rows.npy``) are the next
format step: ``_resolve_chain`` is where ``base + deltas`` will be resolved; today it refuses a
delta. The reader holds no mutable state: any thread may call it (it does blocking file I/O, so
not from an event loop).

Pure module: numpy and safetensors only (no torch, no grpc).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from services.core.checkpoint.manifest import (
    COMPLETE_FILE,
    DENSE_FILE,
    KIND_BASE,
    MANIFEST_FILE,
    Manifest,
    table_file,
    version_dir,
)
from services.core.checkpoint.storage import CheckpointStore
from services.core.checkpoint.writer import TABLE_DTYPE
from services.core.errors import CheckpointError
from services.core.types import Version


class CheckpointReader:
    """Read-only view of one checkpoint root. See the module docstring for what is refused."""

    def __init__(self, store_or_uri: CheckpointStore | str | os.PathLike[str]) -> None:
        self._store = store_or_uri if isinstance(store_or_uri, CheckpointStore) else CheckpointStore(store_or_uri)

    @property
    def store(self) -> CheckpointStore:
        return self._store

    def _rel(self, version: Version, path: str) -> str:
        return f"{version_dir(version)}/{path}"

    def _where(self, version: Version) -> str:
        return f"{self._store.uri}: version {version}"

    # ---------------------------------------------------------------- versions
    def is_complete(self, version: Version) -> bool:
        """True when ``versions/<version>/COMPLETE`` exists (its content is checked by manifest)."""
        return self._store.exists(self._rel(version, COMPLETE_FILE))

    def complete_versions(self) -> list[Version]:
        """Versions with a COMPLETE marker, ascending; partial versions are left out."""
        return [v for v in self._store.list_versions() if self.is_complete(v)]

    def latest_version(self) -> Version:
        """The highest version with a COMPLETE marker; CheckpointError when there is none."""
        complete = self.complete_versions()
        if not complete:
            raise CheckpointError(f"{self._store.uri}: no complete version under versions/")
        return complete[-1]

    # ---------------------------------------------------------------- manifest
    def manifest(self, version: Version) -> Manifest:
        """The checked manifest of ``version`` (see the module docstring for the refusals)."""
        where = self._where(version)
        if not self._store.exists(version_dir(version)):
            raise CheckpointError(f"{where} does not exist")
        if not self.is_complete(version):
            raise CheckpointError(f"{self._store.uri}: version {version} has no COMPLETE marker (partial write?)")
        data = self._store.read_bytes(self._rel(version, MANIFEST_FILE))
        marker = self._store.read_bytes(self._rel(version, COMPLETE_FILE)).decode("ascii", "replace").strip().lower()
        actual = hashlib.sha256(data).hexdigest()
        if marker != actual:
            raise CheckpointError(
                f"{where}: COMPLETE holds sha256 {marker!r} but manifest.json hashes to {actual!r} "
                f"(manifest changed after the version was completed?)"
            )
        try:
            m = Manifest.from_bytes(data)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from e
        if m.version != version:
            raise CheckpointError(f"{where}: manifest.json says version {m.version}, its folder says {version}")
        listed = [f.path for f in m.files]
        if len(set(listed)) != len(listed):
            raise CheckpointError(f"{where}: manifest lists a file twice: {sorted(listed)}")
        for path in listed:
            try:
                self._store.local_path(self._rel(version, path))  # refuses absolute paths and '..'
            except CheckpointError:
                raise CheckpointError(
                    f"{where}: manifest lists {path!r}; paths must be relative to the version folder, without '..'"
                ) from None
        if m.kind == KIND_BASE:
            needed = [table_file(t) for t in m.model.table_names] + [DENSE_FILE]
            absent = [p for p in needed if p not in listed]
            if absent:
                raise CheckpointError(f"{where}: base manifest does not list {absent}")
        return m

    def _resolve_chain(self, version: Version) -> list[Manifest]:
        """The manifests that make up ``version``: ``[base]`` today. With deltas this becomes
        ``[base, delta, ..., delta(version)]`` following ``parent`` links down to a base."""
        m = self.manifest(version)
        if m.kind != KIND_BASE:
            raise CheckpointError(
                f"{self._where(version)} is a {m.kind} (parent {m.parent}); deltas are not supported yet"
            )
        return [m]

    # ---------------------------------------------------------------- checks
    def _check_file(self, m: Manifest, path: str, *, full: bool) -> None:
        entry = m.file(path)
        rel = self._rel(m.version, path)
        where = f"{self._where(m.version)}: {path}"
        if not self._store.exists(rel):
            raise CheckpointError(f"{where}: missing (manifest lists {entry.size_bytes} bytes)")
        size = self._store.size_bytes(rel)
        if size != entry.size_bytes:
            raise CheckpointError(f"{where}: size {size} bytes, manifest says {entry.size_bytes} (truncated or rewritten?)")
        if full:
            digest = self._store.sha256(rel)
            if digest != entry.sha256:
                raise CheckpointError(f"{where}: sha256 {digest}, manifest says {entry.sha256} (corrupt file)")

    def verify(self, version: Version, *, full: bool = True) -> Manifest:
        """Check every file the manifest lists: present with the listed size and, when ``full``,
        the listed sha256 (reads every byte). Returns the manifest; CheckpointError on the first
        mismatch, naming the file and the expected and actual values."""
        m = self.manifest(version)
        for f in m.files:
            self._check_file(m, f.path, full=full)
        return m

    # ---------------------------------------------------------------- data
    def open_table(self, version: Version, table: str, *, verify: bool = True) -> np.ndarray:
        """A read-only memory map of ``table`` at ``version``: float32 ``[rows, dim]``, C order.

        The file's size is always checked against the manifest and its .npy header against the
        spec; ``verify=True`` also checks its sha256 (reads the whole file once).
        """
        (m,) = self._resolve_chain(version)
        try:
            spec = m.model.table(table)
        except KeyError:
            raise CheckpointError(f"{self._where(version)}: model has no table {table!r} (tables: {list(m.model.table_names)})") from None
        path = table_file(table)
        self._check_file(m, path, full=verify)
        local = self._store.local_path(self._rel(version, path))
        where = f"{self._where(version)}: table {table!r} ({path})"
        try:
            with open(local, "rb") as f:
                npy_version = np.lib.format.read_magic(f)
                if npy_version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif npy_version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {npy_version} (expected 1.0 or 2.0)")
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{where}: not a readable .npy file: {e}") from e
        expected = (spec.rows, spec.dim)
        if tuple(shape) != expected or dtype != TABLE_DTYPE or fortran:
            raise CheckpointError(
                f"{where}: expected float32 {list(expected)} C order, got {dtype} {list(shape)}"
                f"{' Fortran order' if fortran else ''}"
            )
        try:
            arr = np.load(local, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{where}: cannot memory-map: {e}") from e
        return arr

    def dense_state(self, version: Version, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The dense weights of ``version``: name -> float32 array, exactly the names and shapes
        of ``dense_arch.param_shapes()``. ``verify=True`` checks the file's sha256 first."""
        (m,) = self._resolve_chain(version)
        self._check_file(m, DENSE_FILE, full=verify)
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        where = f"{self._where(version)}: {DENSE_FILE}"
        try:
            state = load_file(str(self._store.local_path(self._rel(version, DENSE_FILE))))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{where}: not a readable safetensors file: {e}") from e
        expected = m.model.dense_arch.param_shapes()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{where}: weights do not match the architecture: missing {missing}, unexpected {extra}")
        for name, shape in expected.items():
            arr = state[name]
            if tuple(arr.shape) != shape or arr.dtype != np.float32:
                raise CheckpointError(
                    f"{where}: weight {name!r}: expected float32 {list(shape)}, got {arr.dtype} {list(arr.shape)}"
                )
        return state
