"""The shard's load meter: per partition, lookups and ids served and ids per second over a
window, for the node's znode (docs/zookeeper.md, ``held``); ``shardrec rebalance show|plan``
plan with the measured load."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from services.core.discovery.records import HeldPartition
from services.core.types import PartitionId
from services.embedding_shard.store import TableStore


class LoadMeter:
    """Per partition: lookups and ids served so far, and ids per second over the last
    ``window_s`` (sampled every ``interval_s``), for the node's znode.

    ``tick`` runs on the reconciler thread; ``report`` on any thread (it reads counters that
    lookups bump without a lock: best-effort, like the counters themselves)."""

    def __init__(self, store: TableStore, *, interval_s: float = 5.0, window_s: float = 60.0,
                 on_change: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._interval_s = interval_s
        self._window_s = window_s
        self.on_change = on_change
        self._clock = clock
        self._samples: dict[PartitionId, deque[tuple[float, int]]] = {}
        self._rates: dict[PartitionId, float] = {}
        self._next = clock() + interval_s

    def tick(self) -> float:
        now = self._clock()
        if now < self._next:
            return self._next - now
        self._next = now + self._interval_s
        tables = self._store.partitions()
        changed = False
        for pid in list(self._samples):
            if pid not in tables:
                del self._samples[pid]
                self._rates.pop(pid, None)
        for pid, table in tables.items():
            samples = self._samples.setdefault(pid, deque())
            if samples and samples[-1][1] != table.ids:
                changed = True
            samples.append((now, table.ids))
            while len(samples) > 2 and samples[0][0] < now - self._window_s:
                samples.popleft()
            (t0, ids0), (t1, ids1) = samples[0], samples[-1]
            rate = (ids1 - ids0) / (t1 - t0) if t1 > t0 else 0.0
            changed |= self._rates.get(pid) != rate
            self._rates[pid] = rate
        if changed:
            self.on_change()
        return self._interval_s

    def report(self) -> dict[str, HeldPartition]:
        """``{"items/1of2": HeldPartition(bytes, lookups, ids, ids_per_s)}`` for every held partition."""
        out = {}
        for pid, table in sorted(self._store.partitions().items(), key=lambda kv: str(kv[0])):
            out[str(pid)] = HeldPartition(
                size_bytes=self._store.size_bytes(pid),
                lookups=table.lookups,
                ids=table.ids,
                ids_per_s=round(self._rates.get(pid, 0.0), 3),
            )
        return out
