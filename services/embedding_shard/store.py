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

Thread-safety: lookups run concurrently on the RPC thread pool; each takes one immutable
``StoreState`` snapshot for the whole request (``reading()``), so one response never mixes
versions. Writers (``install``, ``apply``, ``drop``) are serialized by the node's version
manager thread and publish a new snapshot under the lock. Counters are best-effort.
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
from services.core.types import PartitionKey, PoolingType, TableSpec, Version

log = logging.getLogger(__name__)

# How long ``apply`` waits for lookups on the previous snapshot before it writes rows in place.
_QUIESCE_TIMEOUT_S = 30.0


@dataclass
class PartitionTable:
    """One partition this node holds: global row ``r`` is local row ``r // num_partitions``,
    and only rows with ``r % num_partitions == key.partition`` belong to it. Load counters are
    kept per partition whatever the version."""

    key: PartitionKey
    spec: TableSpec
    num_partitions: int
    lookups: int = 0
    ids: int = 0

    def local_ids(self, ids: np.ndarray) -> np.ndarray:
        """Validate GLOBAL ``ids`` against this partition and map them to local rows."""
        if len(ids) == 0:
            return ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.spec.rows:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(f"table {self.spec.name!r}: id {bad} out of range [0, {self.spec.rows})")
        if self.num_partitions == 1:
            return ids
        p = self.key.partition
        owner = ids % self.num_partitions
        wrong = np.flatnonzero(owner != p)
        if len(wrong):
            bad = int(ids[wrong[0]])
            raise InvalidArgumentError(
                f"table {self.spec.name!r}: id {bad} is not in partition {p} of {self.num_partitions} "
                f"(it belongs to partition {bad % self.num_partitions})"
            )
        return ids // self.num_partitions

    def global_ids(self, local: np.ndarray) -> np.ndarray:
        return local * self.num_partitions + self.key.partition


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

    def pool(self, ids: np.ndarray, lengths: np.ndarray, pooling_type: PoolingType, weights: np.ndarray | None) -> np.ndarray:
        local = self.table.local_ids(ids)
        self.table.lookups += 1
        self.table.ids += len(ids)
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
    lookups in flight on this snapshot, guarded by the store's lock)."""

    primary: Version
    versions: Mapping[Version, Mapping[PartitionKey, PartitionVersion]]
    readers: int = field(default=0, compare=False)

    @property
    def versions_ready(self) -> list[Version]:
        return sorted(self.versions)

    def resolve(self, version: Version, table: str, partition: int, specs: Mapping[str, TableSpec], num_partitions: Mapping[str, int]) -> PartitionVersion:
        spec = specs.get(table)
        if spec is None:
            raise InvalidArgumentError(f"unknown table {table!r}")
        n = num_partitions.get(table, 1)
        if not 0 <= partition < n:
            raise InvalidArgumentError(f"table {table!r}: partition {partition} out of range [0, {n})")
        v = self.primary if version == 0 else version
        parts = self.versions.get(v)
        if parts is None:
            raise FailedPreconditionError(f"version {version} is not ready on this node (ready: {self.versions_ready})")
        part = parts.get(PartitionKey(table, partition))
        if part is None:
            raise FailedPreconditionError(f"table {table!r} partition {partition} is not held by this node")
        return part


class StoreView:
    """What one request sees: one snapshot, whatever a concurrent swap publishes meanwhile."""

    def __init__(self, store: "TableStore", state: StoreState) -> None:
        self._store = store
        self.state = state

    @property
    def primary(self) -> Version:
        return self.state.primary

    def resolve(self, version: Version, table: str, partition: int) -> PartitionVersion:
        """The partition to pool from at ``version`` (0: the primary), or the error naming what
        is wrong: a table or partition that does not exist is INVALID_ARGUMENT; one not held
        here, or a version not ready here, is FAILED_PRECONDITION (another replica may serve)."""
        return self.state.resolve(version, table, partition, self._store.specs, self._store.num_partitions)


def _marks(versions: Mapping[Version, Mapping[PartitionKey, PartitionVersion]]) -> dict[int, np.ndarray]:
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


def _with_marks(versions: dict[Version, dict[PartitionKey, PartitionVersion]]) -> dict[Version, dict[PartitionKey, PartitionVersion]]:
    marks = _marks(versions)
    return {
        v: {k: replace(pv, mark=marks.get(id(pv.weight)) if pv.overlay is not None else None) for k, pv in parts.items()}
        for v, parts in versions.items()
    }


class TableStore:
    """Every partition this node holds, per version (see the module docstring).

    ``primary`` is what a request naming version 0 gets and the version rows are written for.
    """

    def __init__(self, table_specs: Mapping[str, TableSpec], num_partitions: Mapping[str, int]) -> None:
        self.specs = dict(table_specs)
        self.num_partitions = dict(num_partitions)
        self._cond = threading.Condition()
        self._state = StoreState(0, {})
        self._tables: dict[PartitionKey, PartitionTable] = {}

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

    def partitions(self) -> dict[PartitionKey, PartitionTable]:
        return dict(self._tables)

    def size_bytes(self, key: PartitionKey) -> int:
        """Bytes this partition holds over every version: its weights and overlays."""
        seen: dict[int, int] = {}
        for parts in self._state.versions.values():
            pv = parts.get(key)
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

    # -- writers (one thread: the node's version manager) ---------------------------------------
    def _publish(self, primary: Version, versions: dict[Version, dict[PartitionKey, PartitionVersion]]) -> StoreState:
        with self._cond:
            old = self._state
            self._state = StoreState(primary, _with_marks(versions))
            return old

    def _quiesce(self, old: StoreState) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: old.readers == 0, _QUIESCE_TIMEOUT_S):
                raise TimeoutError(f"lookups on the previous snapshot still running after {_QUIESCE_TIMEOUT_S:g}s")

    def _table(self, key: PartitionKey) -> PartitionTable:
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = PartitionTable(key, self.specs[key.table], self.num_partitions.get(key.table, 1))
        return t

    def install(self, version: Version, weights: Mapping[PartitionKey, torch.Tensor], *, primary: bool = True) -> None:
        """Serve ``version`` from its own full ``weights`` (the first load, or a new base); the
        versions already held keep theirs until dropped."""
        versions = {v: dict(parts) for v, parts in self._state.versions.items()}
        versions[version] = {key: PartitionVersion(self._table(key), w) for key, w in weights.items()}
        self._publish(version if primary or not self._state.primary else self._state.primary, versions)

    def apply(self, target: Version, changes: Mapping[PartitionKey, tuple[np.ndarray, torch.Tensor]]) -> None:
        """Make ``target`` the primary by writing ``changes`` (per partition: LOCAL row ids,
        strictly increasing, and their rows at ``target``) into the primary's weights in place.
        Every other version held on those weights keeps the overwritten rows in its overlay.
        A partition absent from ``changes`` has the same rows at both versions."""
        state = self._state
        a = state.primary
        if a == target:
            return
        versions = {v: dict(parts) for v, parts in state.versions.items()}
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

    def overlay_changes(self, version: Version) -> dict[PartitionKey, tuple[np.ndarray, torch.Tensor]] | None:
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
            versions = {v: dict(parts) for v, parts in self._state.versions.items()}
            self._publish(version, versions)
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
    keys: list[PartitionKey],
    num_partitions: Mapping[str, int],
    *,
    verify: bool = True,
    load_rate_bytes_s: int = 0,
    stop: threading.Event | None = None,
) -> dict[PartitionKey, torch.Tensor]:
    """The rows of ``keys`` at ``version`` (base + deltas), each a private writable tensor.

    A row-wise partition holds its strided rows (``table[p::P]``), so a node holds about 1/P of
    the table; a whole table (P = 1) is copied out of the checkpoint once, so that deltas can be
    written in place (a copy-on-write memory map would dirty a whole page per changed row).
    ``load_rate_bytes_s`` > 0 throttles loading (a live move stays gentle on disk and node).
    """
    if verify:
        for m in reader.chain(version):
            reader.verify(m.version, full=True)
    out: dict[PartitionKey, torch.Tensor] = {}
    stop = stop or threading.Event()
    for key in keys:
        n = num_partitions[key.table]
        rows = reader.partition_rows(version, key.table, key.partition, n)
        out[key] = torch.from_numpy(rows)
        size = rows.nbytes
        if load_rate_bytes_s > 0 and stop.wait(size / load_rate_bytes_s):
            break
        log.info("loaded %s v%d: %d rows x %d (%.1f MiB)", key, version, rows.shape[0], rows.shape[1], size / 2**20)
    return out


def delta_changes(
    reader: CheckpointReader, a: Version, b: Version, keys: list[PartitionKey], num_partitions: Mapping[str, int]
) -> dict[PartitionKey, tuple[np.ndarray, torch.Tensor]] | None:
    """Per partition, the LOCAL ids whose rows may differ between versions a and b and their
    rows at b, reading only those rows; None when a and b have different bases."""
    out: dict[PartitionKey, tuple[np.ndarray, torch.Tensor]] = {}
    by_table: dict[str, np.ndarray | None] = {}
    for key in keys:
        if key.table not in by_table:
            by_table[key.table] = reader.changed_ids(a, b, key.table)
        ids = by_table[key.table]
        if ids is None:
            return None
        n = num_partitions[key.table]
        mine = ids[ids % n == key.partition] if n > 1 else ids
        rows = reader.rows_at(b, key.table, mine)
        out[key] = (mine // n, torch.from_numpy(np.ascontiguousarray(rows)))
    return out
