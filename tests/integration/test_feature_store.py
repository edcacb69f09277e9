"""The feature store's generations against a real Redis: loads switch the marker last and delete
what they replaced, a lost store is told apart from an unknown entity, the self-healing reload
is idempotent and cleans what a dead load left, a full Redis refuses a load without touching
the live generation, and a stalled Redis fails reads within the ceiling, opens the breaker and
is probed back (``services.core.feature_store``, ``services.frontend.feature_store``)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from services.control.features import load_features
from services.core import synth
from services.core.clients import make_async_redis, make_redis
from services.core.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from services.core.feature_store import LoadBusyError, StoreKeys, load_generation, read_marker
from services.core.features import FeatureLayout
from services.core.types import FeatureSide
from services.frontend.feature_store import FeatureStoreClient, FeatureStoreConfig, FeatureStoreState
from tests.support.servers import RedisServer
from tests.support.waiting import until, wait_for

SPEC = synth.model_spec("small")
USER, ITEM = FeatureLayout(SPEC, FeatureSide.USER), FeatureLayout(SPEC, FeatureSide.ITEM)
USERS, ITEMS = np.array([0, 5, 1999, 123_456_789]), np.array([0, 17, 4999])  # user 123456789 has no record


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint) -> str:
    return small_checkpoint


@pytest.fixture(scope="module")
def sides(small_checkpoint):
    return [(layout, synth.load_feature_rows(small_checkpoint, layout.side)) for layout in (USER, ITEM)]


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own (it is paused or filled up)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.close()


def keys_of(prefix: str) -> StoreKeys:
    return StoreKeys.of(prefix, USER, ITEM)


def generation_keys(client, keys: StoreKeys, generation: int) -> list[bytes]:
    return list(client.scan_iter(match=keys.generation_pattern(generation), count=1000))


def reading(url: str, prefix: str, body, **config):
    """Run ``await body(store)`` on a fresh loop with a FeatureStoreClient over ``url``."""

    async def main():
        client = make_async_redis(url, timeout_s=config.get("timeout_s", 0.2), retries=0)
        try:
            return await body(FeatureStoreClient(client, keys_of(prefix), USER, ITEM, FeatureStoreConfig(**config)))
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_a_reload_switches_generations_and_deletes_the_old_one(checkpoint, redis_server, redis_client, redis_prefix):
    keys = keys_of(redis_prefix)
    first = load_features(checkpoint, redis_server.url, prefix=redis_prefix, batch=700, progress=False)["load"]
    assert first.marker.generation >= 1 and first.replaced is None
    assert (first.marker.users, first.marker.items) == (2000, 5000)
    assert read_marker(redis_client, keys) == first.marker

    async def body(store: FeatureStoreClient):
        before = await store.read(USERS, ITEMS)
        second = load_features(checkpoint, redis_server.url, prefix=redis_prefix, batch=700, progress=False)["load"]
        after = await store.read(USERS, ITEMS)  # the marker says generation 2: read again, once
        return before, second, after, store

    before, second, after, store = reading(redis_server.url, redis_prefix, body)
    assert second.replaced == first.marker and second.marker.generation > first.marker.generation
    assert second.deleted_keys == 7000 and generation_keys(redis_client, keys, first.marker.generation) == []
    assert len(generation_keys(redis_client, keys, second.marker.generation)) == 7000
    assert redis_client.smembers(keys.generations) == {str(second.marker.generation).encode()}
    assert redis_client.get(keys.lock) is None
    assert after.users == before.users and after.items == before.items  # the same rows, new keys
    assert before.users[3] is None and all(b is not None for b in before.users[:3] + before.items)
    assert store.marker == second.marker and store.switches == 1
    assert store.round_trips == 3 and store.marker_reads == 1  # the start, one batch, one batch read twice
    assert store.state is FeatureStoreState.OK and store.lost_total == 0


def test_a_lost_store_is_told_apart_from_an_unknown_entity(checkpoint, redis_server, redis_client, redis_prefix):
    keys = keys_of(redis_prefix)
    load_features(checkpoint, redis_server.url, prefix=redis_prefix, progress=False)

    async def body(store: FeatureStoreClient):
        healthy = await store.read(np.array([123_456_789]), np.array([1]))  # unknown user: no record, no error
        redis_client.delete(keys.marker)  # what a restart without persistence looks like to a reader
        with pytest.raises(UnavailableError, match="feature store lost: no marker") as e:
            await store.read(USERS, ITEMS)
        return healthy, e.value, store

    healthy, error, store = reading(redis_server.url, redis_prefix, body)
    assert healthy.users == [None] and healthy.items[0] is not None and not healthy.defaults
    assert error.retry_after_s == 1.0 and "'shardrec features load'" in str(error)
    assert store.state is FeatureStoreState.LOST and store.lost_total == 1

    async def defaults(store: FeatureStoreClient):
        got = await store.read(USERS, ITEMS)
        return got, store

    got, store = reading(redis_server.url, redis_prefix, defaults, defaults_on_loss=True)
    assert got.defaults and got.users == [None] * 4 and got.items == [None] * 3
    assert store.defaults_served == 1 and store.state is FeatureStoreState.LOST


def test_the_self_healing_reload_is_idempotent_and_cleans_what_a_dead_load_left(sides, redis_server, redis_client, redis_prefix):
    keys = keys_of(redis_prefix)
    live = load_generation(redis_client, keys, sides)
    assert load_generation(redis_client, keys, sides, only_if_missing=True) is None  # the marker is there
    # A load that died after writing a record of generation 999, then the marker lost.
    redis_client.sadd(keys.generations, 999)
    redis_client.set(USER.key(keys.generation_prefix(999), 1), b"x")
    redis_client.delete(keys.marker)
    healed = load_generation(redis_client, keys, sides, only_if_missing=True)
    assert healed is not None and healed.replaced is None and healed.marker.generation > live.marker.generation
    assert healed.deleted_keys == 7000 + 1  # what the lost marker named and what the dead load wrote
    assert generation_keys(redis_client, keys, 999) == [] and generation_keys(redis_client, keys, live.marker.generation) == []
    assert read_marker(redis_client, keys) == healed.marker
    assert redis_client.smembers(keys.generations) == {str(healed.marker.generation).encode()}
    assert load_generation(redis_client, keys, sides, only_if_missing=True) is None


def test_a_held_lock_refuses_a_second_load(sides, redis_client, redis_prefix):
    keys = keys_of(redis_prefix)
    redis_client.set(keys.lock, b"someone-else", px=60_000)
    with pytest.raises(LoadBusyError, match="holds its lock"):
        load_generation(redis_client, keys, sides)
    assert redis_client.get(keys.marker) is None and redis_client.get(keys.lock) == b"someone-else"
    assert list(redis_client.scan_iter(match=redis_prefix + "g*")) == []


def test_a_full_store_refuses_a_load_and_keeps_the_live_generation(sides, own_redis):
    client = make_redis(own_redis.url)
    try:
        keys = keys_of("")
        live = load_generation(client, keys, sides)
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + 256 * 1024)  # room for part of a second generation
        with pytest.raises(ResourceExhaustedError, match="out of memory.*room for two generations"):
            load_generation(client, keys, sides)
        client.config_set("maxmemory", 0)
        assert read_marker(client, keys) == live.marker
        assert len(generation_keys(client, keys, live.marker.generation)) == 7000
        assert client.dbsize() == 7000 + 3  # the live records, marker, counter, generations: nothing half-written
        assert client.smembers(keys.generations) == {str(live.marker.generation).encode()}
    finally:
        client.close()


def test_a_stalled_redis_fails_reads_fast_opens_the_breaker_and_is_probed_back(sides, own_redis):
    client = make_redis(own_redis.url)
    try:
        load_generation(client, keys_of(""), sides)
    finally:
        client.close()

    async def body(store: FeatureStoreClient):
        await store.read(USERS, ITEMS)
        own_redis.pause()
        try:
            with pytest.raises(DeadlineExceededError):  # a batch's short deadline: not Redis's fault
                await store.read(USERS, ITEMS, deadline=time.monotonic() + 0.02)
            assert store.breaker.failures == 0
            with pytest.raises(DeadlineExceededError):  # cut short, but over half the ceiling: Redis's fault too
                await store.read(USERS, ITEMS, deadline=time.monotonic() + 0.07)
            assert store.breaker.failures == 1
            waits = []
            for _ in range(2):  # failures_to_open 3
                t0 = time.monotonic()
                with pytest.raises(UnavailableError, match=r"feature store \(Redis\) unavailable: no answer within 100 ms"):
                    await store.read(USERS, ITEMS)
                waits.append(time.monotonic() - t0)
            assert store.state is FeatureStoreState.UNREACHABLE
            t0 = time.monotonic()
            with pytest.raises(UnavailableError, match="not tried again for") as e:
                await store.read(USERS, ITEMS)
            refused_s = time.monotonic() - t0
        finally:
            own_redis.resume()
        resumed = time.monotonic()
        while True:  # the breaker lets a probe through, which finds Redis back
            try:
                await store.read(USERS, ITEMS)
                break
            except UnavailableError:
                assert time.monotonic() - resumed < 5.0, "not probed back within 5 s"
                await asyncio.sleep(0.01)
        return waits, refused_s, e.value, time.monotonic() - resumed, store

    waits, refused_s, error, back_s, store = reading(own_redis.url, "", body, timeout_s=0.1)
    print(f"stalled reads failed after {[round(w * 1e3) for w in waits]} ms; refused in {refused_s * 1e3:.1f} ms; back {back_s:.2f} s after SIGCONT")
    assert all(0.09 <= w < 0.5 for w in waits), waits  # 5x the 100 ms ceiling
    assert refused_s < 0.05 and 0 < error.retry_after_s <= 1.0
    assert store.state is FeatureStoreState.OK and store.breaker.times_opened >= 1 and store.timeouts >= 3


def test_sentinel_urls_reach_the_primary(own_redis, tmp_path):
    from tests.support.servers import SentinelServer

    sentinel = SentinelServer(tmp_path / "sentinel", own_redis.port)
    sentinel.start()
    try:
        wait_for(lambda: sentinel.primary_port() == own_redis.port, 10, "the sentinel to name the primary")
        client = make_redis(sentinel.url, timeout_s=2.0)
        try:
            client.set(b"k", b"v")
        finally:
            client.close()

        async def main():
            aclient = make_async_redis(sentinel.url, timeout_s=2.0, retries=0)
            try:
                return await aclient.get(b"k")
            finally:
                await aclient.aclose()

        assert asyncio.run(main()) == b"v"
    finally:
        sentinel.close()


def test_racing_frontends_reload_a_lost_store_once_and_publish_readiness(checkpoint, redis_server, redis_client, redis_prefix):
    """Two frontends' FeatureSync (no traffic: the idle marker check notices the loss): one load
    between them, in a spawned process, and each publishes OK -> LOST -> OK."""
    from services.core.checkpoint.reader import CheckpointReader
    from services.frontend.feature_sync import FeatureSync, ReloadSource

    keys = keys_of(redis_prefix)
    load_features(checkpoint, redis_server.url, prefix=redis_prefix, progress=False)
    source = ReloadSource(checkpoint, CheckpointReader(checkpoint).latest_version(), checkpoint, redis_server.url, redis_prefix)

    async def main():
        clients = [make_async_redis(redis_server.url, timeout_s=0.5, retries=0) for _ in range(2)]
        stores = [FeatureStoreClient(c, keys, USER, ITEM, FeatureStoreConfig(reloads=True)) for c in clients]
        published: list[list[FeatureStoreState]] = [[], []]

        def publisher(i):
            async def publish(state):
                published[i].append(state)

            return publish

        syncs = [FeatureSync(store, publisher(i), source, check_s=0.05) for i, store in enumerate(stores)]
        tasks = [asyncio.create_task(s.run()) for s in syncs]
        try:
            await until(lambda: all(p == [FeatureStoreState.OK] for p in published), 10, "every frontend to see the store OK")
            redis_client.delete(keys.marker)
            done = [FeatureStoreState.OK, FeatureStoreState.LOST, FeatureStoreState.OK]
            await until(lambda: all(p == done for p in published), 60, "every frontend to see the reload done")
        finally:
            for t in tasks:
                t.cancel()
            for s in syncs:
                await s.close()
            for c in clients:
                await c.aclose()
        return syncs, stores

    syncs, stores = asyncio.run(main())
    assert sum(s.reloads for s in syncs) == 1 and sum(s.reload_failures for s in syncs) == 0
    marker = read_marker(redis_client, keys)
    assert all(s.marker == marker for s in stores) and marker.generation > 1 and (marker.users, marker.items) == (2000, 5000)
