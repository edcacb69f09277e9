"""CheckpointReader: finds, checks and opens versions of a checkpoint (format v1), bases and
deltas.

A version is accepted only as a whole. ``manifest(N)`` refuses a version when:

- ``versions/N/COMPLETE`` is missing (a partial write, or a writer still busy);
- COMPLETE does not hold the sha256 hex of ``manifest.json`` (the manifest was changed or torn);
- the manifest is malformed, names a version other than N, a base lacks a table or
  ``dense.safetensors`` of its model spec, or a delta lists a table file other than a
  ``tables/<t>.ids.npy`` + ``tables/<t>.rows.npy`` pair of a table of its spec.

A delta version N stands for its **chain** ``[base, delta, ..., delta N]`` (``chain(N)``,
following ``parent`` links down to a base): the base's rows, then each delta's rows in order,
and the dense weights of the newest version in the chain that has them. ``chain`` refuses a
parent that is missing or incomplete, a spec that differs from the base's, and a cycle.

``verify(N)`` checks every listed file: present, the listed size and (``full=True``) the listed
sha256; for a delta also its ids and rows files (see ``delta_rows``). ``verify_files(N, paths)``
does the same for the named files only (a shard verifies the files of the tables it holds). ``open_table`` memory-maps a
base table read-only after checking its size (and, with ``verify=True``, its sha256) and its .npy
header against the spec; on a delta version it gives the table materialized at that version.

Row access for loaders (the shard applies a delta in memory proportional to the delta):
``delta_rows`` (one delta's own ids and rows, memory-mapped), ``changed_ids`` (which rows may
differ between two versions), ``rows_at`` (some rows at a version), ``partition_rows`` (one
row-wise partition at a version) and ``table_chunks`` (a whole table at a version, in chunks).

Every refusal is a CheckpointError whose message names the version, file or table and the
expected and actual values. The reader's only state is a cache of checked manifests, keyed by
their exact bytes (single dict operations; read again on each call but inside ``one_view``):
any thread may call it (it does blocking file I/O, so not from an event loop).

Pure module: numpy and safetensors only (no torch, no grpc).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from services.core.checkpoint.arrays import DeltaRows, apply_deltas, materialize, open_npy
from services.core.checkpoint.manifest import (
    COMPLETE_FILE,
    DENSE_FILE,
    ID_DTYPE,
    KIND_BASE,
    KIND_DELTA,
    MANIFEST_FILE,
    TABLE_DTYPE,
    Manifest,
    delta_ids_file,
    delta_ids_problem,
    delta_rows_file,
    spec_differences,
    table_file,
    version_dir,
)
from services.core.checkpoint.storage import CheckpointStore, StoreOrUri, as_store
from services.core.errors import CheckpointError, InvalidArgumentError
from services.core.types import TableSpec, Version

# table_chunks hands out this many bytes of rows at a time.
CHUNK_BYTES = 64 << 20


class CheckpointReader:
    """Read-only view of one checkpoint root. See the module docstring for what is refused."""

    def __init__(self, store_or_uri: StoreOrUri) -> None:
        self._store = as_store(store_or_uri)
        # version -> (manifest bytes, COMPLETE marker, the Manifest checked from them). A hit
        # needs both files byte-identical to what was checked (outside ``one_view``).
        self._checked: dict[Version, tuple[bytes, str, Manifest]] = {}
        self._views = threading.local()  # ``rows``: manifests and delta files this thread's ``one_view`` saw

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
    @contextlib.contextmanager
    def one_view(self) -> Iterator[None]:
        """Within the block, on this thread, each manifest is read and each delta file opened once."""
        outer = getattr(self._views, "rows", None)
        self._views.rows = {} if outer is None else outer
        try:
            yield
        finally:
            self._views.rows = outer

    def manifest(self, version: Version) -> Manifest:
        """The checked manifest of ``version`` (see the module docstring for the refusals)."""
        view = getattr(self._views, "rows", None)
        if view is not None and (seen := view.get(version)) is not None:
            return seen  # checked in this view
        where = self._where(version)
        if not self._store.exists(version_dir(version)):
            raise CheckpointError(f"{where} does not exist")
        if not self.is_complete(version):
            raise CheckpointError(f"{self._store.uri}: version {version} has no COMPLETE marker (partial write?)")
        data = self._store.read_bytes(self._rel(version, MANIFEST_FILE))
        marker = self._store.read_bytes(self._rel(version, COMPLETE_FILE)).decode("ascii", "replace").strip().lower()
        cached = self._checked.get(version)  # the very bytes already checked: not parsed again
        if cached is None or cached[0] != data or cached[1] != marker:
            cached = self._checked[version] = (data, marker, self._check_manifest(version, data, marker))
        if view is not None:
            view[version] = cached[2]
        return cached[2]

    def _check_manifest(self, version: Version, data: bytes, marker: str) -> Manifest:
        where = self._where(version)
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
        else:
            pairs: dict[str, tuple[str, str]] = {}  # a delta table file -> (its table, the other file of the pair)
            for t in m.model.table_names:
                pairs[delta_ids_file(t)] = (t, delta_rows_file(t))
                pairs[delta_rows_file(t)] = (t, delta_ids_file(t))
            for path in listed:
                if not path.startswith("tables/"):
                    continue
                if path not in pairs:
                    raise CheckpointError(
                        f"{where}: delta lists {path!r}; a delta's table files are tables/<t>.ids.npy and "
                        f"tables/<t>.rows.npy of a table of its model ({list(m.model.table_names)})"
                    )
                table, other = pairs[path]
                if other not in listed:
                    raise CheckpointError(f"{where}: delta lists {path!r} but not {other!r} (table {table!r} needs both)")
        return m

    def chain(self, version: Version) -> list[Manifest]:
        """The manifests that make up ``version``: ``[base, delta, ..., delta(version)]``,
        following ``parent`` links down to a base (``[base]`` for a base). Each manifest is
        checked as ``manifest()`` does; CheckpointError naming the broken link when a parent is
        missing or incomplete, a version's model spec differs from the base's, or the links
        form a cycle."""
        newest_first = [self.manifest(version)]
        seen = {version}
        while newest_first[-1].kind == KIND_DELTA:
            child = newest_first[-1]
            parent = child.parent
            assert parent is not None  # Manifest.from_bytes gives every delta a parent
            if parent in seen:
                raise CheckpointError(f"{self._where(version)}: the parent links form a cycle at delta {child.version} -> {parent}")
            try:
                newest_first.append(self.manifest(parent))
            except CheckpointError as e:
                raise CheckpointError(
                    f"{self._where(version)}: broken chain: delta {child.version} has parent {parent}, which is unusable: {e}"
                ) from e
            seen.add(parent)
        chain = newest_first[::-1]
        base = chain[0]
        for m in chain[1:]:
            differences = spec_differences(base.model, m.model)
            if differences:
                raise CheckpointError(
                    f"{self._where(version)}: broken chain: delta {m.version} (parent {m.parent}) has a model spec that "
                    f"differs from its base {base.version}'s: {'; '.join(differences)}"
                )
        return chain

    # ---------------------------------------------------------------- checks
    def _check_file(self, m: Manifest, path: str, *, full: bool, pace: Callable[[], None] | None = None) -> None:
        entry = m.file(path)
        rel = self._rel(m.version, path)
        where = f"{self._where(m.version)}: {path}"
        if not self._store.exists(rel):
            raise CheckpointError(f"{where}: missing (manifest lists {entry.size_bytes} bytes)")
        size = self._store.size_bytes(rel)
        if size != entry.size_bytes:
            raise CheckpointError(f"{where}: size {size} bytes, manifest says {entry.size_bytes} (truncated or rewritten?)")
        if full:
            digest = self._store.sha256(rel, pace)
            if digest != entry.sha256:
                raise CheckpointError(f"{where}: sha256 {digest}, manifest says {entry.sha256} (corrupt file)")

    def verify(self, version: Version, *, full: bool = True) -> Manifest:
        """Check every file the manifest lists: present with the listed size and, when ``full``,
        the listed sha256 (reads every byte); for a delta also every listed table's ids and rows
        (headers, ids sorted and in range) and the manifests of its whole chain. Returns the
        manifest; CheckpointError on the first mismatch, naming the file and the expected and
        actual values."""
        m = self.chain(version)[-1]
        return self._verify_files(m, [f.path for f in m.files], full=full)

    def verify_files(self, version: Version, paths: Iterable[str], *, full: bool = True, pace: Callable[[], None] | None = None) -> Manifest:
        """``verify`` restricted to the named files of ``version`` (e.g. one table's, from
        ``Manifest.table_files``): the manifests of its whole chain and their COMPLETE markers
        always, then only those files (a file the manifest does not list is a CheckpointError).
        A shard holding some tables of a model hashes only theirs (``pace``d after each MiB)."""
        return self._verify_files(self.chain(version)[-1], list(paths), full=full, pace=pace)

    def _verify_files(self, m: Manifest, paths: list[str], *, full: bool, pace: Callable[[], None] | None = None) -> Manifest:
        for path in paths:
            self._check_file(m, path, full=full, pace=pace)
        for table in m.delta_tables:
            if set(m.table_files(table)) & set(paths):  # sizes and sha256 done above
                self._delta_rows(m, self._table_spec(m, table), verify=False)
        return m

    # ---------------------------------------------------------------- files
    def _table_spec(self, m: Manifest, table: str) -> TableSpec:
        try:
            return m.model.table(table)
        except KeyError:
            raise CheckpointError(f"{self._where(m.version)}: model has no table {table!r} (tables: {list(m.model.table_names)})") from None

    def _open_npy(self, m: Manifest, path: str, table: str, dtype: np.dtype, shape: tuple[int, ...] | None, *, verify: bool) -> np.ndarray:
        """A read-only memory map of the listed .npy ``path`` of version ``m`` after checking its
        size (sha256 with ``verify``) and that its header is ``dtype``, C order and ``shape``
        (``shape`` None: any 1-D)."""
        self._check_file(m, path, full=verify)
        where = f"{self._where(m.version)}: table {table!r} ({path})"
        return open_npy(self._store.local_path(self._rel(m.version, path)), where, dtype, shape)

    def _base_table(self, base: Manifest, spec: TableSpec, *, verify: bool) -> np.ndarray:
        return self._open_npy(base, table_file(spec.name), spec.name, TABLE_DTYPE, (spec.rows, spec.dim), verify=verify)

    def _delta_rows(self, m: Manifest, spec: TableSpec, *, verify: bool) -> DeltaRows | None:
        if not m.lists(delta_ids_file(spec.name)):
            return None
        opened = getattr(self._views, "rows", None)
        if opened is not None and not verify and (hit := opened.get((m.version, spec.name))):
            return hit  # checked already in this view
        ids_path = delta_ids_file(spec.name)
        ids = self._open_npy(m, ids_path, spec.name, ID_DTYPE, None, verify=verify)
        problem = delta_ids_problem(ids, spec.rows)
        if problem:
            raise CheckpointError(f"{self._where(m.version)}: table {spec.name!r} ({ids_path}): {problem}")
        rows = self._open_npy(m, delta_rows_file(spec.name), spec.name, TABLE_DTYPE, (len(ids), spec.dim), verify=verify)
        if opened is not None:
            opened[(m.version, spec.name)] = (ids, rows)
        return ids, rows

    def _layers(self, version: Version, table: str, *, verify: bool) -> tuple[TableSpec, np.ndarray, list[DeltaRows]]:
        """The table's spec, its base memory map and the (ids, rows) of every delta of the chain
        that changes it, oldest first."""
        chain = self.chain(version)
        spec = self._table_spec(chain[-1], table)
        deltas = [d for d in (self._delta_rows(m, spec, verify=verify) for m in chain[1:]) if d is not None]
        return spec, self._base_table(chain[0], spec, verify=verify), deltas

    # ---------------------------------------------------------------- data
    def delta_rows(self, version: Version, table: str, *, verify: bool = False) -> DeltaRows | None:
        """This DELTA's own changes to ``table``: ``(ids int64 [k], rows float32 [k, dim])`` as
        read-only memory maps, ids strictly increasing, ``rows[i]`` the new value of row
        ``ids[i]``; None when this delta does not change ``table``.

        Always checks the files' sizes against the manifest, their .npy headers (int64 1-D,
        float32 ``[k, dim]``, the same k) and the ids (strictly increasing, in ``[0, rows)``;
        this reads the ids file); ``verify=True`` also checks both sha256. CheckpointError
        naming the version, table, file and bad value, or when ``version`` is a base.
        """
        m = self.manifest(version)
        if m.kind != KIND_DELTA:
            raise CheckpointError(f"{self._where(version)} is a {m.kind}, not a delta: it has no delta rows")
        return self._delta_rows(m, self._table_spec(m, table), verify=verify)

    def changed_ids(self, a: Version, b: Version, table: str) -> np.ndarray | None:
        """Sorted unique int64 GLOBAL ids of ``table`` whose rows may differ between versions
        ``a`` and ``b``: the union of the ids of every delta on the path ``a`` -> their common
        ancestor -> ``b``. Works forward, backward (rollback, ``a > b``) and across branches (a
        delta chain that branched after a rollback). None when ``a`` and ``b`` resolve to
        different bases (the whole table may differ); ``a == b`` gives an empty array.

        Example: 1 base, 2 (parent 1) changes [3, 5], 3 (parent 2) changes [5, 8], 4 (parent 2)
        changes [1]: ``changed_ids(3, 4, t)`` is ``[1, 5, 8]``, ``changed_ids(3, 1, t)`` is
        ``[3, 5, 8]``.
        """
        chain_a, chain_b = self.chain(a), self.chain(b)
        spec = self._table_spec(chain_b[-1], table)
        if chain_a[0].version != chain_b[0].version:
            return None
        common = 0
        for ma, mb in zip(chain_a, chain_b):
            if ma.version != mb.version:
                break
            common += 1
        path = chain_a[common:] + chain_b[common:]
        ids = [np.asarray(d[0]) for d in (self._delta_rows(m, spec, verify=False) for m in path) if d is not None]
        if not ids:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate(ids)).astype(np.int64, copy=False)

    def rows_at(self, version: Version, table: str, ids: np.ndarray) -> np.ndarray:
        """Rows of GLOBAL ``ids`` (1-D int, any order, duplicates allowed) at ``version``: a new
        float32 ``[len(ids), dim]`` array. Reads only those rows: the deltas of the chain newest
        first (``searchsorted`` into each one's sorted ids; the newest delta holding an id has
        its value), stopping once every id is found, then the base memory map fancy-indexed for
        the rest. Applying a delta to its parent thus reads that delta alone. InvalidArgumentError
        naming the table and the id when an id is outside ``[0, rows)``."""
        chain = self.chain(version)
        spec = self._table_spec(chain[-1], table)
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.dtype.kind not in "iu" and ids.size):
            raise InvalidArgumentError(f"table {table!r}: ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
        outside = ids[(ids < 0) | (ids >= spec.rows)]
        if outside.size:
            raise InvalidArgumentError(f"table {table!r}: id {int(outside[0])} is outside [0, {spec.rows})")
        ids = ids.astype(np.int64, copy=False)
        out = np.empty((len(ids), spec.dim), dtype=TABLE_DTYPE)
        todo = np.arange(len(ids))  # positions of ids not found yet
        for m in reversed(chain[1:]):
            if not len(todo):
                return out
            d = self._delta_rows(m, spec, verify=False)
            if d is None or not len(d[0]):
                continue
            delta_ids, delta_rows = d
            wanted = ids[todo]
            pos = np.searchsorted(delta_ids, wanted)
            np.minimum(pos, len(delta_ids) - 1, out=pos)
            hit = delta_ids[pos] == wanted
            if hit.any():
                out[todo[hit]] = delta_rows[pos[hit]]
                todo = todo[~hit]
        if len(todo):
            out[todo] = self._base_table(chain[0], spec, verify=False)[ids[todo]]
        return out

    def partition_rows(self, version: Version, table: str, partition: int, num_partitions: int) -> np.ndarray:
        """Row-wise partition ``partition`` of ``num_partitions`` (P) of ``table`` at ``version``:
        a writable float32 C-contiguous copy of the rows ``r`` with ``r % P == partition``,
        local row ``r // P``. The base's strided rows, then every delta of the chain restricted
        to that partition. ``P == 1`` gives a copy of the whole table.

        Example: rows 10, P 3, partition 1 -> global rows [1, 4, 7] as local rows [0, 1, 2].
        """
        if num_partitions < 1 or not 0 <= partition < num_partitions:
            raise InvalidArgumentError(f"table {table!r}: partition {partition} of {num_partitions} (need 0 <= partition < num_partitions)")
        spec, base, deltas = self._layers(version, table, verify=False)
        return materialize(base, deltas, partition, spec.rows, num_partitions)

    def table_chunks(self, version: Version, table: str, *, chunk_bytes: int = CHUNK_BYTES, verify: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """The whole of ``table`` at ``version`` as ``(start, rows)`` pieces in row order, each a
        new float32 ``[k, dim]`` array of about ``chunk_bytes`` (base rows + the deltas' rows in
        that range), so a multi-GiB table is never whole in memory. ``verify`` checks the sha256
        of every file used first."""
        spec, base, deltas = self._layers(version, table, verify=verify)
        # Base rows are read with plain file reads, not through the memory map: pages of a map
        # stay in this process's RSS for as long as the map lives, i.e. the whole table would.
        path, offset = base.filename, base.offset
        del base
        step = max(1, chunk_bytes // (spec.dim * TABLE_DTYPE.itemsize))
        with open(path, "rb") as f:
            for start in range(0, spec.rows, step):
                stop = min(start + step, spec.rows)
                f.seek(offset + start * spec.dim * TABLE_DTYPE.itemsize)
                rows = np.fromfile(f, dtype=TABLE_DTYPE, count=(stop - start) * spec.dim)
                if rows.size != (stop - start) * spec.dim:
                    raise CheckpointError(f"{self._where(version)}: table {table!r}: base file {path} ends before row {stop}")
                rows = rows.reshape(stop - start, spec.dim)
                apply_deltas(rows, deltas, start, stop, 1)
                yield start, rows

    def open_table(self, version: Version, table: str, *, verify: bool = True) -> np.ndarray:
        """``table`` at ``version``: float32 ``[rows, dim]``, C order, read-only.

        For a base, and for a delta whose chain does not change ``table``, the base's memory map;
        otherwise a materialized in-memory array (base + every delta of the chain), so it costs
        the table's size in memory: meant for the reference oracle and in-process baselines,
        not for shards (they use ``partition_rows`` / ``rows_at``). Sizes and .npy headers are
        always checked; ``verify=True`` also checks the sha256 of every file used.
        """
        spec, base, deltas = self._layers(version, table, verify=verify)
        if not deltas:
            return base
        out = materialize(base, deltas, 0, spec.rows, 1)
        out.flags.writeable = False
        return out

    def dense_state(self, version: Version, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The dense weights at ``version`` (those of the newest version of its chain that has
        ``dense.safetensors``): name -> float32 array, exactly the names and shapes of
        ``dense_arch.param_shapes()``. ``verify=True`` checks the file's sha256 first."""
        m = next(m for m in reversed(self.chain(version)) if m.lists(DENSE_FILE))
        self._check_file(m, DENSE_FILE, full=verify)
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        where = f"{self._where(m.version)}: {DENSE_FILE}"
        try:
            state = load_file(str(self._store.local_path(self._rel(m.version, DENSE_FILE))))
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
