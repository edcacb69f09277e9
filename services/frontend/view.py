"""The frontend's view of its cluster, fed only by ZooKeeper watches (no polling).

``ClusterView`` holds the active ShardMap, the live shard nodes (address, partitions and
versions ready, from their ephemeral znodes), the serving version and the model's checkpoint.
It is owned by the event loop: kazoo watch callbacks only hand their event to the loop with
``call_soon_threadsafe``. During a ZooKeeper outage no callback fires, so the last good view
keeps serving; kazoo re-arms the watches when the session comes back.
"""

from __future__ import annotations

import asyncio
import logging

from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import ModelPointer, NodeRecord, RecordError
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import UnavailableError
from services.core.placement import ShardMap

log = logging.getLogger(__name__)


def parse_node(node_id: str, data: bytes) -> NodeRecord | None:
    try:
        record = NodeRecord.from_bytes(data, f"node {node_id}")
    except RecordError as e:
        log.warning("ignoring node %s: %s", node_id, e)
        return None
    if not record.address:
        log.warning("ignoring node %s: its znode names no address", node_id)
        return None
    return record


class ClusterView:
    """Snapshot getters are cheap and return immutable objects; call them on the loop."""

    def __init__(self, zk, paths: ZkPaths, loop: asyncio.AbstractEventLoop) -> None:
        self.zk = self._zk = zk
        self.paths = self._paths = paths
        self._loop = loop
        self._store = ClusterStore(zk, paths)
        self._watched: set[str] = set()
        self.shard_map: ShardMap | None = None
        self.nodes: dict[str, NodeRecord] = {}
        # Last address each node registered with, kept after it leaves: when the view says a
        # partition has no live replica (a ZooKeeper hiccup, a session being re-established),
        # the fan-out still tries these before giving up. An RPC, not a watch, is the verdict.
        self.last_addresses: dict[str, str] = {}
        self.serving_version: int = 0
        self.target_version: int = 0
        self.model: ModelPointer | None = None
        self._changed = asyncio.Event()

    # -- start (blocking ZooKeeper reads: call from an executor thread) -----------------------
    def start_blocking(self) -> None:
        self.model = self._store.read_model()
        self._zk.ensure_path(self._paths.nodes)
        self._store.watch_active(lambda smap: self._hop(self._set_map, smap))
        self._store.watch_serving_version(lambda v: self._hop(self._set_version, "serving_version", v))
        self._store.watch_target_version(lambda v: self._hop(self._set_version, "target_version", v))
        self._zk.ChildrenWatch(self._paths.nodes, lambda children: self._hop(self._children, list(children)))

    # -- kazoo threads -> loop ----------------------------------------------------------------
    def _hop(self, fn, *args) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _watch_node(self, node_id: str) -> None:
        # Runs in an executor thread: DataWatch reads the znode once when created.
        def on_data(data, stat, *_):
            self._hop(self._node_data, node_id, data)

        self._zk.DataWatch(self._paths.node(node_id), on_data)

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

    def _children(self, children: list[str]) -> None:
        for node_id in children:
            if node_id not in self._watched:
                self._watched.add(node_id)  # one DataWatch per node id, for its whole life
                self._loop.run_in_executor(None, self._watch_node, node_id)

    def _node_data(self, node_id: str, data: bytes | None) -> None:
        info = parse_node(node_id, data) if data else None
        if info is None:
            if self.nodes.pop(node_id, None) is not None:
                log.info("node %s left", node_id)
        else:
            if node_id not in self.nodes:
                log.info("node %s joined at %s", node_id, info.address)
            self.nodes[node_id] = info
            self.last_addresses[node_id] = info.address
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
