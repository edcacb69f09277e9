"""Redis AUTH through every client path shardrec has, against a password-protected Redis: the
password from a file (``core.config.redis_auth``), a plain URL, a Sentinel URL whose sentinels
need no password and one whose sentinel does (``core.clients``: sentinels get ``AUTH default
<password>``), the asyncio client with its timeout and retries, ``features load`` / ``status``,
and the frontend's reload of a lost store in a spawned process (docs/security.md)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import redis

from services.control.features import feature_store_status, load_features
from services.core.checkpoint.reader import CheckpointReader
from services.core.clients import make_async_redis, make_redis
from services.core.config import RedisAuth, redis_auth
from services.frontend.feature_sync import ReloadSource, reload_lost_store
from tests.support.servers import RedisServer, SentinelServer
from tests.support.waiting import wait_for

PASSWORD = "s3cret-of-the-features"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A Redis with a password, a sentinel without one and a sentinel with one."""
    root = tmp_path_factory.mktemp("redis-auth")
    primary = RedisServer(root / "primary", password=PASSWORD)
    primary.start()
    sentinels = []
    try:
        for name, requirepass in (("open", False), ("guarded", True)):
            sentinel = SentinelServer(root / f"sentinel-{name}", primary.port, password=PASSWORD, requirepass=requirepass)
            sentinel.start()
            sentinels.append(sentinel)
        for sentinel in sentinels:
            wait_for(lambda s=sentinel: s.primary_port() == primary.port, 10, "the sentinels to name the primary")
        yield primary, sentinels
    finally:
        for server in (*sentinels, primary):
            server.close()


@pytest.fixture
def auth(tmp_path) -> RedisAuth:
    path = tmp_path / "redis-password"
    path.write_text(PASSWORD + "\n")
    return redis_auth(str(path))


def roundtrip(url: str, auth: RedisAuth | None, key: bytes) -> bytes | None:
    client = make_redis(url, timeout_s=2.0, retries=0, auth=auth)
    try:
        client.set(key, b"v")
    finally:
        client.close()

    async def main():
        aclient = make_async_redis(url, timeout_s=2.0, retries=0, auth=auth)
        try:
            return await aclient.get(key)
        finally:
            await aclient.aclose()

    return asyncio.run(main())


def test_plain_and_sentinel_urls_need_the_password_and_work_with_it(guarded, auth):
    primary, (open_sentinel, guarded_sentinel) = guarded
    for url in (primary.url, open_sentinel.url, guarded_sentinel.url):
        assert roundtrip(url, auth, url.encode()) == b"v", url
        with pytest.raises(redis.exceptions.ConnectionError):  # AuthenticationError, or MasterNotFoundError
            make_redis(url, timeout_s=2.0, retries=0).ping()
    # The password in a Sentinel URL (as redis:// URLs carry one) reaches the primary and the sentinels.
    in_url = guarded_sentinel.url.replace("://", f"://:{PASSWORD}@")
    assert roundtrip(in_url, None, b"in-url") == b"v"


def test_features_load_status_and_the_spawned_reload_take_the_password(guarded, auth, small_checkpoint):
    primary, (_open, sentinel) = guarded
    loaded = load_features(small_checkpoint, sentinel.url, prefix="auth:", progress=False, redis_auth=auth)
    status = feature_store_status(small_checkpoint, sentinel.url, prefix="auth:", redis_auth=auth)
    assert status["marker"] is not None and status["marker"].generation == loaded["load"].marker.generation
    client = make_redis(primary.url, timeout_s=2.0, auth=auth)
    try:
        client.delete(loaded["keys"].marker)  # the store is lost
    finally:
        client.close()

    version = CheckpointReader(small_checkpoint).latest_version()
    source = ReloadSource(small_checkpoint, version, small_checkpoint, sentinel.url, "auth:", auth)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:  # as FeatureSync runs it
        result = pool.submit(reload_lost_store, source, loaded["load"].marker.generation + 1).result(timeout=120)
    assert result is not None and result.marker.generation > loaded["load"].marker.generation
    assert feature_store_status(small_checkpoint, primary.url, prefix="auth:", redis_auth=auth)["marker"] == result.marker
