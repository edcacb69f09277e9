"""The frontend's view of its cluster, fed only by ZooKeeper watches (no polling).

``ClusterView`` holds the active ShardMap, the live shard nodes (their ``NodeRecord``: address,
partitions and versions ready, from their ephemeral znodes), the serving version and the
model's checkpoint. It is owned by the event loop: the watch callbacks (kazoo's, and the
members watch's own thread) only hand their event to the loop with ``call_soon_threadsafe``.
During a ZooKeeper outage no callback fires, so the last good view keeps serving; kazoo re-arms
the watches when the connection or a new session comes back (after a session expiry the members
watch reads the children again). A node that leaves is remembered (``departed``: when, and its
last record), so readiness can tell a node gone for good from a session being re-established
(docs/health.md); a node that comes back as another process (``instance_id`` or address
changed) is announced to ``on_new_instance`` listeners (the fan-out forgets its ejection).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import ModelPointer, NodeRecord
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import UnavailableError
from services.core.placement import ShardMap

log = logging.getLogger(__name__)


class ClusterView:
    """Snapshot getters are cheap and return immutable objects; call them on the loop."""

    def __init__(self, zk, paths: ZkPaths, loop: asyncio.AbstractEventLoop) -> None:
        self.zk = zk
        self.paths = paths
        self._loop = loop
        self._store = ClusterStore(zk, paths)
        self.shard_map: ShardMap | None = None
        self.nodes: dict[str, NodeRecord] = {}
        # Last address each node registered with, kept after it leaves: when the view says a
        # partition has no live replica (a ZooKeeper hiccup, a session being re-established),
        # the fan-out still tries these before giving up. An RPC, not a watch, is the verdict.
        self.last_addresses: dict[str, str] = {}
        # Nodes that left the view: when (time.monotonic()) and their last record.
        self.departed: dict[str, tuple[float, NodeRecord]] = {}
        # Called on the loop with a node id and the address its previous process registered.
        self.on_new_instance: list[Callable[[str, str], None]] = []
        self._instances: dict[str, tuple[str, str]] = {}  # node -> (address, instance_id) last seen
        self.serving_version: int = 0
        self.target_version: int = 0
        self.model: ModelPointer | None = None
        self._changed = asyncio.Event()

    # -- start (blocking ZooKeeper reads: call from an executor thread) -----------------------
    def start_blocking(self) -> None:
        self.model = self._store.read_model()
        self._store.watch_active(lambda smap: self._hop(self._set_map, smap))
        self._store.watch_serving_version(lambda v: self._hop(self._set_version, "serving_version", v))
        self._store.watch_target_version(lambda v: self._hop(self._set_version, "target_version", v))
        self._store.watch_nodes(lambda nodes: self._hop(self._set_nodes, nodes), dialable=True)

    # -- kazoo and members-watch threads -> loop ----------------------------------------------
    def _hop(self, fn, *args) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- loop ---------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_map(self, smap: ShardMap | None) -> None:
        if smap is not None:
            self.shard_map = smap
            log.info("shard map version %d", smap.version)
            self._notify()

    def _set_version(self, which: str, version: int | None) -> None:
        if version:
            setattr(self, which, version)
            self._notify()

    def _set_nodes(self, nodes: dict[str, NodeRecord]) -> None:
        """The live nodes, as the members watch delivered them (a malformed znode, or one that
        names no address, is left out there with a warning)."""
        now = time.monotonic()
        for node_id, record in nodes.items():
            if node_id not in self.nodes:
                log.info("node %s joined at %s (instance %s)", node_id, record.address, record.instance_id or "?")
                self.departed.pop(node_id, None)
            self.last_addresses[node_id] = record.address
            instance = (record.address, record.instance_id)
            previous = self._instances.setdefault(node_id, instance)
            if previous != instance:
                self._instances[node_id] = instance
                for listener in self.on_new_instance:
                    listener(node_id, previous[0])
        for node_id in self.nodes.keys() - nodes.keys():
            log.info("node %s left", node_id)
            self.departed[node_id] = (now, self.nodes[node_id])
        self.nodes = nodes
        self._notify()

    async def changed(self) -> None:
        """Return at the next change of the view (a watch event)."""
        await self._changed.wait()

    def ready_everywhere(self, version: int) -> bool:
        """True when every partition of the active map has a live replica ready at ``version``."""
        smap = self.shard_map
        if smap is None:
            return False
        return all(
            any(r in self.nodes and version in self.nodes[r].versions_ready for r in replicas)
            for tp in smap.tables.values()
            for replicas in tp.partitions
        )

    async def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        """Wait until ``predicate(self)`` holds, woken by watch events (no polling)."""
        async def loop():
            while not predicate(self):
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), timeout_s)
        except TimeoutError:
            raise UnavailableError(f"timed out after {timeout_s:g}s waiting for {what}") from None

    def unready_partitions(self, version: int, now: float, grace_s: float) -> list[str]:
        """Partitions of the active map with no replica ready at ``version``: none in the view
        reports it, and none that reported it left less than ``grace_s`` ago."""
        smap = self.shard_map
        if smap is None:
            return ["<no shard map>"]

        def ready(node: str) -> bool:
            record = self.nodes.get(node)
            if record is None:
                left = self.departed.get(node)
                if left is None or now - left[0] >= grace_s:
                    return False
                record = left[1]
            return version in record.versions_ready

        return [f"{table}/{p}" for table, tp in smap.tables.items() for p, replicas in enumerate(tp.partitions)
                if not any(ready(r) for r in replicas)]

    def next_departure_due(self, now: float, grace_s: float) -> float | None:
        """Seconds until the grace of the next departed node ends (None: none pending)."""
        ends = [t + grace_s - now for t, _ in self.departed.values() if t + grace_s > now]
        return min(ends) if ends else None

    def missing_partitions(self) -> list[str]:
        """Partitions of the active map with no live replica (empty when fully served)."""
        smap = self.shard_map
        if smap is None:
            return ["<no shard map>"]
        missing = []
        for table, tp in smap.tables.items():
            for p, replicas in enumerate(tp.partitions):
                if not any(r in self.nodes for r in replicas):
                    missing.append(f"{table}/{p}")
        return missing
