"""The table store of one shard node: serves snapshots of the partitions it holds, at one or
more versions, and applies the changes it is given (docs/checkpoint.md, "Shard memory during a
swap"). What to hold is decided elsewhere: ``version_manager.py`` (versions),
``partition_manager.py`` (partitions); what is read from a checkpoint comes from ``loader.py``.

Moving the primary from version a to b (``apply``) costs memory in proportion to the rows that
changed, never a second copy of the table:

1. the rows about to be overwritten are copied into the overlay of a (and of every other
   version still held on the same ``weight``), and that snapshot is published;
2. the store waits until no lookup that started on the snapshot before it is still running
   (those read ``weight`` directly for version a);
3. the new rows are written into ``weight`` in place; then b becomes primary.

A version whose base differs (a new full base) cannot share rows: it gets its own ``weight``
(``install``) and the old one is freed when its version is dropped. Partitions come and go
while serving (a rebalance): ``add_partition`` publishes a snapshot with one more partition at
every version held, ``remove_partition`` one without it.

Thread-safety: lookups run concurrently on the RPC thread pool; each takes one immutable
``Snapshot`` for the whole request (``lookup``, or ``reading()``). Writers (``install``,
``apply``, ``promote``, ``drop``, ``add_partition``, ``remove_partition``, ``set_layout``) are
serialized by the node's reconciler thread (``reconciler.py``) and publish a new snapshot under
the lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from services.core.types import PartitionId, TableSpec, Version
from services.embedding_shard.snapshot import BagGroup, HeldPartition, Overlay, Pooled, PartitionVersion, Snapshot, with_marks

# How long ``apply`` waits for lookups on the previous snapshot before it writes rows in place.
_QUIESCE_TIMEOUT_S = 30.0
# ``apply`` writes rows in place this many at a time, pacing between (4 MiB at dim 64).
_WRITE_ROWS = 1 << 14


def _unpaced() -> None:
    pass


class TableStore:
    """Every partition this node holds, per version (see the module docstring).

    ``primary`` is what a request naming version 0 gets and the version rows are written for.
    ``num_partitions`` is each table's P in the active shard map the node follows (its layout),
    which ``set_layout`` moves when the active map changes.
    """

    def __init__(self, table_specs: Mapping[str, TableSpec], num_partitions: Mapping[str, int]) -> None:
        self.specs = dict(table_specs)
        self._cond = threading.Condition()
        self._known: dict[str, frozenset[int]] = {t: frozenset({n}) for t, n in num_partitions.items()}
        self._state = Snapshot(0, {}, self.specs, dict(num_partitions), dict(self._known))
        self._tables: dict[PartitionId, HeldPartition] = {}

    # -- readers ------------------------------------------------------------------------------
    @property
    def state(self) -> Snapshot:
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

    def partitions(self) -> dict[PartitionId, HeldPartition]:
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
    def reading(self) -> Iterator[Snapshot]:
        """One snapshot for one request; ``apply`` waits for it before writing rows in place."""
        with self._cond:
            state = self._state
            state.readers += 1
        try:
            yield state
        finally:
            with self._cond:
                state.readers -= 1
                if state.readers == 0:
                    self._cond.notify_all()

    def lookup(self, groups: Sequence[BagGroup], *, version: Version, map_version: int, out_dtype: type = np.float32) -> Pooled:
        """One request's Lookup on one snapshot (``Snapshot.lookup``): every group at one
        version, checked, resolved, pooled."""
        with self.reading() as snapshot:
            return snapshot.lookup(groups, version=version, map_version=map_version, out_dtype=out_dtype)

    # -- writers (one thread: the node's reconciler) --------------------------------------------
    def _publish(
        self, primary: Version, versions: dict[Version, dict[PartitionId, PartitionVersion]], layout: Mapping[str, int] | None = None
    ) -> Snapshot:
        with self._cond:
            old = self._state
            layout = dict(old.layout if layout is None else layout)
            self._state = Snapshot(primary, with_marks(versions), self.specs, layout, dict(self._known))
            return old

    def _copy(self) -> dict[Version, dict[PartitionId, PartitionVersion]]:
        return {v: dict(parts) for v, parts in self._state.versions.items()}

    def _quiesce(self, old: Snapshot) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: old.readers == 0, _QUIESCE_TIMEOUT_S):
                raise TimeoutError(f"lookups on the previous snapshot still running after {_QUIESCE_TIMEOUT_S:g}s")

    def _table(self, pid: PartitionId) -> HeldPartition:
        t = self._tables.get(pid)
        if t is None:
            t = self._tables[pid] = HeldPartition(pid, self.specs[pid.table])
        return t

    def set_layout(self, num_partitions: Mapping[str, int], *, also: Iterable[Mapping[str, int]] = ()) -> None:
        """The active shard map changed: each table's P requests are checked against. ``also``:
        the layouts of other maps seen (a rebalance's target); every P seen stays known, so a
        request routed with a map this node followed is never taken for a made-up partition."""
        known = dict(self._known)
        for layout in (num_partitions, *also):
            for table, n in layout.items():
                known[table] = known.get(table, frozenset()) | {n}
        if dict(num_partitions) != dict(self._state.layout) or known != self._known:
            self._known = known
            self._publish(self._state.primary, self._copy(), num_partitions)

    def install(self, version: Version, weights: Mapping[PartitionId, torch.Tensor], *, primary: bool = True) -> None:
        """Serve ``version`` from its own full ``weights`` (the first load, or a new base); the
        versions already held keep theirs until dropped."""
        versions = self._copy()
        for pid, w in weights.items():
            self._table(pid).hold(w)
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
        for w in weights.values():
            table.hold(w)
        for _, rows in overlays.values():
            table.hold(rows)
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

    def apply(
        self, target: Version, changes: Mapping[PartitionId, tuple[np.ndarray, torch.Tensor]], *, pace: Callable[[], None] = _unpaced
    ) -> None:
        """Make ``target`` the primary by writing ``changes`` (per partition: LOCAL row ids,
        strictly increasing, and their rows at ``target``) into the primary's weights in place.
        Every other version held on those weights keeps the overwritten rows in its overlay.
        A partition absent from ``changes`` has the same rows at both versions. ``pace`` is
        called after each partition's overlays and each ``_WRITE_ROWS`` rows written (a paced
        apply: ``loader.Pacer``); lookups meanwhile are served from the overlays."""
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
            pv.table.hold(rows)
            index = torch.from_numpy(np.ascontiguousarray(local, dtype=np.int64))
            old = pv.weight[index].clone()
            for v, parts in versions.items():
                other = parts.get(key)
                if v == target or other is None or other.weight is not pv.weight:
                    continue
                ov = Overlay(np.asarray(local, dtype=np.int64), old) if other.overlay is None else other.overlay.extended(local, old)
                parts[key] = replace(other, overlay=ov)
            writes.append((pv.weight, index, rows))
            pace()
        # 1. publish the overlays that keep every other version exact, 2. wait for lookups that
        # may read the primary's rows directly, 3. write in place (every version but the target
        # now reads these rows from its overlay), 4. target becomes primary.
        # (A target already held keeps its overlay until step 4: it stays exact throughout.)
        self._quiesce(self._publish(a, versions))
        for weight, index, rows in writes:
            for start in range(0, len(index), _WRITE_ROWS):
                weight[index[start : start + _WRITE_ROWS]] = rows[start : start + _WRITE_ROWS]
                pace()
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

    def promote(self, version: Version, *, pace: Callable[[], None] = _unpaced) -> None:
        """Make a held version the primary: in place from its overlay (paced like ``apply``),
        or (own weights) by switching the snapshot."""
        if version == self._state.primary:
            return
        changes = self.overlay_changes(version)
        if changes is None:
            self._publish(version, self._copy())
        else:
            self.apply(version, changes, pace=pace)

    def drop(self, version: Version) -> None:
        """Stop serving ``version`` (never the primary) and free what only it used."""
        state = self._state
        if version == state.primary or version not in state.versions:
            return
        versions = {v: dict(parts) for v, parts in state.versions.items() if v != version}
        self._publish(state.primary, versions)
