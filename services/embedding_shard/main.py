"""Embedding shard process: load assigned partitions, serve Lookup, register, follow versions.

Lifecycle (docs/zookeeper.md): read the active ShardMap and the model's serving version from
ZooKeeper -> start the gRPC server NOT_SERVING -> load the partitions the map assigns to this
node id at the serving version (base + deltas) -> SERVING -> register the ephemeral znode
(address, partitions, versions ready) -> the version manager follows ``target_version`` in the
background (``versions.VersionManager``) and the znode reports every change. SIGTERM/SIGINT:
deregister -> NOT_SERVING -> finish in-flight calls within the grace period -> exit 0. Never
registers before it is ready.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from services.core.checkpoint.reader import CheckpointReader
from services.core.clients import make_kazoo
from services.core.config import ShardConfig
from services.core.discovery.registry import NodeRegistration
from services.core.discovery.shard_map_store import ShardMapStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.placement import ShardMap
from services.core.rpc.server import start_sync_server, tune_allocator
from services.embedding_shard.servicer import EmbeddingShardServicer, add_to_server
from services.embedding_shard.store import TableStore, load_partitions
from services.embedding_shard.versions import VersionManager

log = logging.getLogger("shardrec.shard")


class MapView:
    """The latest active ShardMap seen by a ZooKeeper watch (kazoo thread writes, RPC threads read)."""

    def __init__(self) -> None:
        self._map: ShardMap | None = None
        self._changed = threading.Condition()

    def set(self, smap: ShardMap | None) -> None:
        with self._changed:
            if smap is not None:
                self._map = smap
            self._changed.notify_all()

    def get(self) -> ShardMap | None:
        return self._map

    def version(self) -> int:
        return 0 if self._map is None else self._map.version

    def wait(self, stop: threading.Event) -> ShardMap | None:
        with self._changed:
            while self._map is None and not stop.is_set():
                self._changed.wait(0.5)
            return self._map


def node_data(config: ShardConfig, address: str, store: TableStore, map_version: int, manager: VersionManager | None = None) -> dict:
    return {
        "node_id": config.node_id,
        "address": address,
        "partitions": sorted(str(k) for k in store.partitions()),
        "versions_ready": store.versions_ready,
        "serving_version": store.primary,
        "map_version": map_version,
        "overlay_bytes": store.overlay_bytes(),
        "pid": os.getpid(),
        **(manager.status() if manager is not None else {}),
    }


def run(config: ShardConfig) -> int:
    torch.set_num_threads(config.torch_threads)
    tune_allocator()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    paths = ZkPaths(config.zk.cluster)
    zk = make_kazoo(config.zk)
    maps = ShardMapStore(zk, paths)
    view = MapView()
    maps.watch_active(view.set)  # kazoo thread: only stores the parsed map
    log.info("node %s waiting for the shard map of cluster %s", config.node_id, config.zk.cluster)
    smap = view.wait(stop)
    if smap is None:
        zk.stop()
        return 0
    model = maps.read_model()
    version = maps.read_serving_version()
    reader = CheckpointReader(model["uri"])
    manifest = reader.manifest(version)
    keys = list(smap.partitions_of(config.node_id))
    num_partitions = {t: smap.num_partitions(t) for t in smap.tables}

    store = TableStore({t.name: t for t in manifest.model.tables}, num_partitions)
    manager = VersionManager(
        store, reader, keys, num_partitions,
        stop=stop, verify=config.verify_checksums, load_rate_bytes_s=config.load_rate_bytes_s, drain_s=config.version_drain_s,
    )
    servicer = EmbeddingShardServicer(
        config.node_id, store, max_ids_per_request=config.max_ids_per_request, map_version=view.version
    )
    server = start_sync_server(
        config.host,
        config.port,
        threads=config.rpc_threads,
        max_message_bytes=config.max_message_bytes,
        add_servicers=[lambda s: add_to_server(servicer, s)],
        service_names=["shardrec.v1.EmbeddingShard"],
    )
    address = f"{config.advertise_host or config.host}:{server.port}"
    log.info("node %s listening on %s, loading %d partition(s) at version %d", config.node_id, address, len(keys), version)
    print(f"LISTENING {config.node_id} {address}", flush=True)
    t0 = time.monotonic()
    store.install(
        version,
        load_partitions(
            reader, version, keys, num_partitions,
            verify=config.verify_checksums, load_rate_bytes_s=config.load_rate_bytes_s, stop=stop,
        ),
    )
    log.info("node %s loaded in %.2fs", config.node_id, time.monotonic() - t0)
    if stop.is_set():  # asked to stop while loading: never register
        server.stop(0)
        zk.stop()
        zk.close()
        return 0
    server.set_serving(True)
    registration = NodeRegistration(zk, paths.node(config.node_id), node_data(config, address, store, smap.version, manager))
    registration.register()
    log.info("node %s registered at %s", config.node_id, paths.node(config.node_id))
    print(f"READY {config.node_id} {address}", flush=True)

    manager.on_change = lambda: registration.update(node_data(config, address, store, view.version(), manager))
    maps.watch_serving_version(manager.set_serving)
    maps.watch_frontend_versions(lambda served: manager.set_frontend_versions(served.values()))
    maps.watch_target_version(manager.set_target)
    reconciler = threading.Thread(target=manager.run, name="version-manager", daemon=True)
    reconciler.start()

    stop.wait()
    manager.stop_wake()
    log.info("node %s stopping: deregister, NOT_SERVING, drain %.1fs", config.node_id, config.grace_s)
    registration.deregister()
    server.stop(config.grace_s)
    zk.stop()
    zk.close()
    log.info("node %s stopped", config.node_id)
    return 0
