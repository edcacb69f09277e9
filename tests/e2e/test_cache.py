"""The embedding cache end to end (docs/cache.md): a frontend with ``--cache-bytes`` over real
ZooKeeper, Redis and three shard processes (mixed placement), a closed-loop client, and live
deltas, a rollback, a delta on the rolled-back branch and a new base published under it. Every
response must equal ``core.reference`` at exactly the version it reports. The cache is smaller
than the model, so rows are evicted; the deltas change the hottest rows, which the cache holds,
so a stale row would show. Also: the redis-kv baseline behind the same cache."""

from __future__ import annotations

import asyncio

import pytest

from services.control.publish import model_reader, publish_version, rollback_version
from services.core.checkpoint.delta import compact_version
from services.core.discovery.cluster_store import ClusterStore
from services.core.reference import ReferenceRecommender
from tests.e2e.test_baselines import checkpoint, features, reference  # noqa: F401 - module fixtures: small model, rows in Redis
from tests.e2e.test_recommend import check_response, random_requests, send_all, stats
from tests.e2e.test_versions import drift_delta, live  # noqa: F401 - the live cluster fixture
from tests.support.closed_loop import ClosedLoop
from tests.support.cluster import LENIENT_ADMISSION
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

CACHE_BYTES = "100K"  # the small model's rows take about 490 KB; the requests here read about 1,700 rows


class Expected:
    """The reference's answer to each (request, version), computed once."""

    def __init__(self, root: str, requests) -> None:
        self.root, self.requests = root, requests
        self._models: dict[int, ReferenceRecommender] = {}
        self.checked: set[tuple[int, int, tuple]] = set()

    def check(self, index: int, response) -> None:
        key = (index, response.version, tuple((it.position, it.score) for it in response.items))
        if key in self.checked:  # the same answer to the same request at the same version
            return
        v = response.version
        if v not in self._models:
            self._models[v] = ReferenceRecommender(self.root, v)
        check_response(self._models[v], self.requests[index], response)
        self.checked.add(key)


@pytest.mark.parametrize("live", [("--cache-bytes", CACHE_BYTES)], indirect=True)
def test_every_response_matches_its_version_across_deltas_a_rollback_and_a_new_base(live):  # noqa: F811
    root, address, zk, paths, _hosts = live
    store = ClusterStore(zk, paths)
    requests = random_requests(60, seed=7)
    with ClosedLoop(address, requests, 2) as load:
        wait_for(lambda: load.count(1) >= 60, 60, "responses at version 1")
        for v in (2, 3):
            drift_delta(root, v, seed=v)
            publish_version(store, model_reader(store), v)
            wait_for(lambda v=v: load.count(v) >= 40, 60, f"responses at version {v}")
        rollback_version(store, model_reader(store), 2)  # 3 -> 2: the rows delta 3 changed go
        mark = len(load.replies())
        wait_for(lambda: sum(r.response.version == 2 for r in load.replies()[mark:]) >= 40, 60, "responses at version 2 again")
        drift_delta(root, 4, seed=4, parent=2)  # on the rolled-back branch
        publish_version(store, model_reader(store), 4)
        wait_for(lambda: load.count(4) >= 40, 60, "responses at version 4")
        compact_version(root, 4, 5)  # a new base, equal to 4: the cache is flushed
        publish_version(store, model_reader(store), 5)
        wait_for(lambda: load.count(5) >= 40, 60, "responses at version 5")
    assert not load.errors, load.errors[:3]
    assert load.versions() == {1, 2, 3, 4, 5}
    expected = Expected(root, requests)
    for reply in load.replies():  # every response, at its version
        expected.check(reply.index, reply.response)
    c = stats(address)
    cache = {k: v for k, v in c.items() if k.startswith("cache_")}
    print(f"responses per version { {v: load.count(v) for v in sorted(load.versions())} }; {len(expected.checked)} distinct answers checked; {cache}")
    assert c["cache_hits"] > 5 * c["cache_misses"] > 0, cache
    assert c["cache_invalidated"] > 0 and c["cache_flushed"] > 0 and c["cache_evicted"] > 0 and c["cache_admitted"] > 0, cache


@pytest.fixture(scope="module")
def redis_kv_cached(tmp_path_factory, checkpoint, features):  # noqa: F811
    """A redis-kv frontend behind the same cache."""
    url, prefix, kv_prefix = features
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-redis-kv-cached"))
    try:
        fe = spawn(
            "frontend", "serve", "--lookup", "redis-kv", "--checkpoint", checkpoint, "--redis", url, "--redis-prefix", prefix,
            "--kv-prefix", kv_prefix, "--cache-bytes", CACHE_BYTES, "--max-wait-ms", "5", "--default-timeout-ms", "5000",
            *LENIENT_ADMISSION, name="frontend-redis-kv-cached",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        yield line.split()[2]
    finally:
        spawn.close()


def test_redis_kv_behind_the_cache_matches_the_reference(redis_kv_cached, reference):  # noqa: F811
    address = redis_kv_cached
    requests = random_requests(40, seed=11)
    sent = []  # ids sent to Redis in each pass
    for _ in range(2):  # the second pass is served mostly from the cache
        for req, resp in zip(requests, asyncio.run(send_all(address, requests, 8)), strict=True):
            check_response(reference, req, resp)
        sent.append(stats(address)["lookup_ids_sent"] - sum(sent))
    c = stats(address)
    # one MGET per batch at most (a batch with a miss still needs one: the cache is a fifth of the rows)
    assert c["cache_hits"] > c["cache_misses"] > 0 and c["lookup_rpcs"] <= c["batches"], c
    assert sent[1] < sent[0] / 2, sent
