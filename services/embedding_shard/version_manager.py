"""The shard's version manager: makes the node hold what ZooKeeper says should be served.

ZooKeeper publishes desired state; this one reconciler acts on it (STYLE #2):

- ``model/target_version`` T: load T in the background while serving (only the changed rows of
  this node's partitions when T shares a base with the primary, paced to ``swap_cpu_share`` of
  one core; a full load for a new base), then report it ready. A target already held (a
  rollback to the previous version) is promoted from the rows the node still holds, reading
  nothing.
- ``model/serving_version`` S and the versions live frontends serve: a version no one serves
  any more (not the primary, not T, not S) is dropped after ``drain_s``, freeing its overlay.

A target is refused (and serving continues on the old version with no row changed) when its
checkpoint is incomplete, corrupt or truncated in the files of the tables the node holds, or
when the lineage rule refuses it (``core.checkpoint.lineage.check_follow``). The refusal is
logged and reported in the node's znode (``load_error``), which ``shardrec checkpoint status``
shows. The same target is not retried until it is published again.

The rows loaded (``loader.PartitionLoader``) are those of the partitions the node holds when the
load starts (``TableStore.held``); partitions come and go between loads
(``partition_manager.PartitionManager``), never during one: both run on the node's one
reconciler thread (``reconciler.Reconciler``).

Threads: the ``set_*`` methods are called from kazoo watch threads and only record the value
and call ``wake``; ``reconcile`` runs on the reconciler thread; ``on_change`` is called from it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from services.core.checkpoint import lineage
from services.core.checkpoint.reader import CheckpointReader
from services.core.discovery.records import LoadError
from services.core.errors import ShardrecError
from services.core.types import Version
from services.embedding_shard.loader import Pacer, Throttle, load_changes, load_rows, loaders_for, verify_all
from services.embedding_shard.store import TableStore

log = logging.getLogger(__name__)


class VersionManager:
    def __init__(
        self,
        store: TableStore,
        reader: CheckpointReader,
        *,
        stop: threading.Event,
        wake: Callable[[], None] = lambda: None,
        on_change: Callable[[], None] = lambda: None,
        verify: bool = True,
        load_rate_bytes_s: int = 0,
        swap_cpu_share: float = 1.0,
        drain_s: float = 2.0,
    ) -> None:
        self._store = store
        self.on_change = on_change
        self._reader = reader
        self._wake = wake
        self._stop = stop
        self._verify = verify
        self._throttle = Throttle(load_rate_bytes_s, stop)
        self._pacer = Pacer(swap_cpu_share, stop)
        self._drain_s = drain_s
        self._lock = threading.Lock()
        self._target: Version | None = None
        self._serving: Version | None = None
        self._frontend_versions: frozenset[Version] = frozenset()
        self._unused_since: dict[Version, float] = {}
        self._refused: Version | None = None  # the target last refused (not retried)
        self.loading: Version | None = None
        self.load_error: LoadError | None = None
        self.last_load_s: float | None = None
        self.loads = 0  # versions loaded (or promoted), for the metrics
        self.refusals = 0  # targets refused
        self.on_load_time: Callable[[float], None] = lambda _s: None  # each load's duration, refused ones too

    # -- any thread (kazoo watches) -------------------------------------------------------------
    def set_target(self, version: Version | None) -> None:
        with self._lock:
            self._target = version
            self._refused = None  # published again: try again
        self._wake()

    def set_serving(self, version: Version | None) -> None:
        self._serving = version
        self._wake()

    def set_frontend_versions(self, versions: Iterable[Version]) -> None:
        self._frontend_versions = frozenset(versions)
        self._wake()

    @property
    def target(self) -> Version | None:
        """The target version last published (None before any)."""
        return self._target

    def status(self) -> dict[str, Any]:
        """What the node's znode reports about versions, beyond ``versions_ready``: its
        ``NodeRecord`` fields by name."""
        return dict(loading=self.loading, load_error=self.load_error)

    # -- the reconciler thread ------------------------------------------------------------------
    def reconcile(self) -> float | None:
        """One pass: load or promote the target, drop unused versions. Returns how long the
        thread may sleep before a drop falls due (None: until woken)."""
        with self._lock:
            target, refused = self._target, self._refused
        if target and target != self._store.primary and target != refused:
            self._reach(target)
        return self._drop_unused()

    @property
    def last_paced_s(self) -> float:
        """Seconds the last swap (load or promote) slept to keep to ``swap_cpu_share``."""
        return self._pacer.slept_s

    def _reach(self, target: Version) -> None:
        self._pacer.begin()
        if target in self._store.versions_ready:
            log.info("promoting held version %d to primary", target)
            self._store.promote(target, pace=self._pacer.step)
            self.on_change()
            return
        self.loading = target
        self.on_change()
        t0 = time.monotonic()
        try:
            with self._reader.one_view():  # the chains are walked many times: manifests read once
                self._load(target)
        except (ShardrecError, OSError, ValueError) as e:
            with self._lock:
                self._refused = target
            self.refusals += 1
            self.on_load_time(time.monotonic() - t0)
            self.load_error = LoadError(target, str(e))
            log.error("refused version %d, still serving %d: %s", target, self._store.primary, e)
        else:
            self.load_error = None
            self.last_load_s = time.monotonic() - t0
            self.loads += 1
            self.on_load_time(self.last_load_s)
            log.info("version %d ready in %.2fs, %.3fs of CPU, %.2fs paced (versions held: %s)", target, self.last_load_s,
                     self._pacer.cpu_s, self._pacer.slept_s, self._store.versions_ready)  # fmt: skip
        finally:
            self.loading = None
            self.on_change()

    def check_lineage(self, target: Version) -> None:
        """Refuse a target the lineage rule refuses (CheckpointError naming both chains)."""
        serving = self._serving or self._store.primary
        serving_chain = [m.version for m in self._reader.chain(serving)] if serving else None
        lineage.check_follow([m.version for m in self._reader.chain(target)], serving_chain)

    def _load(self, target: Version) -> None:
        """Verify, read and apply ``target``: changes are paced (``Pacer``) at every step, so the
        node's serving threads keep most of its CPU; a new base is loaded whole (``Throttle``)."""
        self.check_lineage(target)
        a = self._store.primary
        loaders = loaders_for(self._reader, target, self._store.held(), over=a)
        self._pacer.step()
        if self._verify:
            verify_all(loaders, self._pacer)
        if any(loader.full for loader in loaders):
            log.info("version %d has another base than %d: loading it whole", target, a)
            weights = load_rows(loaders, self._throttle)
            if weights is None or self._stop.is_set():
                return
            self._store.install(target, weights)
            return
        size = 0
        for loader in loaders:
            size += loader.estimate_bytes()  # reads the deltas' ids
            self._pacer.step()
        if not self._throttle.spend(size):
            return
        changes = load_changes(loaders, self._pacer)
        rows = sum(len(ids) for ids, _ in changes.values())
        log.info("applying version %d over %d: %d rows (%.1f MiB)", target, a, rows, size / 2**20)
        self._store.apply(target, changes, pace=self._pacer.step)

    def _drop_unused(self) -> float | None:
        keep = {self._store.primary, self._target, self._serving, *self._frontend_versions}
        now = time.monotonic()
        wait: float | None = None
        for v in self._store.versions_ready:
            if v in keep:
                self._unused_since.pop(v, None)
                continue
            since = self._unused_since.setdefault(v, now)
            left = since + self._drain_s - now
            if left <= 0:
                log.info("dropping version %d: no frontend serves it", v)
                self._store.drop(v)
                self._unused_since.pop(v, None)
                self.on_change()
            else:
                wait = left if wait is None else min(wait, left)
        return wait
