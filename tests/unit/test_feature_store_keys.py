"""The feature store's key names and marker (``services.core.feature_store``) and the Redis URL
forms ``services.core.clients`` accepts, Sentinel included: pure, no Redis."""

from __future__ import annotations

import dataclasses

import pytest

from services.core import synth
from services.core.clients import parse_sentinel_url
from services.core.errors import ConfigError, ShardrecError
from services.core.feature_store import FeatureMarker, StoreKeys, glob_escape
from services.core.features import FeatureLayout
from services.core.types import FeatureSide

SPEC = synth.model_spec("small")
USER, ITEM = FeatureLayout(SPEC, FeatureSide.USER), FeatureLayout(SPEC, FeatureSide.ITEM)


def test_key_names():
    keys = StoreKeys.of("p:", USER, ITEM)
    u, i = USER.fingerprint, ITEM.fingerprint
    assert keys.marker == f"p:features:demo:{u}:{i}"
    assert (keys.lock, keys.generations) == (f"{keys.marker}:lock", f"{keys.marker}:generations")
    assert keys.counter == "p:features:generation"  # one counter per prefix: numbers never repeat
    assert USER.key(keys.generation_prefix(7), 42) == f"p:g7:demo:{u}:u:42".encode()
    assert ITEM.keys(keys.generation_prefix(7), [3]) == [f"p:g7:demo:{i}:i:3".encode()]
    assert keys.generation_pattern(7) == "p:g7:*"
    assert StoreKeys.of("a*[b]?\\:", USER, ITEM).generation_pattern(12) == "a\\*\\[b\\]\\?\\\\:g12:*"
    assert glob_escape("plain:") == "plain:"


def test_marker_round_trip_and_refusals():
    keys = StoreKeys.of("", USER, ITEM)
    marker = FeatureMarker(3, "demo", USER.fingerprint, ITEM.fingerprint, 2000, 5000, "ab12", 1.5e9, "file:///m", 2)
    assert FeatureMarker.parse(marker.to_bytes(), keys) == marker
    for raw in (b"not json", b'{"format": "other"}', marker.to_bytes().replace(b'"generation":3', b'"generation":0')):
        with pytest.raises(ShardrecError, match="is unreadable") as e:
            FeatureMarker.parse(raw, keys)
        assert e.value.grpc_code == "INTERNAL" and keys.marker in str(e.value)
    other = dataclasses.replace(marker, user_fingerprint="0" * 12)
    with pytest.raises(ShardrecError, match="another model or layout"):
        FeatureMarker.parse(other.to_bytes(), keys)


def test_sentinel_urls():
    assert parse_sentinel_url("redis://127.0.0.1:6379/0") is None
    u = parse_sentinel_url("redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/features")
    assert u.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380)) and u.master == "features" and u.db == 0
    u = parse_sentinel_url("redis+sentinel://app:s%3Acret@h:1/m/3")
    assert (u.username, u.password, u.sentinels, u.master, u.db) == ("app", "s:cret", (("h", 1),), "m", 3)
    assert parse_sentinel_url("REDIS+SENTINEL://[::1]:26379/m").sentinels == (("::1", 26379),)
    for bad in ("redis+sentinel://h/m", "redis+sentinel://h:1", "redis+sentinel://h:1/m/x", "redis+sentinel://:1/m"):
        with pytest.raises(ConfigError, match="redis\\+sentinel://"):
            parse_sentinel_url(bad)


def test_sentinel_clients_take_the_password_and_tls():
    """The primary gets the URL's password, else the configured one; the sentinels ``AUTH default
    <password>`` (accepted by a sentinel without one); ``rediss+sentinel`` is TLS to both."""
    from services.core.clients import make_async_redis, make_redis
    from services.core.config import RedisAuth

    assert parse_sentinel_url("rediss+sentinel://h:1/m").tls and not parse_sentinel_url("redis+sentinel://h:1/m").tls
    auth = RedisAuth("pw", "/ca.pem")
    for make in (make_redis, make_async_redis):
        client = make("rediss+sentinel://h:1/m/2", timeout_s=0.5, retries=0, auth=auth)  # nothing connects yet
        pool = client.connection_pool
        assert (pool.connection_kwargs["password"], pool.connection_kwargs["db"]) == ("pw", 2)
        assert "SSL" in pool.connection_class.__name__ and pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
        sentinel = pool.sentinel_manager.sentinels[0].connection_pool
        assert (sentinel.connection_kwargs["username"], sentinel.connection_kwargs["password"]) == ("default", "pw")
        assert "SSL" in sentinel.connection_class.__name__ and sentinel.connection_kwargs["socket_timeout"] == 0.5
        in_url = make("redis+sentinel://:url@h:1/m", auth=auth).connection_pool
        assert in_url.connection_kwargs["password"] == "url" and "SSL" not in in_url.connection_class.__name__
        without = make("redis+sentinel://h:1/m").connection_pool.sentinel_manager.sentinels[0].connection_pool
        assert without.connection_kwargs.get("password") is None
