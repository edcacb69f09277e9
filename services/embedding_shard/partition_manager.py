"""The shard's partition manager: makes the node hold what the shard maps give it.

Ownership comes only from the ShardMaps in ZooKeeper (docs/placement.md, "Rebalancing"): a node
owns its partitions in the active map and, while a rebalance is in progress, in the target map.
This reconciler (STYLE #2) acts on them while the node serves:

- a partition it owns and does not hold is loaded in the background, at every model version
  the node holds (``loader.PartitionLoader``: full rows at the primary; at another version the
  rows where it differs, or full rows for another base), its files verified first, throttled to
  ``load_rate_bytes_s``, then published in one snapshot (``TableStore.add_partition``). A load
  whose partition stops being owned meanwhile (the rebalance was aborted) is abandoned.
- a partition it holds and no longer owns is dropped ``drain_s`` after it stopped being owned,
  so requests still routed with the previous map are served meanwhile. Before dropping, the
  maps are read again from ZooKeeper (target first, then active): a watch may deliver the
  deletion of the target before the switch of the active map that came with it.

Nothing here depends on a restart: a node that starts reads the active map, loads its
partitions before it registers (``main.py``), then this manager follows both maps.

Threads: ``set_active`` / ``set_target`` are called from kazoo watch threads and only record
the map and call ``wake``; ``reconcile`` runs on the node's reconciler thread
(``reconciler.Reconciler``), which also calls ``on_change``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from services.core.checkpoint.reader import CheckpointReader
from services.core.discovery.records import PartitionError
from services.core.errors import ShardrecError
from services.core.placement import ShardMap, owned_partitions
from services.core.types import PartitionId
from services.embedding_shard.loader import PartitionLoader, Throttle, verify_all
from services.embedding_shard.store import TableStore

log = logging.getLogger(__name__)

# A partition whose load failed (I/O, a checkpoint error) is tried again after this long.
LOAD_RETRY_S = 5.0

ReadMaps = Callable[[], "tuple[ShardMap | None, ShardMap | None]"]


class PartitionManager:
    def __init__(
        self,
        node_id: str,
        store: TableStore,
        reader: CheckpointReader,
        *,
        stop: threading.Event,
        read_maps: ReadMaps,
        wake: Callable[[], None] = lambda: None,
        on_change: Callable[[], None] = lambda: None,
        load_rate_bytes_s: int = 0,
        drain_s: float = 5.0,
        verify: bool = True,
    ) -> None:
        self._node_id = node_id
        self._store = store
        self._reader = reader
        self._stop = stop
        self._read_maps = read_maps
        self._wake = wake
        self.on_change = on_change
        self._throttle = Throttle(load_rate_bytes_s, stop)
        self._verify = verify
        self._drain_s = drain_s
        self._active: ShardMap | None = None
        self._target: ShardMap | None = None
        self._unowned_since: dict[PartitionId, float] = {}
        self._retry_at: dict[PartitionId, float] = {}
        self.loading: PartitionId | None = None
        self.error: PartitionError | None = None
        self._pending: list[PartitionId] = []

    # -- any thread (kazoo watches) -------------------------------------------------------------
    def set_active(self, smap: ShardMap | None) -> None:
        if smap is not None:  # a deleted active map is an operator's mistake: keep the last one
            self._active = smap
            self._wake()

    def set_target(self, smap: ShardMap | None) -> None:
        self._target = smap
        self._wake()

    def owned(self) -> frozenset[PartitionId]:
        """The partitions of this node in the active and target maps, as last delivered."""
        return self._known(owned_partitions(self._node_id, self._active, self._target))

    def status(self) -> dict[str, Any]:
        """What the node's znode reports about partitions beyond ``partitions`` and ``held``: its
        ``NodeRecord`` fields by name."""
        target = self._target
        return dict(
            target_map_version=None if target is None else target.version,
            partitions_loading=tuple(str(p) for p in self._pending),
            partitions_draining=tuple(sorted(str(p) for p in self._unowned_since)),
            partition_error=self.error,
        )

    # -- the reconciler thread ------------------------------------------------------------------
    def reconcile(self) -> float | None:
        """One pass: follow the active layout, drop what is due, load one missing partition.
        Returns how long the thread may sleep (0: more to load at once; None: until woken)."""
        active = self._active
        if active is None:
            return None
        target = self._target
        self._store.set_layout(
            {t: tp.num_partitions for t, tp in active.tables.items()},
            also=() if target is None else ({t: tp.num_partitions for t, tp in target.tables.items()},),
        )
        owned = self.owned()
        held = set(self._store.held())
        wait = self._drop_unowned(owned, held)
        now = time.monotonic()
        in_active = set(active.partition_ids_of(self._node_id))
        missing = sorted(owned - held, key=lambda p: (p not in in_active, str(p)))  # a restarted node's own first
        pending = [p for p in missing if self._retry_at.get(p, 0.0) <= now]
        if self._pending != missing:
            self._pending = missing
            self.on_change()
        if not pending:
            retry = [t - now for p, t in self._retry_at.items() if p in missing]
            return _earliest(wait, min(retry) if retry else None)
        self._load(pending[0])
        return 0.0

    def _known(self, pids: frozenset[PartitionId]) -> frozenset[PartitionId]:
        """Leave out tables the model does not have (a bad map is not this node's to load)."""
        return frozenset(p for p in pids if p.table in self._store.specs)

    def _drop_unowned(self, owned: frozenset[PartitionId], held: set[PartitionId]) -> float | None:
        now = time.monotonic()
        for pid in list(self._unowned_since):
            if pid in owned or pid not in held:
                del self._unowned_since[pid]
        due = []
        wait: float | None = None
        for pid in held - owned:
            left = self._unowned_since.setdefault(pid, now) + self._drain_s - now
            if left <= 0:
                due.append(pid)
            else:
                wait = left if wait is None else min(wait, left)
        if not due:
            return wait
        try:
            target, active = self._read_maps()  # fresh: the target first, then the active map
        except ShardrecError as e:  # ZooKeeper away: keep the rows, try again
            log.warning("not dropping %s yet: cannot read the shard maps (%s)", [str(p) for p in due], e)
            return 1.0
        still = self._known(owned_partitions(self._node_id, active, target))
        for pid in sorted(due, key=str):
            if pid in still:
                continue  # a watch was behind: the maps still give it to this node
            log.info("dropping partition %s: no longer owned (drained %.1fs)", pid, self._drain_s)
            self._store.remove_partition(pid)
            del self._unowned_since[pid]
            self.on_change()
        return wait

    def _load(self, pid: PartitionId) -> None:
        """``pid`` at every version held: full rows at the primary, and at each other version
        the rows where it differs (or full rows for another base)."""
        self.loading = pid
        t0 = time.monotonic()
        size = 0
        try:
            primary = self._store.primary
            loaders = [PartitionLoader(self._reader, pid, primary)] + [
                PartitionLoader(self._reader, pid, v, over=primary) for v in self._store.versions_ready if v != primary
            ]
            if self._verify:
                verify_all(loaders)
            size = sum(loader.estimate_bytes() for loader in loaders)
            if not self._throttle.spend(size, lambda: pid in self.owned()):
                log.info("abandoned loading partition %s: no longer owned", pid)
                return
            weights = {loader.version: loader.load_rows() for loader in loaders if loader.full}
            overlays = {loader.version: loader.load_changes().pair() for loader in loaders if not loader.full}
            self._store.add_partition(pid, weights, overlays)
        except (ShardrecError, OSError, ValueError) as e:
            self.error = PartitionError(str(pid), str(e))
            self._retry_at[pid] = time.monotonic() + LOAD_RETRY_S
            log.error("cannot load partition %s (trying again in %.0fs): %s", pid, LOAD_RETRY_S, e)
        else:
            self._retry_at.pop(pid, None)
            if self.error is not None and self.error.partition == str(pid):
                self.error = None
            log.info(
                "partition %s ready at versions %s in %.2fs (%.1f KiB)",
                pid, self._store.versions_ready, time.monotonic() - t0, size / 1024,
            )
        finally:
            self.loading = None
            held = set(self._store.held())
            self._pending = [p for p in self._pending if p not in held]
            self.on_change()


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
