"""Writers of checkpoint versions (format v1, see docs/checkpoint.md): ``VersionWriter`` for a
BASE version, ``DeltaWriter`` for a DELTA on top of a parent version.

Both publish the same way, through one piece of code (``StagedWriter``): files first,
``COMPLETE`` last, never overwrite a complete version.

1. Everything is written into a private staging folder ``versions/<N>.tmp-<random>/``, which
   readers ignore (not a canonical version name).
2. ``commit()`` fsyncs and hashes every file (sha256, 1 MiB chunks), writes and fsyncs
   ``manifest.json``, then writes ``COMPLETE`` (the sha256 hex of manifest.json) LAST and fsyncs
   it and the staging folder.
3. The staging folder is renamed to ``versions/<N>/`` in one atomic ``rename`` and
   ``versions/`` is fsynced. On a local filesystem a reader therefore never sees a partial
   ``versions/<N>/``; the ``COMPLETE`` marker (checked by the reader) is what protects readers
   of stores without an atomic rename and of checkpoints written by hand.

An existing complete ``versions/<N>/`` is never overwritten. A ``versions/<N>/`` without
``COMPLETE`` (a hand-written version still being written, or abandoned) is refused too unless
``replace_partial=True``. Rename onto a non-empty folder fails, so two writers racing for the
same N cannot both win. If anything fails, or the writer is used as a context manager and the
block raises, the staging folder is removed (``abort()``).

One writer is used by one thread. Tables and delta rows are validated against the ModelSpec
(name, shape, float32, ids) and dense weights against ``spec.dense_arch.param_shapes()``
(names and shapes, exactly).

Pure module: numpy and safetensors only (no torch, no grpc).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from services.core.checkpoint.manifest import (
    DENSE_FILE,
    ID_DTYPE,
    KIND_BASE,
    KIND_DELTA,
    TABLE_DTYPE,
    Manifest,
    ModelSpec,
    delta_ids_file,
    delta_ids_problem,
    delta_rows_file,
    spec_differences,
    table_file,
)
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.storage import StoreOrUri, as_store
from services.core.checkpoint.staging import StagedWriter, check_version_number, write_rows_npy
from services.core.errors import CheckpointError
from services.core.types import TableSpec, Version

__all__ = ["TABLE_DTYPE", "DeltaWriter", "VersionWriter", "next_version", "write_base", "write_delta"]


def next_version(store_or_uri: StoreOrUri) -> Version:
    """The version number a trainer should write next: 1 + the highest ``versions/<N>`` folder,
    complete or not (a partial folder's number is never reused), 1 for an empty root."""
    versions = as_store(store_or_uri).list_versions()
    return versions[-1] + 1 if versions else 1


class VersionWriter(StagedWriter):
    """Writes base version ``version`` of ``spec`` below a checkpoint root.

    Usage::

        with VersionWriter("file:///ckpt", 1, spec) as w:
            w.write_table("items", items_f32)              # [rows, dim] float32
            w.write_table("users", chunks_of_users())      # or an iterable of [k, dim] chunks
            w.write_dense(state)                           # name -> float32 array
            manifest = w.commit()

    Every table of the spec and the dense weights must be written before ``commit()``.
    """

    _kind = KIND_BASE

    def __init__(
        self,
        store_or_uri: StoreOrUri,
        version: Version,
        spec: ModelSpec,
        *,
        created_at: str | None = None,
        replace_partial: bool = False,
    ) -> None:
        version = check_version_number("version", version)
        super().__init__(as_store(store_or_uri), version, None, spec, created_at=created_at, replace_partial=replace_partial)

    def write_table(self, name: str, data: np.ndarray | Iterable[np.ndarray]) -> None:
        """Write ``tables/<name>.npy``: float32 ``[rows, dim]``, C order.

        ``data`` is one array (a memory map is fine: it is copied 64 MiB at a time) or an
        iterable of ``[k, dim]`` float32 chunks whose rows add up to the table's rows, so a
        multi-GiB table never needs to be in memory: only the current chunk is. Raises
        CheckpointError naming the table when the name is not in the spec, a chunk is not
        float32 ``[k, dim]``, or the row count is wrong; the partial file is then removed.
        """
        self._check_open()
        t = self._table(name)
        rel = table_file(name)
        if rel in self._written:
            raise CheckpointError(f"table {name!r} was already written to version {self._version}")
        write_rows_npy(self._staged(rel), t, t.rows, data)
        self._written.append(rel)

    def _missing(self) -> list[str]:
        missing = [table_file(t) for t in self._spec.table_names if table_file(t) not in self._written]
        if DENSE_FILE not in self._written:
            missing.append(DENSE_FILE)
        return missing


class DeltaWriter(StagedWriter):
    """Writes delta ``version`` on top of ``parent``: only the changed rows of some tables and,
    optionally, new dense weights. Tables not written are unchanged from the parent.

    Usage::

        with DeltaWriter("file:///ckpt", 4, 3, spec) as w:
            w.write_rows("items", ids, rows)     # ids int [k] (any order), rows float32 [k, dim]
            w.write_dense(state)                 # optional: replaces the dense weights
            manifest = w.commit()                # kind "delta", parent 3

    The constructor refuses (before anything is written) a parent that is not below
    ``version``, that is not a complete, readable version of this root (its whole chain down to
    a base), or whose model spec differs from ``spec`` (the message names what differs).
    """

    _kind = KIND_DELTA

    def __init__(
        self,
        store_or_uri: StoreOrUri,
        version: Version,
        parent: Version,
        spec: ModelSpec,
        *,
        created_at: str | None = None,
        replace_partial: bool = False,
    ) -> None:
        version = check_version_number("version", version)
        parent = check_version_number(f"delta {version}: parent", parent)
        if parent >= version:
            raise CheckpointError(f"delta {version}: parent must be a lower version, got {parent}")
        store = as_store(store_or_uri)
        try:
            parent_spec = CheckpointReader(store).chain(parent)[-1].model
        except CheckpointError as e:
            raise CheckpointError(f"delta {version}: parent {parent} is not a complete readable version: {e}") from e
        differences = spec_differences(parent_spec, spec)
        if differences:
            raise CheckpointError(f"delta {version}: model spec differs from parent {parent}'s: {'; '.join(differences)}")
        super().__init__(store, version, parent, spec, created_at=created_at, replace_partial=replace_partial)
        self._tables_given: set[str] = set()

    @property
    def parent(self) -> Version:
        return self._parent  # type: ignore[return-value]

    def _claim(self, table: str) -> TableSpec:
        self._check_open()
        t = self._table(table)
        if table in self._tables_given:
            raise CheckpointError(f"rows of table {table!r} were already written to delta {self._version}")
        return t

    def write_rows(self, table: str, ids: np.ndarray, rows: np.ndarray) -> None:
        """Write the new values of rows ``ids`` of ``table``.

        ``ids``: 1-D integer array of GLOBAL row ids, unique, in ``[0, rows)``, any order;
        ``rows``: float32 ``[len(ids), dim]``, row ``i`` the new value of ``ids[i]``. They are
        stored sorted by id (rows permuted with them). ``k == 0`` is allowed and leaves the
        table out of the delta. CheckpointError naming the table and the bad value otherwise;
        one call per table.

        Example: ``write_rows("items", np.array([7, 2]), np.ones((2, dim), np.float32))``
        stores ids ``[2, 7]``.
        """
        t = self._claim(table)
        ids = self._checked_ids(t, ids)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape != (len(ids), t.dim):
            raise CheckpointError(
                f"table {table!r}: rows must be [k, dim] = {[len(ids), t.dim]} (one row per id), got {list(rows.shape)}"
            )
        if rows.dtype.kind != "f" or rows.dtype.itemsize != 4:
            raise CheckpointError(f"table {table!r}: rows must be float32, got {rows.dtype} (cast with .astype(np.float32))")
        order = np.argsort(ids, kind="stable")
        self._write_sorted(t, ids[order], [rows[order]])

    def write_sorted_rows(self, table: str, ids: np.ndarray, row_chunks: Iterable[np.ndarray]) -> None:
        """Like ``write_rows`` for a delta too big to hold: ``ids`` already strictly increasing
        (int, in range), their rows given as float32 ``[k_i, dim]`` chunks in id order that add
        up to ``len(ids)`` rows; only one chunk is resident at a time."""
        t = self._claim(table)
        self._write_sorted(t, self._checked_ids(t, ids), row_chunks)

    @staticmethod
    def _checked_ids(t: TableSpec, ids: np.ndarray) -> np.ndarray:
        """``ids`` as int64 after checking they are a 1-D integer array within ``[0, rows)``."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise CheckpointError(f"table {t.name!r}: ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
        outside = ids[(ids < 0) | (ids >= t.rows)]  # before the int64 cast: a huge uint64 stays huge
        if outside.size:
            raise CheckpointError(f"table {t.name!r}: id {int(outside[0])} is outside [0, {t.rows})")
        return ids.astype(ID_DTYPE)

    def _write_sorted(self, t: TableSpec, ids: np.ndarray, row_chunks: Iterable[np.ndarray]) -> None:
        """Write ``tables/<t>.ids.npy`` and ``.rows.npy`` (nothing when ``ids`` is empty) after
        checking ``ids`` (int64) are strictly increasing and in range."""
        problem = delta_ids_problem(ids, t.rows)
        if problem:
            raise CheckpointError(f"table {t.name!r}: {problem}")
        if not len(ids):
            self._tables_given.add(t.name)
            return
        ids_path = self._staged(delta_ids_file(t.name))
        rows_path = self._staged(delta_rows_file(t.name))
        try:
            np.save(ids_path, np.ascontiguousarray(ids, dtype=ID_DTYPE), allow_pickle=False)
            write_rows_npy(rows_path, t, len(ids), row_chunks)
        except BaseException:
            ids_path.unlink(missing_ok=True)
            rows_path.unlink(missing_ok=True)
            raise
        self._written += [delta_ids_file(t.name), delta_rows_file(t.name)]
        self._tables_given.add(t.name)


def write_base(
    store_or_uri: StoreOrUri,
    version: Version,
    spec: ModelSpec,
    tables: Mapping[str, np.ndarray | Iterable[np.ndarray]],
    dense: Mapping[str, np.ndarray],
    *,
    created_at: str | None = None,
) -> Manifest:
    """Write and publish base ``version``: every table of ``spec`` (array or chunks) and the
    dense weights. CheckpointError when a table is missing or extra, or anything is invalid."""
    missing = sorted(set(spec.table_names) - set(tables))
    extra = sorted(set(tables) - set(spec.table_names))
    if missing or extra:
        raise CheckpointError(f"tables do not match model {spec.name!r}: missing {missing}, unexpected {extra}")
    with VersionWriter(store_or_uri, version, spec, created_at=created_at) as w:
        for name in spec.table_names:
            w.write_table(name, tables[name])
        w.write_dense(dense)
        return w.commit()


def write_delta(
    store_or_uri: StoreOrUri,
    version: Version,
    parent: Version,
    spec: ModelSpec,
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]],
    dense: Mapping[str, np.ndarray] | None = None,
    *,
    created_at: str | None = None,
) -> Manifest:
    """Write and publish delta ``version`` on ``parent``: ``rows`` maps a table to its
    ``(ids, rows)`` (as ``DeltaWriter.write_rows`` takes them); ``dense``, when given, replaces
    the dense weights. Returns the manifest (kind ``delta``, parent set)."""
    with DeltaWriter(store_or_uri, version, parent, spec, created_at=created_at) as w:
        for name, (ids, values) in rows.items():
            w.write_rows(name, ids, values)
        if dense is not None:
            w.write_dense(dense)
        return w.commit()
