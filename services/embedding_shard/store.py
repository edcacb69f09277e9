"""The table store of one shard node: the partitions it holds, at one or more versions.

Memory model (docs/checkpoint.md, "Shard side"). Each partition's rows live once, in a private
writable tensor ``weight`` holding the node's **primary** version. Another version still being
served (the previous one during a swap, or the one being rolled back to) is the same ``weight``
plus an **overlay**: the rows that version has where ``weight`` now differs, local ids sorted.
Moving the primary from version a to b (``apply``) therefore costs memory in proportion to the
rows that changed, never a second copy of the table:

1. the rows about to be overwritten are copied into the overlay of a (and of every other
   version still held on the same ``weight``), and that state is published;
2. the store waits until no lookup that started on the state before it is still running
   (those read ``weight`` directly for version a);
3. the new rows are written into ``weight`` in place; then b becomes primary.

A version whose base differs (a new full base) cannot share rows: it gets its own ``weight``
(``install``) and the old one is freed when its version is dropped.

A lookup at the primary pools straight from ``weight``. A lookup at an overlaid version marks
its ids that the overlay replaces (a bool row mask, then a binary search for the marked ones),
pools the two parts separately and merges them (``core.sharding``: sums add, means divide once,
max is elementwise), so the result is the version's rows exactly.

Partitions come and go while serving (a rebalance): ``add_partition`` publishes a snapshot with
one more partition at every version held (full rows at a version with its own ``weight``, an
overlay of the rows that differ at a version sharing the primary's), ``remove_partition`` one
without it. A partition is a ``PartitionId`` (table, partition, P): during a rebalance that
changes a table's P the node may hold ``items/0of2`` and ``items/0of1`` at once. A lookup names
(table, partition) and GLOBAL ids; it is served by the held partition whose rows contain every
id (the one of the node's active layout first, so the common case costs one ``ids % P``).

Thread-safety: lookups run concurrently on the RPC thread pool; each takes one immutable
``StoreState`` snapshot for the whole request (``reading()``), so one response never mixes
versions. Writers (``install``, ``apply``, ``promote``, ``drop``, ``add_partition``,
``remove_partition``, ``set_layout``) are serialized by the node's reconciler thread
(``services.embedding_shard.reconciler``) and publish a new snapshot under the lock. Counters
are best-effort.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from services.core import pooling, sharding
from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import FailedPreconditionError, InvalidArgumentError
from services.core.types import PartitionId, PoolingType, TableSpec, Version

log = logging.getLogger(__name__)

# How long ``apply`` waits for lookups on the previous snapshot before it writes rows in place.
_QUIESCE_TIMEOUT_S = 30.0


@dataclass
class PartitionTable:
    """One partition this node holds: global row ``r`` is local row ``r // num_partitions``,
    and only rows with ``r % num_partitions == pid.partition`` belong to it. Load counters are
    kept per partition whatever the version."""

    pid: PartitionId
    spec: TableSpec
    lookups: int = 0
    ids: int = 0

    @property
    def num_partitions(self) -> int:
        return self.pid.num_partitions

    def covered(self, ids: np.ndarray) -> np.ndarray | None:
        """Local rows of GLOBAL ``ids`` (in range), or None when some id is not in this partition."""
        n = self.pid.num_partitions
        if n == 1 or len(ids) == 0:
            return ids
        if (ids % n != self.pid.partition).any():
            return None
        return ids // n

    def not_here(self, ids: np.ndarray) -> InvalidArgumentError:
        n, p = self.pid.num_partitions, self.pid.partition
        bad = int(ids[np.flatnonzero(ids % n != p)[0]])
        return InvalidArgumentError(
            f"table {self.spec.name!r}: id {bad} is not in partition {p} of {n} (it belongs to partition {bad % n})"
        )


def check_range(spec: TableSpec, ids: np.ndarray) -> None:
    """InvalidArgumentError naming the table and the first bad id outside ``[0, rows)``."""
    if len(ids) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= spec.rows:
        bad = lo if lo < 0 else hi
        raise InvalidArgumentError(f"table {spec.name!r}: id {bad} out of range [0, {spec.rows})")


@dataclass(frozen=True)
class Overlay:
    """The rows one version has where the partition's ``weight`` differs: local ids sorted."""

    local_ids: np.ndarray  # int64 [m], strictly increasing
    rows: torch.Tensor  # float32 [m, dim]

    @property
    def size_bytes(self) -> int:
        return self.local_ids.nbytes + self.rows.numel() * self.rows.element_size()

    def extended(self, local_ids: np.ndarray, rows: torch.Tensor) -> "Overlay":
        """This overlay plus the entries of ``(local_ids, rows)`` it does not have yet (its own
        rows win: they are this version's values)."""
        mine = self.local_ids
        pos = np.minimum(np.searchsorted(mine, local_ids), max(len(mine) - 1, 0))
        new = np.flatnonzero(mine[pos] != local_ids) if len(mine) else np.arange(len(local_ids))
        if not len(new):
            return self
        ids = np.concatenate([mine, local_ids[new]])
        order = np.argsort(ids, kind="stable")  # two sorted runs: a linear merge
        stacked = torch.cat([self.rows, rows[torch.from_numpy(new)]])
        return Overlay(ids[order], stacked[torch.from_numpy(order)])


@dataclass(frozen=True)
class PartitionVersion:
    """One partition at one version: ``weight`` plus, unless this is the weight's own version,
    the overlay of rows that differ. ``mark`` flags every local row that any overlay on this
    ``weight`` replaces (a superset filter for the binary search)."""

    table: PartitionTable
    weight: torch.Tensor  # float32 [local_rows, dim]
    overlay: Overlay | None = None
    mark: np.ndarray | None = None  # bool [local_rows]

    def pool_local(self, local: np.ndarray, lengths: np.ndarray, pooling_type: PoolingType, weights: np.ndarray | None) -> np.ndarray:
        """Pool bags of LOCAL rows (validated by the caller, e.g. ``StoreView.lookup``)."""
        self.table.lookups += 1
        self.table.ids += len(local)
        ov = self.overlay
        if ov is None or len(ov.local_ids) == 0 or len(local) == 0:
            return pooling.pool(self.weight, local, lengths, pooling_type, weights)
        cand = np.flatnonzero(self.mark[local])
        pos = np.searchsorted(ov.local_ids, local[cand])
        np.minimum(pos, len(ov.local_ids) - 1, out=pos)
        found = ov.local_ids[pos] == local[cand]
        hit, pos = cand[found], pos[found]
        if len(hit) == 0:
            return pooling.pool(self.weight, local, lengths, pooling_type, weights)
        part = np.zeros(len(local), dtype=np.int64)
        part[hit] = 1
        rows = local.copy()
        rows[hit] = pos  # overlay ids index the overlay's rows
        base, over = sharding.split_bags_by(part, 2, rows, lengths, weights)
        mode = sharding.partial_pooling(pooling_type)
        partials = [
            (pooling.pool(self.weight, base.ids, base.lengths, mode, base.weights), base.lengths),
            (pooling.pool(ov.rows, over.ids, over.lengths, mode, over.weights), over.lengths),
        ]
        return sharding.merge_partials(partials, pooling_type)


@dataclass
class StoreState:
    """An immutable snapshot of what the node serves (``readers`` is the only mutable field:
    lookups in flight on this snapshot, guarded by the store's lock).

    ``layout`` is each table's P in the active shard map the node follows; ``by_table`` the
    partitions held per table, those of the layout first."""

    primary: Version
    versions: Mapping[Version, Mapping[PartitionId, PartitionVersion]]
    layout: Mapping[str, int] = field(default_factory=dict)
    readers: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        by_table: dict[str, list[PartitionId]] = {}
        for pid in self.versions.get(self.primary, {}):
            by_table.setdefault(pid.table, []).append(pid)
        for table, pids in by_table.items():
            pids.sort(key=lambda pid: (pid.num_partitions != self.layout.get(table), pid.num_partitions, pid.partition))
        self.by_table: dict[str, tuple[PartitionId, ...]] = {t: tuple(p) for t, p in by_table.items()}

    @property
    def versions_ready(self) -> list[Version]:
        return sorted(self.versions)

    def _version(self, version: Version) -> Mapping[PartitionId, PartitionVersion]:
        parts = self.versions.get(self.primary if version == 0 else version)
        if parts is None:
            raise FailedPreconditionError(f"version {version} is not ready on this node (ready: {self.versions_ready})")
        return parts

    def _spec(self, table: str, specs: Mapping[str, TableSpec]) -> TableSpec:
        spec = specs.get(table)
        if spec is None:
            raise InvalidArgumentError(f"unknown table {table!r}")
        return spec

    def _check_partition(self, table: str, partition: int) -> int:
        n = self.layout.get(table, 1)
        if not 0 <= partition < n:
            raise InvalidArgumentError(f"table {table!r}: partition {partition} out of range [0, {n})")
        return n

    def lookup(
        self, version: Version, table: str, partition: int, ids: np.ndarray, specs: Mapping[str, TableSpec], *, strict: bool
    ) -> tuple[PartitionVersion, np.ndarray]:
        """The held partition whose rows contain every GLOBAL id, and their local rows.

        Any partition of ``table`` held here may serve: the one named by the node's layout
        first, then others with that index or a whole table (P = 1), which is how requests
        routed with the previous or the next shard map are served during a rebalance. When none
        holds every id: with ``strict`` (the caller routes by this node's layout, e.g. it sent
        shard map version 0) a partition out of range or an id of another partition is
        INVALID_ARGUMENT; otherwise the node does not hold those rows: FAILED_PRECONDITION.
        """
        spec = self._spec(table, specs)
        if strict:
            self._check_partition(table, partition)
        elif partition < 0:
            raise InvalidArgumentError(f"table {table!r}: partition {partition} out of range")
        check_range(spec, ids)
        parts = self._version(version)
        for pid in self.by_table.get(table, ()):
            if pid.partition != partition and pid.num_partitions != 1:
                continue
            pv = parts.get(pid)
            local = None if pv is None else pv.table.covered(ids)
            if local is not None:
                return pv, local
        own = parts.get(PartitionId(table, partition, self.layout.get(table, 1)))
        if strict and own is not None:
            raise own.table.not_here(ids)
        raise FailedPreconditionError(f"table {table!r} partition {partition} is not held by this node")


class StoreView:
    """What one request sees: one snapshot, whatever a concurrent swap publishes meanwhile."""

    def __init__(self, store: "TableStore", state: StoreState) -> None:
        self._store = store
        self.state = state

    @property
    def primary(self) -> Version:
        return self.state.primary

    def lookup(self, version: Version, table: str, partition: int, ids: np.ndarray, *, strict: bool) -> tuple[PartitionVersion, np.ndarray]:
        """See ``StoreState.lookup``."""
        return self.state.lookup(version, table, partition, ids, self._store.specs, strict=strict)


def _marks(versions: Mapping[Version, Mapping[PartitionId, PartitionVersion]]) -> dict[int, np.ndarray]:
    """One row mask per ``weight`` tensor: the union of the overlays on it (fresh arrays, so a
    reader of an older snapshot keeps the mask that matches its overlays)."""
    marks: dict[int, np.ndarray] = {}
    for parts in versions.values():
        for pv in parts.values():
            if pv.overlay is not None and len(pv.overlay.local_ids):
                m = marks.get(id(pv.weight))
                if m is None:
                    m = marks[id(pv.weight)] = np.zeros(pv.weight.shape[0], dtype=bool)
                m[pv.overlay.local_ids] = True
    return marks


def _with_marks(versions: dict[Version, dict[PartitionId, PartitionVersion]]) -> dict[Version, dict[PartitionId, PartitionVersion]]:
    marks = _marks(versions)
    return {
        v: {k: replace(pv, mark=marks.get(id(pv.weight)) if pv.overlay is not None else None) for k, pv in parts.items()}
        for v, parts in versions.items()
    }


class TableStore:
    """Every partition this node holds, per version (see the module docstring).

    ``primary`` is what a request naming version 0 gets and the version rows are written for.
    ``num_partitions`` is each table's P in the active shard map the node follows (its layout),
    which ``set_layout`` moves when the active map changes.
    """

    def __init__(self, table_specs: Mapping[str, TableSpec], num_partitions: Mapping[str, int]) -> None:
        self.specs = dict(table_specs)
        self._cond = threading.Condition()
        self._state = StoreState(0, {}, dict(num_partitions))
        self._tables: dict[PartitionId, PartitionTable] = {}

    # -- readers ------------------------------------------------------------------------------
    @property
    def state(self) -> StoreState:
        return self._state

    @property
    def primary(self) -> Version:
        return self._state.primary

    serving_version = primary

    @property
    def versions_ready(self) -> list[Version]:
        return self._state.versions_ready

    @property
    def num_partitions(self) -> Mapping[str, int]:
        return self._state.layout

    def held(self) -> list[PartitionId]:
        """Every partition held (at every version in ``versions_ready``), sorted."""
        return sorted(self._state.versions.get(self._state.primary, {}), key=str)

    def partitions(self) -> dict[PartitionId, PartitionTable]:
        return dict(self._tables)

    def size_bytes(self, pid: PartitionId) -> int:
        """Bytes this partition holds over every version: its weights and overlays."""
        seen: dict[int, int] = {}
        for parts in self._state.versions.values():
            pv = parts.get(pid)
            if pv is None:
                continue
            seen[id(pv.weight)] = pv.weight.numel() * pv.weight.element_size()
            if pv.overlay is not None:
                seen[id(pv.overlay)] = pv.overlay.size_bytes
        return sum(seen.values())

    def overlay_bytes(self) -> int:
        """Bytes held in overlays (the cost of serving more than one version)."""
        seen = {id(pv.overlay): pv.overlay.size_bytes for parts in self._state.versions.values() for pv in parts.values() if pv.overlay is not None}
        return sum(seen.values())

    @contextlib.contextmanager
    def reading(self) -> Iterator[StoreView]:
        """One snapshot for one request; ``apply`` waits for it before writing rows in place."""
        with self._cond:
            state = self._state
            state.readers += 1
        try:
            yield StoreView(self, state)
        finally:
            with self._cond:
                state.readers -= 1
                if state.readers == 0:
                    self._cond.notify_all()

    # -- writers (one thread: the node's reconciler) --------------------------------------------
    def _publish(
        self, primary: Version, versions: dict[Version, dict[PartitionId, PartitionVersion]], layout: Mapping[str, int] | None = None
    ) -> StoreState:
        with self._cond:
            old = self._state
            self._state = StoreState(primary, _with_marks(versions), dict(old.layout if layout is None else layout))
            return old

    def _copy(self) -> dict[Version, dict[PartitionId, PartitionVersion]]:
        return {v: dict(parts) for v, parts in self._state.versions.items()}

    def _quiesce(self, old: StoreState) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: old.readers == 0, _QUIESCE_TIMEOUT_S):
                raise TimeoutError(f"lookups on the previous snapshot still running after {_QUIESCE_TIMEOUT_S:g}s")

    def _table(self, pid: PartitionId) -> PartitionTable:
        t = self._tables.get(pid)
        if t is None:
            t = self._tables[pid] = PartitionTable(pid, self.specs[pid.table])
        return t

    def set_layout(self, num_partitions: Mapping[str, int]) -> None:
        """The active shard map changed: each table's P requests are checked against."""
        if dict(num_partitions) != dict(self._state.layout):
            self._publish(self._state.primary, self._copy(), num_partitions)

    def install(self, version: Version, weights: Mapping[PartitionId, torch.Tensor], *, primary: bool = True) -> None:
        """Serve ``version`` from its own full ``weights`` (the first load, or a new base); the
        versions already held keep theirs until dropped."""
        versions = self._copy()
        versions[version] = {pid: PartitionVersion(self._table(pid), w) for pid, w in weights.items()}
        self._publish(version if primary or not self._state.primary else self._state.primary, versions)

    def add_partition(
        self,
        pid: PartitionId,
        weights: Mapping[Version, torch.Tensor],
        overlays: Mapping[Version, tuple[np.ndarray, torch.Tensor]],
    ) -> None:
        """Serve one more partition at every version held, in one snapshot.

        Every version in ``versions_ready`` is in exactly one of ``weights`` (its own full rows:
        the primary, and a version of another base) or ``overlays`` (a version sharing the
        primary's rows: LOCAL ids, strictly increasing, and that version's rows there, where it
        differs from the primary). ValueError when they do not match the versions held."""
        state = self._state
        held = set(state.versions)
        given = set(weights) | set(overlays)
        if pid in state.versions.get(state.primary, {}):
            raise ValueError(f"partition {pid} is already held")
        if given != held or set(weights) & set(overlays) or state.primary not in weights:
            raise ValueError(
                f"partition {pid}: rows for versions {sorted(weights)} + overlays {sorted(overlays)}, "
                f"the node holds {sorted(held)} (primary {state.primary})"
            )
        table = self._table(pid)
        base = weights[state.primary]
        versions = self._copy()
        for v in held:
            if v in weights:
                versions[v][pid] = PartitionVersion(table, weights[v])
            else:
                local, rows = overlays[v]
                ov = Overlay(np.asarray(local, dtype=np.int64), rows) if len(local) else None
                versions[v][pid] = PartitionVersion(table, base, ov)
        self._publish(state.primary, versions)

    def remove_partition(self, pid: PartitionId) -> None:
        """Stop serving a partition at every version; lookups already running on an older
        snapshot finish on it, and its memory goes with the last of them."""
        versions = self._copy()
        for parts in versions.values():
            parts.pop(pid, None)
        self._publish(self._state.primary, versions)
        self._tables.pop(pid, None)

    def apply(self, target: Version, changes: Mapping[PartitionId, tuple[np.ndarray, torch.Tensor]]) -> None:
        """Make ``target`` the primary by writing ``changes`` (per partition: LOCAL row ids,
        strictly increasing, and their rows at ``target``) into the primary's weights in place.
        Every other version held on those weights keeps the overwritten rows in its overlay.
        A partition absent from ``changes`` has the same rows at both versions."""
        state = self._state
        a = state.primary
        if a == target:
            return
        versions = self._copy()
        writes = []
        for key, (local, rows) in changes.items():
            pv = state.versions[a][key]
            if len(local) == 0:
                continue
            index = torch.from_numpy(np.ascontiguousarray(local, dtype=np.int64))
            old = pv.weight[index].clone()
            for v, parts in versions.items():
                other = parts.get(key)
                if v == target or other is None or other.weight is not pv.weight:
                    continue
                ov = Overlay(np.asarray(local, dtype=np.int64), old) if other.overlay is None else other.overlay.extended(local, old)
                parts[key] = replace(other, overlay=ov)
            writes.append((pv.weight, index, rows))
        # 1. publish the overlays that keep every other version exact, 2. wait for lookups that
        # may read the primary's rows directly, 3. write in place, 4. target becomes primary.
        # (A target already held keeps its overlay until step 4: it stays exact throughout.)
        self._quiesce(self._publish(a, versions))
        for weight, index, rows in writes:
            weight[index] = rows
        versions[target] = {key: PartitionVersion(pv.table, pv.weight) for key, pv in state.versions[a].items()}
        self._publish(target, versions)

    def overlay_changes(self, version: Version) -> dict[PartitionId, tuple[np.ndarray, torch.Tensor]] | None:
        """The rows ``version`` needs written to become primary, from its overlays (a rollback
        to a version still held reads nothing from disk); None when it does not share the
        primary's weights."""
        state = self._state
        parts = state.versions.get(version)
        prim = state.versions.get(state.primary, {})
        if parts is None or any(pv.weight is not prim[k].weight for k, pv in parts.items() if k in prim):
            return None
        return {k: (pv.overlay.local_ids, pv.overlay.rows) for k, pv in parts.items() if pv.overlay is not None}

    def promote(self, version: Version) -> None:
        """Make a held version the primary: in place from its overlay, or (own weights) by
        switching the snapshot."""
        if version == self._state.primary:
            return
        changes = self.overlay_changes(version)
        if changes is None:
            self._publish(version, self._copy())
        else:
            self.apply(version, changes)

    def drop(self, version: Version) -> None:
        """Stop serving ``version`` (never the primary) and free what only it used."""
        state = self._state
        if version == state.primary or version not in state.versions:
            return
        versions = {v: dict(parts) for v, parts in state.versions.items() if v != version}
        self._publish(state.primary, versions)


def load_partitions(
    reader: CheckpointReader,
    version: Version,
    pids: list[PartitionId],
    *,
    verify: bool = True,
    load_rate_bytes_s: int = 0,
    stop: threading.Event | None = None,
) -> dict[PartitionId, torch.Tensor]:
    """The rows of ``pids`` at ``version`` (base + deltas), each a private writable tensor.

    A row-wise partition holds its strided rows (``table[p::P]``), so a node holds about 1/P of
    the table; a whole table (P = 1) is copied out of the checkpoint once, so that deltas can be
    written in place (a copy-on-write memory map would dirty a whole page per changed row).
    ``load_rate_bytes_s`` > 0 throttles loading (a live move stays gentle on disk and node).
    """
    if verify:
        for m in reader.chain(version):
            reader.verify(m.version, full=True)
    out: dict[PartitionId, torch.Tensor] = {}
    stop = stop or threading.Event()
    for pid in pids:
        rows = reader.partition_rows(version, pid.table, pid.partition, pid.num_partitions)
        out[pid] = torch.from_numpy(rows)
        size = rows.nbytes
        if load_rate_bytes_s > 0 and stop.wait(size / load_rate_bytes_s):
            break
        log.info("loaded %s v%d: %d rows x %d (%.1f MiB)", pid, version, rows.shape[0], rows.shape[1], size / 2**20)
    return out


def _rows_of(reader: CheckpointReader, version: Version, pid: PartitionId, ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The GLOBAL ``ids`` (sorted) that fall in ``pid``, as LOCAL ids, and their rows at ``version``."""
    n = pid.num_partitions
    mine = ids[ids % n == pid.partition] if n > 1 else ids
    rows = reader.rows_at(version, pid.table, mine)
    return mine // n, torch.from_numpy(np.ascontiguousarray(rows))


def delta_changes(
    reader: CheckpointReader, a: Version, b: Version, pids: list[PartitionId]
) -> dict[PartitionId, tuple[np.ndarray, torch.Tensor]] | None:
    """Per partition, the LOCAL ids whose rows may differ between versions a and b and their
    rows at b, reading only those rows; None when a and b have different bases."""
    out: dict[PartitionId, tuple[np.ndarray, torch.Tensor]] = {}
    by_table: dict[str, np.ndarray | None] = {}
    for pid in pids:
        if pid.table not in by_table:
            by_table[pid.table] = reader.changed_ids(a, b, pid.table)
        ids = by_table[pid.table]
        if ids is None:
            return None
        out[pid] = _rows_of(reader, b, pid, ids)
    return out


@dataclass(frozen=True)
class PartitionRows:
    """One partition read at every version a node holds, for ``TableStore.add_partition``."""

    weights: dict[Version, torch.Tensor]
    overlays: dict[Version, tuple[np.ndarray, torch.Tensor]]

    @property
    def size_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights.values()) + sum(
            ids.nbytes + rows.numel() * rows.element_size() for ids, rows in self.overlays.values()
        )


def partition_rows(reader: CheckpointReader, pid: PartitionId, primary: Version, versions: list[Version]) -> PartitionRows:
    """``pid`` at ``primary`` (full rows) and at every other version of ``versions``: the rows
    where it differs from the primary (``changed_ids`` restricted to the partition, read with
    ``rows_at``), or full rows when it has another base (the store keeps those versions on
    their own weights)."""
    weights = {primary: torch.from_numpy(reader.partition_rows(primary, pid.table, pid.partition, pid.num_partitions))}
    overlays: dict[Version, tuple[np.ndarray, torch.Tensor]] = {}
    for v in versions:
        if v == primary:
            continue
        ids = reader.changed_ids(primary, v, pid.table)
        if ids is None:
            weights[v] = torch.from_numpy(reader.partition_rows(v, pid.table, pid.partition, pid.num_partitions))
        else:
            overlays[v] = _rows_of(reader, v, pid, ids)
    return PartitionRows(weights, overlays)
