"""Recommend end to end through real ZooKeeper, Redis, shard processes and a frontend process,
against the reference path (``core.reference.ReferenceRecommender``) on three placements."""

from __future__ import annotations

import asyncio
import threading
import uuid

import grpc
import pytest

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.zk_paths import ZkPaths
from tests.support.cluster import LENIENT_ADMISSION, start_cluster
from tests.support.processes import ProcessFactory
from tests.support.recommend import check_response, random_requests
from tests.support.waiting import wait_for

CONCURRENCY = 16
REQUESTS = 200
PLACEMENTS = {
    "replicated": {"default": {"sharding": "replicated", "replicas": "all"}},
    "row_wise": {
        "default": {"sharding": "row_wise", "partitions": 3, "replicas": 1},
        "tables": {"age_buckets": {"sharding": "row_wise", "partitions": 2, "replicas": 2}},
    },
    "mixed": {
        "default": {"sharding": "replicated", "replicas": 2},
        "tables": {
            "users": {"sharding": "row_wise", "partitions": 3, "replicas": 1},
            "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
            "tags": {"sharding": "table_wise"},
        },
    },
}


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def reference(small_reference):
    return small_reference


@pytest.fixture(scope="module")
def features(redis_server, checkpoint):
    """The checkpoint's stored features loaded into the real Redis under a module prefix."""
    from services.control.features import load_features

    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    load_features(checkpoint, redis_server.url, prefix=prefix)
    return redis_server.url, prefix


@pytest.fixture(scope="module", params=sorted(PLACEMENTS))
def served(request, zk_server, tmp_path_factory, checkpoint, features):
    """A cluster (3 shards with the placement, one frontend) and a channel to the frontend."""
    zk_server.ensure_running()
    paths = ZkPaths("t-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    spawn = ProcessFactory(tmp_path_factory.mktemp(f"logs-{request.param}"))
    try:
        start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, PLACEMENTS[request.param], 3)
        url, prefix = features
        fe = spawn(
            "frontend", "serve", "--zk", zk_server.hosts, "--cluster", paths.cluster, "--redis", url,
            "--redis-prefix", prefix, "--max-wait-ms", "5", "--session-timeout-s", "1.0", "--default-timeout-ms", "5000", *LENIENT_ADMISSION,
            name="frontend",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        address = line.split()[2]
        yield request.param, address, zk, paths
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


async def send_all(address: str, requests, concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)

        async def one(req):
            async with sem:
                return await stub.Recommend(req, timeout=10)

        return await asyncio.gather(*(one(r) for r in requests))


def stats(address: str) -> dict:
    with grpc.insecure_channel(address) as ch:
        return dict(recommend_pb2_grpc.FrontendAdminStub(ch).GetStats(recommend_pb2.GetStatsRequest(), timeout=5).counters)


def test_concurrent_requests_match_reference(served, reference):
    name, address, _, _ = served
    requests = random_requests(REQUESTS, seed=len(name))
    before = stats(address)
    responses = asyncio.run(send_all(address, requests, CONCURRENCY))
    for req, resp in zip(requests, responses, strict=True):
        check_response(reference, req, resp)
        assert resp.version == 1 and resp.shard_map_version == 1
    after = stats(address)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["requests_batched"] == REQUESTS
    assert delta["multi_request_batches"] > 0, f"no request shared a batch: {delta}"
    assert delta["item_ids_unique"] < delta["item_ids_requested"], f"no id was deduplicated: {delta}"
    assert delta["bags_looked_up"] < delta["bags_requested"], f"no identical bag was pooled once: {delta}"
    assert delta["lookup_rpcs"] <= 3 * delta["batches"], "more than one Lookup per node per batch"
    assert delta["wire_bytes_user"] > 0 and delta["wire_bytes_item"] > delta["wire_bytes_user"], delta


@pytest.mark.parametrize("served", ["mixed"], indirect=True)
def test_zookeeper_restart_while_requests_flow(served, reference, zk_server):
    name, address, _, _ = served
    requests = random_requests(40, seed=99)
    stop, done, errors = threading.Event(), [0], []

    def client():
        with grpc.insecure_channel(address) as ch:
            stub = recommend_pb2_grpc.RecommenderStub(ch)
            i = 0
            while not stop.is_set():
                req = requests[i % len(requests)]
                try:
                    check_response(reference, req, stub.Recommend(req, timeout=5))
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure is collected and asserted
                    errors.append(e)
                i += 1

    t = threading.Thread(target=client)
    t.start()
    try:
        wait_for(lambda: done[0] >= 5, 30, "requests to flow")
        zk_server.stop()
        n = done[0]
        wait_for(lambda: done[0] >= n + 20, 30, "requests served while ZooKeeper is down")
        zk_server.start()
        n = done[0]
        wait_for(lambda: done[0] >= n + 20, 30, "requests served after ZooKeeper came back")
    finally:
        stop.set()
        t.join()
        zk_server.ensure_running()
    assert not errors, errors[:3]


def _bad_recommends():
    def req(**kw):
        base = dict(request_id="bad", user_id=3, candidate_item_ids=[1, 2, 3], top_k=2)
        base.update(kw)
        return recommend_pb2.RecommendRequest(**base)

    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    nan = req()
    nan.dense_features["user_activity"] = float("nan")
    unknown_dense = req()
    unknown_dense.dense_features["nope"] = 1.0
    unknown_sparse = req()
    unknown_sparse.sparse_features["nope"].values.append(1)
    too_long = req()
    too_long.sparse_features["user_history"].values.extend(range(51))
    negative = req()
    negative.sparse_features["user_history"].values.append(-4)
    oov = req()
    oov.sparse_features["user_country"].values.append(10_000)
    return [
        ("no candidates", req(candidate_item_ids=[]), IA, "candidate_item_ids"),
        ("top_k zero", req(top_k=0), IA, "top_k"),
        ("top_k over candidates", req(top_k=4), IA, "top_k"),
        ("unknown model", req(model="other"), IA, "unknown model 'other'"),
        ("unknown dense feature", unknown_dense, IA, "nope"),
        ("unknown sparse feature", unknown_sparse, IA, "nope"),
        ("NaN dense value", nan, IA, "user_activity"),
        ("bag too long", too_long, IA, "user_history"),
        ("negative id", negative, IA, "user_history"),
        ("out-of-vocabulary id", oov, IA, "user_country"),
        ("candidate out of range", req(candidate_item_ids=[1, 99_999]), IA, "candidate_item_ids[1]"),
        ("too many candidates", req(candidate_item_ids=list(range(1001))), RE, "1000"),
    ]


@pytest.mark.parametrize("served", ["mixed"], indirect=True)
def test_bad_input_is_refused_without_calling_shards(served):
    name, address, _, _ = served
    before = stats(address)
    with grpc.insecure_channel(address) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        for what, req, code, fragment in _bad_recommends():
            with pytest.raises(grpc.RpcError) as info:
                stub.Recommend(req, timeout=5)
            assert info.value.code() == code, f"{what}: {info.value.code()} {info.value.details()}"
            assert fragment in info.value.details(), f"{what}: {info.value.details()!r}"
        after = stats(address)
        assert after["lookup_rpcs"] == before["lookup_rpcs"], "a shard was called for a bad request"
        ok = stub.Recommend(recommend_pb2.RecommendRequest(user_id=3, candidate_item_ids=[1, 2, 3], top_k=2), timeout=5)
        assert len(ok.items) == 2


@pytest.mark.parametrize("served", ["row_wise"], indirect=True)
def test_partition_without_live_replica_is_unavailable(served, zk_server):
    """Runs last for its placement: it kills a node that alone holds partitions."""
    name, address, zk, paths = served
    import json

    node = "shard-0"
    pid = json.loads(zk.get(paths.node(node))[0])["pid"]
    import os
    import signal

    os.kill(pid, signal.SIGKILL)
    req = recommend_pb2.RecommendRequest(user_id=3, candidate_item_ids=list(range(60)), top_k=5)
    with grpc.insecure_channel(address) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(req, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "partition" in info.value.details() and "no live replica" in info.value.details(), info.value.details()
