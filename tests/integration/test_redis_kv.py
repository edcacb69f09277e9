"""The redis-kv baseline's lookup step against a real Redis: the small preset's rows loaded with
``load_rows_into_redis`` (what ``shardrec bench load-kv`` runs), then ``RedisKvLookupClient``
pooled vectors checked against ``core.reference.reference_pool``; one Redis round trip per
batch (counted by the server), exact wire-byte accounting, and a missing row is UNAVAILABLE."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
import redis.asyncio

from services.core import synth
from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import ConfigError, InvalidArgumentError, UnavailableError
from services.core.reference import reference_pool
from services.core.types import FeatureSide, PoolingType
from services.frontend.batch import Bags
from services.frontend.lookup import FeatureLookup
from services.frontend.lookup.baselines.redis_kv import RedisKvLookupClient
from services.frontend.lookup.baselines.redis_kv_store import load_rows_into_redis, meta_key, row_keys

RTOL, ATOL = 1e-5, 1e-6
# torch.from_numpy over the read-only MGET bytes: expected (services.core.pooling filters it at
# import, which pytest's per-test warning capture undoes)
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
SPEC = synth.model_spec("small")
DIM = SPEC.dense_arch.embedding_dim


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    synth.synthesize(root, "small", seed=5)
    return str(root)


@pytest.fixture(scope="module")
def tables(checkpoint) -> dict[str, np.ndarray]:
    reader = CheckpointReader(checkpoint)
    return {t: reader.open_table(1, t) for t in SPEC.table_names}


@pytest.fixture
def loaded(checkpoint, redis_server, redis_client, redis_prefix) -> str:
    """Every row of the small preset in Redis under this test's prefix (cleaned by redis_client)."""
    seen = []
    stats = load_rows_into_redis(checkpoint, redis_server.url, redis_prefix, batch_rows=700, progress=lambda *a: seen.append(a))
    total = sum(t.rows for t in SPEC.tables)
    assert stats.rows == total and stats.value_bytes == total * DIM * 4
    assert redis_client.dbsize() >= total + 1
    assert seen[-1][1:3] == (SPEC.tables[-1].rows, SPEC.tables[-1].rows)
    return redis_prefix


def run_kv(url: str, prefix: str, body: Callable, max_keys_per_command: int = 50_000):
    """``await body(client)`` on a fresh loop with a RedisKvLookupClient over a redis.asyncio client."""

    async def main():
        r = redis.asyncio.Redis.from_url(url, decode_responses=False)
        client = RedisKvLookupClient(r, prefix, SPEC, max_keys_per_command=max_keys_per_command)
        try:
            return await body(client)
        finally:
            await client.close()
            await r.aclose()

    return asyncio.run(main())


def random_bags(rng: np.random.Generator, table: str, bags: int, max_len: int, weighted: bool = False) -> Bags:
    lengths = rng.integers(0, max_len + 1, bags).astype(np.int32)
    lengths[rng.random(bags) < 0.2] = 0  # plenty of empty bags
    rows = synth.power_law_ids(rng, int(lengths.sum()), SPEC.table(table).rows)
    weights = rng.random(len(rows)).astype(np.float32) if weighted else None
    return Bags(rows, lengths, weights)


def random_batch(rng: np.random.Generator) -> list[FeatureLookup]:
    """Every pooling on several tables, both sides, rows shared across features of one table."""
    users, items = int(rng.integers(1, 6)), int(rng.integers(1, 80))
    return [
        FeatureLookup("u_hist_mean", "items", PoolingType.MEAN, random_bags(rng, "items", users, 50), FeatureSide.USER),
        FeatureLookup("u_hist_max", "items", PoolingType.MAX, random_bags(rng, "items", users, 20), FeatureSide.USER),
        FeatureLookup("u_country_w", "countries", PoolingType.SUM, random_bags(rng, "countries", users, 3, weighted=True), FeatureSide.USER),
        FeatureLookup("u_id", "users", PoolingType.SUM, random_bags(rng, "users", users, 1), FeatureSide.USER),
        FeatureLookup("i_id", "items", PoolingType.SUM, random_bags(rng, "items", items, 1), FeatureSide.ITEM),
        FeatureLookup("i_tags_max", "tags", PoolingType.MAX, random_bags(rng, "tags", items, 5), FeatureSide.ITEM),
        FeatureLookup("i_tags_mean", "tags", PoolingType.MEAN, random_bags(rng, "tags", items, 5), FeatureSide.ITEM),
        FeatureLookup("i_cat", "item_categories", PoolingType.SUM, random_bags(rng, "item_categories", items, 1), FeatureSide.ITEM),
    ]


def mget_calls(redis_client) -> int:
    return int(redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


def test_row_keys_are_compact_and_fixed_width():
    assert row_keys("kv:", "items", np.array([1, 258]), 500_000) == [b"kv:items:\x00\x00\x00\x01", b"kv:items:\x00\x00\x01\x02"]
    assert row_keys("", "t", np.array([0]), (1 << 32) + 1) == [b"t:" + b"\x00" * 8]
    assert row_keys("kv:", "items", np.zeros(0, np.int64), 10) == []


def test_pooled_vectors_equal_the_reference(loaded, redis_server, redis_client, tables):
    rng = np.random.default_rng(11)
    batches = [random_batch(rng) for _ in range(12)]

    async def body(client):
        await client.verify_loaded(1)
        out = []
        for features in batches:
            before = mget_calls(redis_client)
            result = await client.lookup(features, version=1, timeout_s=5.0, request_id="t")
            out.append((result, mget_calls(redis_client) - before))
        return out, client.stats, client.round_trips

    results, stats, round_trips = run_kv(redis_server.url, loaded, body)
    for features, (result, mgets) in zip(batches, results, strict=True):
        assert mgets == 1, "one MGET (one round trip) per batch"
        assert result.version == 1
        for f in features:
            want = reference_pool(tables[f.table], f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
            got = result.pooled[f.feature]
            assert got.dtype == np.float32 and got.shape == (len(f.bags.lengths), DIM)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f.feature)
            assert not got[f.bags.lengths == 0].any(), f"{f.feature}: an empty bag pools to zeros"
    assert stats.batches == round_trips == stats.rpcs == len(batches)
    assert stats.ids_sent == sum(len(f.bags.rows) for fs in batches for f in fs)


def test_huge_batch_is_several_mgets_in_one_round_trip(loaded, redis_server, redis_client, tables):
    features = random_batch(np.random.default_rng(8))

    async def body(client):
        before = mget_calls(redis_client)
        result = await client.lookup(features, version=1, timeout_s=5.0, request_id="t")
        return result, mget_calls(redis_client) - before, client.round_trips

    result, mgets, round_trips = run_kv(redis_server.url, loaded, body, max_keys_per_command=7)
    keys = sum(len(np.unique(np.concatenate([f.bags.rows for f in features if f.table == t]))) for t in {f.table for f in features})
    assert round_trips == 1 and mgets == -(-keys // 7)
    for f in features:
        want = reference_pool(tables[f.table], f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
        np.testing.assert_allclose(result.pooled[f.feature], want, rtol=RTOL, atol=ATOL, err_msg=f.feature)


def test_deadline_already_passed_is_deadline_exceeded(loaded, redis_server):
    from services.core.errors import DeadlineExceededError

    features = random_batch(np.random.default_rng(4))

    async def body(client):
        with pytest.raises(DeadlineExceededError):
            await client.lookup(features, version=1, timeout_s=0.0, request_id="t")
        # the client still works afterwards
        return await client.lookup(features, version=1, timeout_s=5.0, request_id="t")

    assert run_kv(redis_server.url, loaded, body).version == 1


def test_late_redis_is_deadline_exceeded_and_the_late_reply_is_never_read(loaded, redis_server, redis_client, tables):
    """Redis paused (CLIENT PAUSE) past the deadline: DEADLINE_EXCEEDED; the connection that
    was waiting is dropped, so the next batch reads its own reply, not the late one."""
    from services.core.errors import DeadlineExceededError

    rng = np.random.default_rng(6)
    first, second = random_batch(rng), random_batch(rng)

    async def body(client):
        await client.lookup(first, version=1, timeout_s=5.0, request_id="warm")  # a pooled connection
        redis_client.execute_command("CLIENT", "PAUSE", 400, "ALL")
        with pytest.raises(DeadlineExceededError, match="did not answer"):
            await client.lookup(first, version=1, timeout_s=0.1, request_id="late")
        return await client.lookup(second, version=1, timeout_s=5.0, request_id="next")

    result = run_kv(redis_server.url, loaded, body)
    for f in second:
        want = reference_pool(tables[f.table], f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
        np.testing.assert_allclose(result.pooled[f.feature], want, rtol=RTOL, atol=ATOL, err_msg=f.feature)


def test_wire_bytes_count_each_fetched_row_once_on_one_side(loaded, redis_server):
    rng = np.random.default_rng(3)
    features = random_batch(rng)

    async def body(client):
        await client.lookup(features, version=1, timeout_s=5.0, request_id="t")
        return client.stats

    stats = run_kv(redis_server.url, loaded, body)
    user_bytes = item_bytes = 0
    for table in {f.table for f in features}:
        mine = [f for f in features if f.table == table]
        item_rows = set(np.concatenate([f.bags.rows for f in mine if f.side is FeatureSide.ITEM] + [np.zeros(0, np.int64)]).tolist())
        all_rows = set(np.concatenate([f.bags.rows for f in mine]).tolist())
        per_row = len(row_keys(loaded, table, np.array([0]), SPEC.table(table).rows)[0]) + DIM * 4
        item_bytes += len(item_rows) * per_row
        user_bytes += len(all_rows - item_rows) * per_row
    assert stats.wire_bytes_by_side == {"user": user_bytes, "item": item_bytes}
    assert user_bytes + item_bytes == stats.request_bytes + stats.response_bytes


def test_batch_of_empty_bags_needs_no_round_trip(loaded, redis_server):
    empty = Bags(np.zeros(0, np.int64), np.zeros(4, np.int32))
    features = [FeatureLookup("f", "items", PoolingType.MAX, empty, FeatureSide.ITEM)]

    async def body(client):
        return await client.lookup(features, version=1, timeout_s=5.0, request_id="t"), client.round_trips

    result, round_trips = run_kv(redis_server.url, loaded, body)
    assert round_trips == 0
    np.testing.assert_array_equal(result.pooled["f"], np.zeros((4, DIM), np.float32))


def test_missing_row_is_unavailable_naming_table_and_row(loaded, redis_server, redis_client):
    redis_client.delete(row_keys(loaded, "items", np.array([42]), SPEC.table("items").rows)[0])
    features = [FeatureLookup("f", "items", PoolingType.SUM, Bags(np.array([7, 42, 9]), np.array([2, 1], np.int32)), FeatureSide.ITEM)]

    async def body(client):
        with pytest.raises(UnavailableError) as info:
            await client.lookup(features, version=1, timeout_s=5.0, request_id="t")
        return str(info.value)

    message = run_kv(redis_server.url, loaded, body)
    assert "'items'" in message and "row 42" in message, message


def test_row_out_of_range_is_invalid_argument(loaded, redis_server):
    features = [FeatureLookup("f", "tags", PoolingType.SUM, Bags(np.array([300]), np.array([1], np.int32)), FeatureSide.ITEM)]

    async def body(client):
        with pytest.raises(InvalidArgumentError, match="row 300 is outside"):
            await client.lookup(features, version=1, timeout_s=5.0, request_id="t")

    run_kv(redis_server.url, loaded, body)


def test_startup_check_refuses_unloaded_or_other_version(loaded, redis_server, redis_client):
    async def check(client, version=1):
        return await client.verify_loaded(version)

    assert run_kv(redis_server.url, loaded, check)["tables"]["items"] == 5000
    with pytest.raises(ConfigError, match="bench load-kv"):
        run_kv(redis_server.url, loaded, lambda c: check(c, version=2))
    with pytest.raises(ConfigError, match="rows never loaded"):
        run_kv(redis_server.url, loaded + "other:", check)
    redis_client.delete(meta_key(loaded))  # what a load that died half-way leaves
    with pytest.raises(ConfigError, match="unfinished"):
        run_kv(redis_server.url, loaded, check)
