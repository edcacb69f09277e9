"""Frontend process: the Recommend API over a shard cluster (or, ``--lookup inproc`` / ``--inproc``,
the monolith; ``--lookup redis-kv`` / ``torchrec``, the other comparison baselines, which take
the model from ``--checkpoint`` like the monolith and share everything but the lookup step).

Start: ZooKeeper view (shard map, live nodes, serving version, model) -> wait until every
partition has a live replica -> load the dense model of the serving version -> read the feature
store's marker -> gRPC server live, ready while every readiness condition holds (``loaded``, the
view's ``cluster_view``, the feature store's ``feature_store``: docs/health.md) -> register the
ephemeral frontend znode. SIGTERM: deregister -> NOT_SERVING (lame duck) -> finish in-flight
calls within the grace period -> exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

from services._proto.shardrec.v1 import recommend_pb2_grpc
from services.core.checkpoint.reader import CheckpointReader
from services.core.config import FrontendConfig
from services.core.discovery.zk_paths import ZkPaths
from services.core.auth import access_policy
from services.core.errors import ShardrecError
from services.core.hostport import join_host_port
from services.core.metrics import FrontendMetrics
from services.core.rpc.readiness import Readiness
from services.core.rpc.server import Security, keepalive_options, new_instance_id, start_aio_server, tune_allocator
from services.core.telemetry import Telemetry
from services.core.tls import TlsMaterial
from services.frontend.admission import Admission, CallerLimitsConfig, ServiceEstimate
from services.frontend.batch import Pending, Recommendation
from services.frontend.batching import MicroBatcher
from services.frontend.feature_store import FeatureStoreConfig, FeatureStoreState
from services.frontend.feature_sync import FeatureSync, ReloadSource
from services.frontend.features import FeaturePrep
from services.frontend.lookup import LookupClient
from services.frontend.lookup.inproc import InprocLookupClient
from services.frontend.observe import Observer, frontend_reading
from services.frontend.pipeline import RecommendPipeline
from services.frontend.readiness import CLUSTER_VIEW, FEATURE_STORE, LOADED, ViewReadiness, view_grace_s
from services.frontend.recommender import DegradePolicy, Recommender
from services.frontend.servicer import FrontendAdminServicer, RecommenderServicer, add_recommender_to_server
from services.frontend.validate import FeatureLimits
from services.ranker.scorer import build_scorer, set_threads

log = logging.getLogger("shardrec.frontend")
SERVICES = ("shardrec.v1.Recommender", "shardrec.v1.FrontendAdmin")
# Health names (docs/health.md): FrontendAdmin answers while the process runs (liveness); the
# feature store's own state has a name of its own, for monitoring.
LIVE = ("shardrec.v1.FrontendAdmin",)
FEATURE_STORE_HEALTH = "shardrec.feature_store"


async def _connect_cluster(config: FrontendConfig, loop, observer: Observer, tls):  # noqa: ANN001
    """ZooKeeper client, the cluster view (ready: map, version, a live replica everywhere), and
    the gRPC lookup client."""
    from services.core.clients import make_kazoo
    from services.frontend.lookup.grpc.calls import ChannelPool
    from services.frontend.lookup.grpc.client import GrpcLookupClient
    from services.frontend.lookup.grpc.replicas import ReplicaPolicy
    from services.frontend.view import ClusterView

    zk = await loop.run_in_executor(None, make_kazoo, config.zk)
    paths = ZkPaths(config.zk.cluster)
    view = ClusterView(zk, paths, loop)
    await loop.run_in_executor(None, view.start_blocking)
    await view.wait_for(
        lambda v: v.shard_map is not None and v.serving_version > 0 and not v.missing_partitions(),
        config.ready_timeout_s,
        "a shard map, a serving version and a live replica of every partition",
    )
    reader = CheckpointReader(view.model.uri)
    spec = reader.manifest(view.serving_version).model
    policy = ReplicaPolicy(
        eject_s=config.eject_s,
        eject_max_s=config.eject_max_s,
        hedge_delay_s=config.hedge_delay_s,
        hedge_min_delay_s=config.hedge_min_delay_s,
        hedge_budget=config.hedge_budget,
    )
    from services.core.auth import cluster_token_sender

    keepalive = keepalive_options(config.keepalive.time_s, config.keepalive.timeout_s, server=False)
    channels = ChannelPool(config.max_message_bytes, tls=tls, token=cluster_token_sender(config.auth), options=keepalive)
    lookup = GrpcLookupClient(view, channels, dim=spec.dense_arch.embedding_dim, policy=policy, observer=observer,
                              float16=config.pooled_dtype == "float16")  # fmt: skip
    return zk, paths, view, reader, lookup


async def _baseline_lookup(config: FrontendConfig, reader: CheckpointReader, version: int):
    """The redis-kv or torchrec lookup client over ``version`` of the checkpoint, and the Redis
    client it uses (None for torchrec; the caller closes it after the lookup client)."""
    spec = reader.manifest(version).model
    if config.lookup == "redis-kv":
        from services.core.clients import make_async_redis
        from services.frontend.lookup.baselines.redis_kv import RedisKvLookupClient

        kv_redis = make_async_redis(config.kv_redis_url or config.redis_url, auth=config.redis_auth)
        lookup = RedisKvLookupClient(kv_redis, config.kv_prefix, spec)
        try:
            await lookup.verify_loaded(version)
        except BaseException:
            await lookup.close()
            await kv_redis.aclose()
            raise
        return lookup, kv_redis
    if config.lookup == "torchrec":
        from services.frontend.lookup.baselines.torchrec import TorchrecLookupClient

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, TorchrecLookupClient, reader, version), None
    from services.core.errors import ConfigError

    raise ConfigError(f"unknown lookup {config.lookup!r} (choose shards, inproc, redis-kv or torchrec)")


def _with_cache(config: FrontendConfig, lookup: LookupClient, spec, version: int, view):
    """``lookup`` behind an embedding cache of ``config.cache_bytes`` (docs/cache.md), when set
    and the lookup is remote; and the cache (None: none)."""
    if config.cache_bytes <= 0:
        return lookup, None
    if config.inproc_checkpoint or config.lookup in ("inproc", "torchrec"):
        log.info("--cache-bytes ignored: the %s lookup holds every table in this process", config.lookup)
        return lookup, None
    from services.frontend.lookup.cache.client import CachedLookupClient
    from services.frontend.lookup.cache.store import RowCache

    cache = RowCache(spec, config.cache_bytes, version)
    log.info("embedding cache: %d rows, %.1f MiB", cache.capacity, cache.nbytes / 2**20)
    map_version = (lambda: view.shard_map.version if view.shard_map is not None else 0) if view is not None else (lambda: 0)
    return CachedLookupClient(lookup, cache, map_version=map_version), cache


async def _follow_versions(view, pipeline: RecommendPipeline, reader: CheckpointReader, registration, loop, cache) -> None:
    """Switch to each target version once it is servable (the embedding cache, if any, with
    it); report it in this frontend's znode and as the cluster's serving version
    (``services.frontend.versions``)."""
    from services.core.discovery.cluster_store import ClusterStore
    from services.frontend.versions import VersionFollower

    cluster = ClusterStore(view.zk, view.paths)

    async def on_switch(version: int) -> None:
        await loop.run_in_executor(None, registration.update, dataclasses.replace(registration.record, version=version))
        await loop.run_in_executor(None, cluster.write_serving_version, version)

    await VersionFollower(view, pipeline, reader, on_switch, cache=cache).run()


def _publish_health(server, readiness: Readiness, defaults_on_loss: bool):
    """Health from the feature store's state: the readiness condition ``feature_store`` while it
    is OK (or while the operator chose defaults over failing), and its own name."""

    async def publish(state: FeatureStoreState) -> None:
        ok = state is FeatureStoreState.OK
        await server.set_health((FEATURE_STORE_HEALTH,), ok)
        readiness.set(FEATURE_STORE, ok or defaults_on_loss, f"feature store {state.name.lower()}")
        (log.info if ok else log.warning)("feature store %s: %s", state.name, "ready" if ok or defaults_on_loss else "NOT_SERVING")

    return publish


def _admission(config: FrontendConfig, estimate: ServiceEstimate) -> Admission:
    """Admission control from the config (docs/overload.md); the queue bounds the limit."""
    from services.frontend.admission import AdmissionPolicy, CallerLimits, CallerRate, load_caller_limits

    default = CallerRate(config.caller_rate_rps, config.caller_burst)
    callers = load_caller_limits(config.caller_limits_file, default) if config.caller_limits_file else CallerLimitsConfig(default=default)
    policy = AdmissionPolicy(
        enabled=config.admission,
        latency_target_s=config.latency_target_s,
        initial_limit=min(64, config.max_queue),
        min_limit=min(4, config.max_queue),
        max_limit=config.max_queue,
    )
    return Admission(policy, CallerLimits(callers), estimate)


def _print(line: str) -> None:
    print(line, flush=True)


async def serve(config: FrontendConfig, announce: Callable[[str], None] = _print) -> int:
    """Serve until SIGTERM (or SIGINT); ``announce`` gets the status lines (``LISTENING``,
    ``HTTP``, ``METRICS``, ``READY``: printed, or sent to the parent of a worker)."""
    set_threads(config.torch_threads)
    tune_allocator()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tls = TlsMaterial(config.tls) if config.tls.enabled else None
    access = access_policy(config.auth, mtls=False)  # files read now: a bad one fails the start
    telemetry = Telemetry(config.observability, role="frontend", node=config.frontend_id)
    metrics = FrontendMetrics(telemetry.registry, enabled=telemetry.metrics_on)
    observer = Observer(metrics, telemetry.tracing.tracer)
    zk = view = paths = kv_redis = None
    lookup: LookupClient
    if config.inproc_checkpoint or config.lookup == "inproc":
        reader = CheckpointReader(config.inproc_checkpoint or config.checkpoint)
        version = reader.latest_version()
        lookup = InprocLookupClient(reader, version)
    elif config.lookup != "shards":
        reader = CheckpointReader(config.checkpoint)
        version = reader.latest_version()
        lookup, kv_redis = await _baseline_lookup(config, reader, version)
    else:
        zk, paths, view, reader, lookup = await _connect_cluster(config, loop, observer, tls)
        version = view.serving_version
    spec = reader.manifest(version).model
    lookup, cache = _with_cache(config, lookup, spec, version, view)
    scorer = await loop.run_in_executor(None, lambda: build_scorer(spec.dense_arch, reader.dense_state(version), config.device))
    redis = None
    if config.redis_url:
        from services.core.clients import make_async_redis

        redis = make_async_redis(config.redis_url, timeout_s=config.redis_timeout_s, retries=0, auth=config.redis_auth)
    limits = FeatureLimits(max_candidates=config.max_candidates, max_abs_dense=config.max_abs_dense, max_abs_weight=config.max_abs_weight)
    defaults_on_loss = config.on_feature_loss == "defaults"
    store_config = FeatureStoreConfig(config.redis_timeout_s, defaults_on_loss, reloads=config.feature_sync and redis is not None)
    prep = FeaturePrep(spec, redis, config.redis_prefix, limits, store_config)
    if redis is not None:
        try:
            await prep.store.refresh()
        except ShardrecError as e:
            log.warning("feature store at start: %s", e)
    pipeline = RecommendPipeline(spec, prep, lookup, scorer, version, observer)
    estimate = ServiceEstimate(in_flight_batches=config.max_in_flight_batches)

    async def process(items: list[Pending]) -> list:
        """The pipeline, timed: each batch that answered someone tells admission its cost."""
        t0 = time.monotonic()
        results = await pipeline.process(items)
        served = sum(isinstance(r, Recommendation) for r in results)
        if served:
            now = time.monotonic()
            estimate.observe_batch(now - t0, served, now)
        return results

    batcher = MicroBatcher(
        process,
        max_batch=config.max_batch,
        max_wait_s=config.max_wait_s,
        max_queue=config.max_queue,
        max_in_flight=config.max_in_flight_batches,
        adaptive_wait_s=config.adaptive_wait_s,
        deadline_of=lambda p: p.deadline,
    )
    batcher.start()
    recommender = Recommender(
        prep.validator, pipeline, batcher, _admission(config, estimate),
        default_timeout_s=config.default_timeout_s, degrade=DegradePolicy(max_candidates=config.degrade_max_candidates),
        observer=observer,
    )  # fmt: skip
    sync: FeatureSync | None = None
    metrics.read = lambda: frontend_reading(recommender, lookup, view, sync)
    servicer = RecommenderServicer(recommender)
    admin = FrontendAdminServicer(telemetry.registry)
    instance_id = new_instance_id()
    readiness = Readiness((LOADED, *((CLUSTER_VIEW,) if view is not None else ()), *((FEATURE_STORE,) if redis is not None else ())))
    server = await start_aio_server(
        config.host,
        config.port,
        max_message_bytes=config.max_message_bytes,
        max_receive_bytes=config.max_request_bytes,
        security=Security(access, tls),
        options=keepalive_options(config.keepalive.time_s, config.keepalive.timeout_s, server=True),
        add_servicers=[
            lambda s: add_recommender_to_server(servicer, s),
            lambda s: recommend_pb2_grpc.add_FrontendAdminServicer_to_server(admin, s),
        ],
        service_names=SERVICES,
        live_names=LIVE,
        instance_id=instance_id,
        reuse_port=config.workers > 1,
    )
    server.follow(readiness)
    address = join_host_port(config.advertise_host or config.host, server.port)
    announce(f"LISTENING frontend {address}")
    rest = None
    if config.http_port is not None:
        from services.frontend.http import RestEndpoint

        ready = lambda: server.is_serving(SERVICES[0])  # noqa: E731 - /readyz is the Recommender's health
        rest = RestEndpoint(recommender, ready, max_request_bytes=config.max_request_bytes, access=access, tls=tls)
        http_port = await rest.start(config.host, config.http_port, grace_s=config.grace_s, reuse_port=config.workers > 1)
        announce(f"HTTP frontend {join_host_port(config.advertise_host or config.host, http_port)}")
    metrics_address = telemetry.serve_metrics()
    if metrics_address:
        announce(f"METRICS frontend {metrics_address}")
    tasks = []
    if view is not None:
        view_readiness = ViewReadiness(view, readiness, lambda: pipeline.version, view_grace_s(config.zk.session_timeout_s))
        view_readiness.check()
        tasks.append(asyncio.create_task(view_readiness.run()))
    if redis is not None:
        features = config.features_root or reader.store.uri
        source = (
            ReloadSource(reader.store.uri, version, features, config.redis_url, config.redis_prefix, config.redis_auth)
            if config.feature_sync
            else None
        )
        sync = FeatureSync(prep.store, _publish_health(server, readiness, defaults_on_loss), source, check_s=config.feature_check_s)
        await sync.publish_state()
        tasks.append(asyncio.create_task(sync.run()))
    readiness.set(LOADED, True)
    registration = None
    if zk is not None:
        from services.core.discovery.records import FrontendRecord
        from services.core.discovery.registry import NodeRegistration
        from services.core.rpc.probe import holder_probe

        record = FrontendRecord(frontend_id=config.frontend_id, address=address, version=version, pid=os.getpid(), instance_id=instance_id)
        registration = NodeRegistration(zk, paths.frontend(config.frontend_id), record, probe=holder_probe(FrontendRecord.from_bytes, tls=tls))
        await loop.run_in_executor(None, registration.register)
    if view is not None:
        tasks.append(asyncio.create_task(_follow_versions(view, pipeline, reader, registration, loop, cache)))
    log.info("frontend %s (instance %s) serving model %s version %d on %s (device %s, %s lookups)", config.frontend_id,
             instance_id, spec.name, version, address, scorer.device, "inproc" if config.inproc_checkpoint else config.lookup)
    announce(f"READY frontend {address}")

    await stop.wait()
    for task in tasks:
        task.cancel()
    if sync is not None:
        await sync.close()
    log.info("frontend stopping: deregister, NOT_SERVING for %.1fs, then drain %.1fs", config.lame_duck_s, config.grace_s)
    if registration is not None:
        await loop.run_in_executor(None, registration.deregister)
    # Lame duck: health (and /readyz) says NOT_SERVING while calls are still taken, so balancers
    # and callers' health checks move away before new calls are refused (a call that arrives as
    # the server stops would be cancelled, not refused, and not retried elsewhere).
    await server.stop_serving()
    await asyncio.sleep(config.lame_duck_s)
    if rest is not None:
        await rest.stop()
    await server.stop(config.grace_s)
    await batcher.stop()
    await lookup.close()
    if kv_redis is not None:
        await kv_redis.aclose()
    scorer.close()  # the first scorer owns the executor every later version shares
    if redis is not None:
        await redis.aclose()
    if zk is not None:
        await loop.run_in_executor(None, zk.stop)
        zk.close()
    telemetry.close()
    return 0


def run(config: FrontendConfig) -> int:
    """Serve in this process (``--workers`` > 1: ``services.frontend.workers`` runs one per worker)."""
    return asyncio.run(serve(config))
