"""Replica faults under load: a replica killed (kill -9) or paused (SIGSTOP) while a closed-loop
client runs, and not one request may fail.

Real ZooKeeper, Redis, three shard processes where every partition has two replicas, and one
frontend (hedging and ejection at their defaults). Every response is checked against
``core.reference`` (the reference's scores are computed once per distinct request).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from services._proto.shardrec.v1 import recommend_pb2_grpc
from services.core.checkpoint.reader import CheckpointReader
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.shard_map_store import ShardMapStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.types import PoolingType
from services.frontend.batch import Bags
from services.frontend.fanout import ChannelPool, GrpcLookupClient
from services.frontend.lookup import FeatureLookup, InprocLookupClient
from services.frontend.replicas import ReplicaPolicy
from services.frontend.view import ClusterView
from tests.e2e.test_recommend import check_response, checkpoint, features, random_requests, reference, stats  # noqa: F401
from tests.support.cluster import start_cluster, start_shard
from tests.support.processes import ProcessFactory, ServiceProcess
from tests.support.waiting import wait_for

SPEC = {
    "default": {"sharding": "replicated", "replicas": 2},
    "tables": {"items": {"sharding": "row_wise", "partitions": 2, "replicas": 2}},
}
NODES = 3
SESSION_TIMEOUT_S = 1.0  # the shards' (tests.support.cluster.start_shard) and the frontend's
CLIENTS = 3
HEDGE_BUDGET, HEDGE_BURST = 0.05, 10  # the frontend's defaults (services.frontend.replicas)


@dataclass
class Served:
    address: str
    zk: object  # the test's KazooClient
    zk_hosts: str
    paths: ZkPaths
    spawn: ProcessFactory
    shards: dict[str, ServiceProcess]


@pytest.fixture(scope="module")
def cluster(zk_server, tmp_path_factory, checkpoint, features):  # noqa: F811
    zk_server.ensure_running()
    paths = ZkPaths("f-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-faults"))
    try:
        shards = start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, SPEC, NODES).processes
        url, prefix = features
        fe = spawn(
            "frontend", "serve", "--zk", zk_server.hosts, "--cluster", paths.cluster, "--redis", url,
            "--redis-prefix", prefix, "--max-wait-ms", "5", "--session-timeout-s", str(SESSION_TIMEOUT_S),
            "--default-timeout-ms", "5000",
            name="frontend",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        yield Served(line.split()[2], zk, zk_server.hosts, paths, spawn, shards)
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


@pytest.fixture
def served(cluster: Served) -> Served:
    """The module's cluster with every shard running (a killed one restarted) and in the
    frontend's view."""
    for node, proc in cluster.shards.items():
        if not proc.running:
            proc.close()
            cluster.shards[node] = start_shard(cluster.spawn, cluster.zk_hosts, cluster.paths.cluster, node)
    wait_for(lambda: stats(cluster.address)["view_live_nodes"] == NODES, 60, f"all {NODES} shards in the frontend's view")
    return cluster


class CachedReference:
    """``ReferenceRecommender.scores`` computed once per distinct request."""

    def __init__(self, reference) -> None:
        self._reference = reference
        self._memo: dict[str, object] = {}
        self._lock = threading.Lock()

    def scores(self, user_id, candidates, dense=None, overrides=None):
        key = repr((user_id, list(candidates), sorted((dense or {}).items()), sorted((overrides or {}).items())))
        with self._lock:
            if key not in self._memo:
                self._memo[key] = self._reference.scores(user_id, candidates, dense, overrides)
            return self._memo[key]


class ClosedLoop:
    """``CLIENTS`` threads, each sending one request at a time until stopped and checking
    every response against the reference; failures of either kind are collected."""

    def __init__(self, address: str, reference, requests) -> None:
        self.address = address
        self.reference = CachedReference(reference)
        self.requests = requests
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = recommend_pb2_grpc.RecommenderStub(ch)
            n = i
            while not self.stop.is_set():
                req = self.requests[n % len(self.requests)]
                try:
                    check_response(self.reference, req, stub.Recommend(req, timeout=10))
                    self.done += 1
                except Exception as e:  # noqa: BLE001 - every failure is collected and asserted
                    self.errors.append(e)
                n += CLIENTS

    def served(self, more: int, timeout_s: float, what: str) -> None:
        """Wait until ``more`` further requests have been answered correctly."""
        target = self.done + more
        wait_for(lambda: self.done >= target or self.errors, timeout_s, what)

    def __enter__(self) -> "ClosedLoop":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def test_paused_replica_is_hedged_around_and_probed_back(served, reference):  # noqa: F811
    victim = "shard-2"
    with ClosedLoop(served.address, reference, random_requests(40, seed=22)) as load:
        load.served(30, 30, "requests to flow")
        before = stats(served.address)
        paused_at = time.monotonic()
        served.shards[victim].pause()
        try:
            wait_for(lambda: stats(served.address)["view_live_nodes"] == NODES - 1, SESSION_TIMEOUT_S + 2.0,
                     "the paused shard's session to expire")
            load.served(20, 30, "requests served while the shard is paused")
            # the fault lasts twice the session timeout, whatever the load did meanwhile
            wait_for(lambda: time.monotonic() - paused_at >= 2 * SESSION_TIMEOUT_S, 2 * SESSION_TIMEOUT_S + 1, "the pause to last")
            during = stats(served.address)
        finally:
            served.shards[victim].resume()
        wait_for(lambda: stats(served.address)["view_live_nodes"] == NODES, 30, "the resumed shard to register again")
        used = during.get(f"node_rpcs_{victim}", 0)
        wait_for(lambda: stats(served.address).get(f"node_rpcs_{victim}", 0) > used + 10, 30,
                 "the resumed shard to be probed back and used")
        load.served(20, 30, "requests served after the pause")
        after = stats(served.address)
    assert not load.errors, load.errors[:3]
    d = delta(before, during)
    print(f"while paused: {d}; whole test: {delta(before, after)}")
    assert d["lookup_hedges"] + d["lookup_failovers"] >= 1, d
    assert d["lookup_hedges"] <= HEDGE_BUDGET * d["lookup_rpcs"] + HEDGE_BURST, d


def test_kill_one_replica_loses_no_request(served, reference):  # noqa: F811
    victim = "shard-1"
    with ClosedLoop(served.address, reference, random_requests(40, seed=21)) as load:
        load.served(30, 30, "requests to flow")
        before = stats(served.address)
        killed_at = time.monotonic()
        served.shards[victim].kill()
        wait_for(lambda: stats(served.address)["view_live_nodes"] == NODES - 1, SESSION_TIMEOUT_S + 2.0,
                 "the killed shard to leave the frontend's view")
        left_after_s = time.monotonic() - killed_at
        load.served(30, 30, "requests served without the killed shard")
        after = stats(served.address)
    assert not load.errors, load.errors[:3]
    d = delta(before, after)
    print(f"left the view after {left_after_s:.2f}s; {load.done} requests; {d}")
    assert d["lookup_failovers"] >= 1 and d["lookup_ejections"] >= 1, d
    assert d["lookup_hedges"] <= HEDGE_BUDGET * d["lookup_rpcs"] + HEDGE_BURST, d


async def until(predicate, timeout_s: float, what: str) -> None:
    """``wait_for`` for a test running on an event loop: poll without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f}s waiting for {what}")
        await asyncio.sleep(0.005)


def test_refusals_are_rerouted_on_the_current_view(served, checkpoint):  # noqa: F811
    """A lookup client whose view is one shard map ahead of every shard (it saw a map they have
    not loaded yet): each replica answers FAILED_PRECONDITION, the batch is re-routed, and it
    completes, equal to the in-process lookup, once the map reaches the shards."""
    reader = CheckpointReader(checkpoint)
    version = reader.latest_version()
    rng = np.random.default_rng(4)

    def bags(rows: int, n: int) -> Bags:
        lengths = rng.integers(0, 6, size=n).astype(np.int32)
        return Bags(rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64), lengths)

    features = [
        FeatureLookup("item_id", "items", PoolingType.SUM, bags(5000, 64)),  # row-wise, 2 partitions
        FeatureLookup("item_tags", "tags", PoolingType.MEAN, bags(300, 64)),  # replicated
    ]

    async def main():
        loop = asyncio.get_running_loop()
        view = ClusterView(served.zk, served.paths, loop)
        await loop.run_in_executor(None, view.start_blocking)
        await view.wait_for(lambda v: v.shard_map is not None and len(v.nodes) == NODES, 30, "the view")
        dim = reader.manifest(version).model.dense_arch.embedding_dim
        client = GrpcLookupClient(view, ChannelPool(64 << 20), dim=dim, policy=ReplicaPolicy(hedge_budget=0.0))
        oracle = InprocLookupClient(reader, version)
        try:
            store = ShardMapStore(served.zk, served.paths)
            smap, znode_version = await loop.run_in_executor(None, store.read_active)
            ahead = dataclasses.replace(smap, version=smap.version + 1)
            view.shard_map = ahead  # as if its watch fired before the shards' did
            task = asyncio.ensure_future(client.lookup(features, version=version, timeout_s=10.0, request_id="reroute"))
            await until(lambda: client.stats.reroutes >= 2, 10, "both replicas of a partition to refuse")
            assert not task.done()
            await loop.run_in_executor(None, store.write_active, ahead, znode_version)
            got = await task
            want = await oracle.lookup(features, version=version, timeout_s=10.0, request_id="oracle")
            return got, want, client.stats
        finally:
            await client.close()
            await oracle.close()

    got, want, stats_ = asyncio.run(main())
    assert got.version == version
    for f in features:
        np.testing.assert_allclose(got.pooled[f.feature], want.pooled[f.feature], rtol=1e-5, atol=1e-6, err_msg=f.feature)
    assert stats_.reroutes >= 2 and stats_.failovers == 0 and stats_.ejections == 0, stats_
