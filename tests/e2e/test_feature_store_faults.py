"""Feature store faults under load: Redis killed (kill -9) and restarted without persistence and
with an append-only file, Redis stalled (SIGSTOP) for 5 s, and a Sentinel failover of its
primary, each while a closed-loop client runs. Not one OK answer may be wrong (each is checked
against ``core.reference``); failures must be explicit (UNAVAILABLE naming the feature store)
and come back to correct answers without an operator. docs/failure-modes.md lists the
behaviour these tests hold; the measured numbers are printed (``-s``).

One shard (the faults are Redis's), one frontend over a plain Redis and, for the failover, one
over a primary, a replica and a sentinel; timed bounds are the targets times five.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._proto.shardrec.v1 import recommend_pb2
from services.control.features import load_features
from services.core.clients import make_redis
from services.core.rpc.server import LIVENESS
from tests.e2e.test_recommend import check_response, checkpoint, random_requests, reference, send_all, stats  # noqa: F401
from tests.e2e.test_replica_faults import CachedReference, answered, delta
from tests.support.closed_loop import ClosedLoop
from tests.support.cluster import start_cluster, start_frontend, zk_namespace
from tests.support.processes import ProcessFactory
from tests.support.servers import RedisServer, SentinelServer
from tests.support.waiting import wait_for

SPEC = {"default": {"sharding": "replicated", "replicas": "all"}}
PREFIX = "ff:"
DEADLINE_S = 2.0  # every client call's deadline
REDIS_TIMEOUT_MS = 200
MARGIN = 5  # timed bounds: the target times five
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Store:
    address: str  # the frontend's
    redis: RedisServer  # the plain Redis, or the primary
    replica: RedisServer | None = None
    sentinel: SentinelServer | None = None


@pytest.fixture(scope="module")
def shards(zk_server, tmp_path_factory, checkpoint):  # noqa: F811
    zk_server.ensure_running()
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-feature-faults"))
    with zk_namespace(zk_server.hosts, "ff-") as (zk, paths):
        try:
            start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, SPEC, 1)
            yield spawn, paths, zk_server.hosts
        finally:
            spawn.close()


def frontend(shards, url: str) -> str:
    spawn, paths, zk_hosts = shards
    return start_frontend(spawn, zk_hosts, paths.cluster, url, PREFIX, "--redis-timeout-ms", str(REDIS_TIMEOUT_MS))


@pytest.fixture(scope="module")
def plain(shards, tmp_path_factory, checkpoint):  # noqa: F811
    redis = RedisServer(tmp_path_factory.mktemp("redis-plain"))
    redis.start()
    try:
        load_features(checkpoint, redis.url, prefix=PREFIX, progress=False)
        yield Store(frontend(shards, redis.url), redis)
    finally:
        redis.close()


@pytest.fixture
def healthy(plain: Store) -> Store:
    """The plain store running and the frontend ready over it."""
    plain.redis.ensure_running()
    wait_for(lambda: health(plain.address) == SERVING, 30, "the frontend to be ready")
    return plain


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def more_ok(load: ClosedLoop, n: int, what: str, timeout_s: float = 30.0) -> None:
    """Wait for ``n`` more OK answers (failures meanwhile do not end the wait)."""
    target = answered(load) + n
    wait_for(lambda: answered(load) >= target, timeout_s, what)


def answered_after(load: ClosedLoop, t: float) -> float | None:
    """Seconds from ``t`` until the first OK answer to a request sent after ``t`` came back."""
    done = [r.start + r.latency_s for r in load.replies() if r.start >= t]
    return min(done) - t if done else None


def answers_again(load: ClosedLoop, t: float, timeout_s: float, what: str) -> float:
    """Wait for correct answers to requests sent after ``t``, then for 20 more; the seconds from
    ``t`` to the first of them."""
    wait_for(lambda: answered_after(load, t) is not None, timeout_s, what)
    seconds = answered_after(load, t)
    more_ok(load, 20, f"more of {what}")
    return seconds  # type: ignore[return-value]


def check_answers(load: ClosedLoop, requests, reference) -> None:  # noqa: F811
    """Every OK answer equals the reference and none is degraded."""
    oracle = CachedReference(reference)
    for r in load.replies():
        check_response(oracle, requests[r.index], r.response)
        assert not r.response.degraded, requests[r.index].request_id


def explicit_failures(load: ClosedLoop) -> dict[str, int]:
    """Every failure is UNAVAILABLE naming the feature store; how many there were, by code."""
    codes: dict[str, int] = {}
    for f in load.failures:
        code, details = f.error.code(), f.error.details() or ""
        assert code is grpc.StatusCode.UNAVAILABLE and "feature store" in details, (code, details)
        codes[code.name] = codes.get(code.name, 0) + 1
    return codes


def set_persistence(redis: RedisServer, on: bool) -> None:
    """Turn the append-only file on or off now (and for the next start); returns once Redis has
    written the whole data set to it."""
    client = make_redis(redis.url)
    try:
        client.config_set("appendonly", "yes" if on else "no")
        if on:

            def written() -> bool:
                p = client.info("persistence")
                return p["aof_enabled"] == 1 and not p["aof_rewrite_in_progress"] and not p["aof_rewrite_scheduled"]

            wait_for(written, 30, "Redis to write its append-only file")
    finally:
        client.close()
    redis.persistence = on


def kill_and_restart(store: Store, reference, seed: int):  # noqa: F811
    """kill -9 Redis under load, wait until the frontend fails explicitly and says NOT_SERVING
    (liveness unaffected), restart it on the same port and data, wait for correct answers.
    Returns the counters' delta, the seconds to correct answers after the restart, the failures."""
    requests = random_requests(40, seed=seed)
    with ClosedLoop(store.address, requests, timeout_s=DEADLINE_S) as load:
        more_ok(load, 20, "requests to flow")
        before = stats(store.address)
        store.redis.kill()
        wait_for(lambda: len(load.failures) >= 5, 10, "requests to fail while Redis is down")
        wait_for(lambda: health(store.address) == NOT_SERVING, 10, "the frontend to say NOT_SERVING")
        assert health(store.address, LIVENESS) == SERVING and health(store.address, "shardrec.feature_store") == NOT_SERVING
        store.redis.start()
        restarted = time.monotonic()
        healed_s = answers_again(load, restarted, 30 * MARGIN, "correct answers after the restart")
        wait_for(lambda: health(store.address) == SERVING, 10, "the frontend to be ready again")
        after = stats(store.address)
    check_answers(load, requests, reference)
    return delta(before, after), healed_s, explicit_failures(load), answered(load)


def test_redis_killed_and_restarted_empty_is_reloaded_without_an_operator(healthy, reference):  # noqa: F811
    set_persistence(healthy.redis, False)
    d, healed_s, failed, ok = kill_and_restart(healthy, reference, seed=31)
    print(f"kill -9 + restart, no persistence: {ok} OK, failures {failed}, correct answers {healed_s:.2f} s after the restart; "
          f"lost {d['feature_store_lost_total']}, reloads {d['feature_syncs']}, breaker opens {d['redis_breaker_opens']}")
    assert d["feature_store_lost_total"] >= 1 and d["feature_syncs"] == 1, d
    assert d["feature_store_generation"] >= 1 and d["redis_breaker_opens"] >= 1, d
    assert healed_s < 30 * MARGIN


def test_redis_killed_and_restarted_with_aof_loses_nothing(healthy, reference):  # noqa: F811
    set_persistence(healthy.redis, True)
    try:
        d, healed_s, failed, ok = kill_and_restart(healthy, reference, seed=32)
    finally:
        set_persistence(healthy.redis, False)
    print(f"kill -9 + restart, AOF everysec: {ok} OK, failures {failed}, correct answers {healed_s:.2f} s after the restart; "
          f"lost {d['feature_store_lost_total']}, reloads {d['feature_syncs']}")
    assert d["feature_store_lost_total"] == 0 and d["feature_syncs"] == 0 and d["feature_store_generation"] == 0, d
    assert healed_s < 30 * MARGIN


def test_redis_stalled_fails_requests_fast_and_recovers_after_sigcont(healthy, reference):  # noqa: F811
    requests = random_requests(40, seed=33)
    with ClosedLoop(healthy.address, requests, timeout_s=DEADLINE_S) as load:
        more_ok(load, 20, "requests to flow")
        before = stats(healthy.address)
        healthy.redis.pause()
        paused = time.monotonic()
        try:
            wait_for(lambda: health(healthy.address) == NOT_SERVING, 5, "the frontend to say NOT_SERVING")
            wait_for(lambda: time.monotonic() - paused >= 5.0, 6, "the stall to last 5 s")
        finally:
            healthy.redis.resume()
        resumed = time.monotonic()
        back_s = answers_again(load, resumed, 2 * MARGIN, "correct answers after SIGCONT")
        after = stats(healthy.address)
    check_answers(load, requests, reference)
    failed = explicit_failures(load)
    slowest = max((f.latency_s for f in load.failures), default=0.0)
    d = delta(before, after)
    print(f"SIGSTOP 5 s: {answered(load)} OK, failures {failed} (slowest {slowest * 1e3:.0f} ms, deadline {DEADLINE_S * 1e3:.0f} ms), "
          f"correct answers {back_s:.2f} s after SIGCONT; timeouts {d['redis_timeouts']}, refused at once {d['redis_fast_failures']}, "
          f"breaker opens {d['redis_breaker_opens']}")
    assert slowest <= DEADLINE_S + 0.050 * MARGIN, slowest  # every request: correct, or failed explicitly in time
    assert d["redis_timeouts"] >= 3 and d["redis_fast_failures"] >= 1 and d["feature_store_lost_total"] == 0, d
    assert back_s < 2.0 * MARGIN


@pytest.fixture(scope="module")
def replicated(shards, tmp_path_factory, checkpoint):  # noqa: F811
    """A primary, its replica and a sentinel watching them (failover after 500 ms down), the
    features loaded through the sentinel, and a frontend over the ``redis+sentinel://`` URL."""
    root = tmp_path_factory.mktemp("redis-sentinel")
    primary = RedisServer(root / "primary")
    primary.start()
    replica = RedisServer(root / "replica", replica_of=primary.port)
    sentinel = None
    try:
        replica.start()
        sentinel = SentinelServer(root / "sentinel", primary.port)
        sentinel.start()
        in_sync = make_redis(replica.url)
        try:
            wait_for(lambda: sentinel.replicas_known() == 1 and in_sync.info("replication")["master_link_status"] == "up",
                     30, "the replica to sync and the sentinel to know it")  # fmt: skip
            marker = load_features(checkpoint, sentinel.url, prefix=PREFIX, progress=False)["keys"].marker
            wait_for(lambda: in_sync.get(marker) is not None, 30, "the features to reach the replica")
        finally:
            in_sync.close()
        yield Store(frontend(shards, sentinel.url), primary, replica, sentinel)
    finally:
        for server in (sentinel, replica, primary):
            if server is not None:
                server.close()


def test_sentinel_failover_under_load_loses_no_answer(replicated, reference):  # noqa: F811
    store = replicated
    requests = random_requests(40, seed=34)
    with ClosedLoop(store.address, requests, timeout_s=DEADLINE_S) as load:
        more_ok(load, 20, "requests to flow")
        before = stats(store.address)
        store.redis.kill()
        killed = time.monotonic()
        wait_for(lambda: store.sentinel.primary_port() == store.replica.port, 30, "the sentinel to promote the replica")
        promoted = time.monotonic()
        serving_s = answers_again(load, promoted, 5 * MARGIN, "correct answers after the promotion")
        after = stats(store.address)
    check_answers(load, requests, reference)
    failed = explicit_failures(load)
    recovered = promoted + serving_s
    late = [f for f in load.failures if f.start > recovered + 1.0]
    d = delta(before, after)
    print(f"Sentinel failover: {answered(load)} OK, {len(load.failures)} failed {failed} (all sent within "
          f"{max((f.start - killed for f in load.failures), default=0):.2f} s of the kill); promoted "
          f"{promoted - killed:.2f} s after the kill, correct answers {serving_s:.2f} s after the promotion; "
          f"breaker opens {d['redis_breaker_opens']}, lost {d['feature_store_lost_total']}")
    assert not late, [(f.start - recovered, f.error.details()) for f in late]  # failures only inside the failover window
    assert d["feature_store_lost_total"] == 0 and d["feature_syncs"] == 0, d
    assert serving_s < 5.0 * MARGIN


def test_opted_in_defaults_are_flagged_degraded_and_keep_the_frontend_ready(shards, plain, checkpoint, reference):  # noqa: F811
    """``--on-feature-loss defaults``: a lost store gives answers computed from feature defaults,
    each flagged degraded with its reason; readiness stays SERVING, the store's own health says
    NOT_SERVING. (Its own prefix on the module's Redis, no reload: it stays lost.)"""
    plain.redis.ensure_running()
    spawn, paths, zk_hosts = shards
    keys = load_features(checkpoint, plain.redis.url, prefix="fd:", progress=False)["keys"]
    address = start_frontend(spawn, zk_hosts, paths.cluster, plain.redis.url, "fd:", "--on-feature-loss", "defaults",
                             "--feature-sync", "off")  # fmt: skip
    requests = random_requests(8, seed=35)
    for req, resp in zip(requests, asyncio.run(send_all(address, requests, 4)), strict=True):
        check_response(reference, req, resp)
        assert not resp.degraded
    client = make_redis(plain.redis.url)
    try:
        client.delete(keys.marker)
    finally:
        client.close()
    before = stats(address)
    responses = asyncio.run(send_all(address, requests, 4))
    after = stats(address)
    assert all(r.degraded and list(r.degraded_reasons) == [recommend_pb2.DEGRADED_FEATURE_DEFAULTS] for r in responses)
    d = delta(before, after)
    assert d["degraded_feature_defaults"] == len(requests) and d["feature_store_lost_total"] == 1 and d["feature_syncs"] == 0, d
    assert health(address) == SERVING and health(address, "shardrec.feature_store") == NOT_SERVING
