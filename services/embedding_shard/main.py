"""Embedding shard process: load assigned partitions, serve Lookup, register, follow the maps.

Lifecycle (docs/zookeeper.md, docs/health.md): read the active ShardMap and the model's serving
version from ZooKeeper -> start the gRPC server (live, not ready) -> load the partitions the
active map assigns to this node id at the serving version (base + deltas,
``loader.PartitionLoader``) -> ready (readiness ``loaded``: SERVING) -> register the ephemeral
znode (address, partitions, versions ready, load, this process's instance id; a predecessor's
znode is taken over once its address no longer answers as it) -> one reconciler
thread (``reconciler.Reconciler``) follows ``target_version`` (``version_manager``), the active
and target shard maps (``partition_manager``: partitions gained in a rebalance load while
serving, lost ones drop after ``--partition-drain-s``) and samples the load counters
(``meter.LoadMeter``); the znode reports every change. SIGTERM/SIGINT: deregister ->
NOT_SERVING -> finish in-flight calls within the grace period -> exit 0. Never registers
before it is ready.
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
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import FrontendRecord, NodeRecord
from services.core.discovery.registry import NodeRegistration
from services.core.discovery.zk_paths import ZkPaths
from services.core.placement import ShardMap
from services.core.auth import access_policy
from services.core.hostport import join_host_port
from services.core.metrics import ShardMetrics
from services.core.rpc.probe import holder_probe
from services.core.rpc.readiness import Readiness
from services.core.rpc.server import Security, keepalive_options, new_instance_id, start_sync_server, tune_allocator
from services.core.telemetry import Telemetry
from services.core.tls import TlsMaterial
from services.embedding_shard.limits import LookupLimits
from services.embedding_shard.loader import Throttle, load_rows, loaders_for, verify_all
from services.embedding_shard.meter import LoadMeter
from services.embedding_shard.observe import LookupObserver, shard_reading
from services.embedding_shard.partition_manager import PartitionManager
from services.embedding_shard.reconciler import Reconciler
from services.embedding_shard.servicer import EmbeddingShardServicer, add_to_server
from services.embedding_shard.store import TableStore
from services.embedding_shard.version_manager import VersionManager

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


def node_record(
    config: ShardConfig, address: str, store: TableStore, map_version: int,
    versions: VersionManager, partitions: PartitionManager, meter: LoadMeter, instance_id: str = "",
) -> NodeRecord:
    """The node's znode (docs/zookeeper.md): ``partitions`` are the held partitions of the
    active map's layout (``table/p``); ``held`` every partition held with its bytes and load;
    then what the version and partition managers report."""
    held = meter.report()
    layout = store.num_partitions
    return NodeRecord(
        node_id=config.node_id,
        address=address,
        partitions=tuple(sorted(str(p.key) for p in store.held() if layout.get(p.table) == p.num_partitions)),
        held=held,
        memory_bytes=sum(h.size_bytes for h in held.values()),
        versions_ready=tuple(store.versions_ready),
        serving_version=store.primary,
        map_version=map_version,
        overlay_bytes=store.overlay_bytes(),
        pid=os.getpid(),
        instance_id=instance_id,
        **versions.status(),
        **partitions.status(),
    )


def served_versions(frontends: dict[str, FrontendRecord]) -> list[int]:
    """The model versions the live frontends serve (the shard keeps their rows)."""
    return [f.version for f in frontends.values() if f.version is not None]


def _read_maps(maps: ClusterStore):  # noqa: ANN202
    """The target map, then the active map, fresh from ZooKeeper (that order: a rebalance
    deletes the target only when or after it switches the active map)."""
    from services.core.errors import NotFoundError

    def read() -> tuple[ShardMap | None, ShardMap | None]:
        found = maps.read_target()
        target = None if found is None else found[0]
        try:
            active = maps.read_active()[0]
        except NotFoundError:
            active = None
        return target, active

    return read


def run(config: ShardConfig) -> int:
    torch.set_num_threads(config.torch_threads)
    tune_allocator()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    tls = TlsMaterial(config.tls) if config.tls.enabled else None
    # mTLS: Lookup only from a frontend's certificate; else the cluster token when one is set
    security = Security(access_policy(config.auth, mtls=tls is not None), tls, require_client_auth=tls is not None)
    paths = ZkPaths(config.zk.cluster)
    zk = make_kazoo(config.zk)
    maps = ClusterStore(zk, paths)
    view = MapView()
    maps.watch_active(view.set)  # kazoo thread: only stores the parsed map
    log.info("node %s waiting for the shard map of cluster %s", config.node_id, config.zk.cluster)
    smap = view.wait(stop)
    if smap is None:
        zk.stop()
        return 0
    model = maps.read_model()
    version = maps.read_serving_version()
    reader = CheckpointReader(model.uri)
    manifest = reader.manifest(version)
    pids = list(smap.partition_ids_of(config.node_id))

    store = TableStore({t.name: t for t in manifest.model.tables}, {t: tp.num_partitions for t, tp in smap.tables.items()})
    reconciler = Reconciler(stop=stop)
    versions = VersionManager(
        store, reader, stop=stop, wake=reconciler.wake, verify=config.verify_checksums, load_rate_bytes_s=config.load_rate_bytes_s,
        swap_cpu_share=config.swap_cpu_share, drain_s=config.version_drain_s,
    )
    partitions = PartitionManager(
        config.node_id, store, reader, stop=stop, read_maps=_read_maps(maps), wake=reconciler.wake,
        load_rate_bytes_s=config.load_rate_bytes_s, drain_s=config.partition_drain_s, verify=config.verify_checksums,
    )
    meter = LoadMeter(store, interval_s=config.stats_interval_s)
    limits = LookupLimits.of(config)
    instance_id = new_instance_id()
    readiness = Readiness(("loaded",))
    telemetry = Telemetry(config.observability, role="shard", node=config.node_id)
    metrics = ShardMetrics(telemetry.registry, lambda: shard_reading(store, versions, view.version()), enabled=telemetry.metrics_on)
    versions.on_load_time = metrics.version_loaded
    observer = LookupObserver(config.node_id, metrics, telemetry.tracing.tracer)
    servicer = EmbeddingShardServicer(config.node_id, store, limits=limits, map_version=view.version, observer=observer)
    server = start_sync_server(
        config.host,
        config.port,
        threads=config.rpc_threads,
        max_message_bytes=config.max_message_bytes,
        max_receive_bytes=limits.max_request_bytes,  # a request over every cap never reaches Python
        add_servicers=[lambda s: add_to_server(servicer, s)],
        service_names=["shardrec.v1.EmbeddingShard"],
        instance_id=instance_id,
        security=security,
        options=keepalive_options(config.keepalive.time_s, config.keepalive.timeout_s, server=True),
    )
    server.follow(readiness)
    address = join_host_port(config.advertise_host or config.host, server.port)
    log.info("node %s (instance %s) listening on %s, loading %d partition(s) at version %d", config.node_id, instance_id, address,
             len(pids), version)
    print(f"LISTENING {config.node_id} {address}", flush=True)
    metrics_address = telemetry.serve_metrics()
    if metrics_address:
        print(f"METRICS {config.node_id} {metrics_address}", flush=True)
    t0 = time.monotonic()
    loaders = loaders_for(reader, version, pids)
    if config.verify_checksums:
        verify_all(loaders)
    weights = load_rows(loaders, Throttle(config.load_rate_bytes_s, stop))
    if weights is not None:
        store.install(version, weights)
        metrics.version_loaded(time.monotonic() - t0)
        log.info("node %s loaded in %.2fs", config.node_id, time.monotonic() - t0)
    if weights is None or stop.is_set():  # asked to stop while loading: never register
        server.stop(0)
        zk.stop()
        zk.close()
        telemetry.close()
        return 0
    readiness.set("loaded", True)

    def record() -> NodeRecord:
        return node_record(config, address, store, view.version(), versions, partitions, meter, instance_id)

    registration = NodeRegistration(zk, paths.node(config.node_id), record(), probe=holder_probe(NodeRecord.from_bytes, tls=tls))
    registration.register()
    log.info("node %s registered at %s", config.node_id, paths.node(config.node_id))
    print(f"READY {config.node_id} {address}", flush=True)

    versions.on_change = partitions.on_change = meter.on_change = lambda: registration.update(record())
    maps.watch_serving_version(versions.set_serving)
    maps.watch_frontends(lambda frontends: versions.set_frontend_versions(served_versions(frontends)))
    maps.watch_target_version(versions.set_target)
    maps.watch_active(partitions.set_active)
    maps.watch_target(partitions.set_target)
    steps = [versions.reconcile, partitions.reconcile, meter.tick]
    thread = threading.Thread(target=reconciler.run, args=(steps,), name="reconciler", daemon=True)
    thread.start()

    stop.wait()
    reconciler.wake()
    log.info("node %s stopping: deregister, NOT_SERVING, drain %.1fs", config.node_id, config.grace_s)
    registration.deregister()
    server.stop(config.grace_s)
    zk.stop()
    zk.close()
    telemetry.close()
    log.info("node %s stopped", config.node_id)
    return 0
