"""Replica and ZooKeeper faults under load, while a closed-loop client runs: a replica killed
(kill -9) or paused (SIGSTOP), a shard restarted at once with its node id, a frontend's and a
shard's session expiring (SIGSTOP past the session timeout, then SIGCONT), ZooKeeper itself
frozen. Not one request may fail, no fault of ZooKeeper may change a readiness, and a view
ahead of the shards is re-routed (docs/failure-modes.md).

Real ZooKeeper, Redis, three shard processes where every partition has two replicas, and one
frontend (hedging and ejection at their defaults; 1 s sessions), one cluster for the module.
Every response is checked against ``core.reference`` (its scores computed once per distinct
request). Timed bounds are asserted with a 5x margin and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pytest

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc
from services.core.checkpoint.reader import CheckpointReader
from services.core.clients import make_channel
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import FrontendRecord, NodeRecord
from services.core.rpc.server import LIVENESS
from services.core.discovery.zk_paths import ZkPaths
from services.core.types import PoolingType
from services.frontend.batch import Bags
from services.frontend.lookup import FeatureLookup
from services.frontend.lookup.grpc.calls import ChannelPool
from services.frontend.lookup.grpc.client import GrpcLookupClient
from services.frontend.lookup.grpc.replicas import ReplicaPolicy
from services.frontend.lookup.inproc import InprocLookupClient
from services.frontend.view import ClusterView
from tests.e2e.test_recommend import check_response, checkpoint, features, random_requests, reference, stats  # noqa: F401
from tests.support.closed_loop import ClosedLoop
from tests.support.cluster import start_cluster, start_frontend, start_shard, zk_namespace
from tests.support.health import SERVING, HealthWatch, health
from tests.support.processes import ProcessFactory, ServiceProcess
from tests.support.servers import free_port
from tests.support.waiting import until, wait_for

SPEC = {
    "default": {"sharding": "replicated", "replicas": 2},
    "tables": {"items": {"sharding": "row_wise", "partitions": 2, "replicas": 2}},
}
NODES = 3
SESSION_TIMEOUT_S = 1.0  # the shards' and the frontend's (tests.support.cluster)
HEDGE_BUDGET, HEDGE_BURST = 0.05, 10  # the frontend's defaults (services.frontend.lookup.grpc.replicas)


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
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-faults"))
    with zk_namespace(zk_server.hosts, "f-") as (zk, paths):
        try:
            shards = start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, SPEC, NODES).processes
            address = start_frontend(spawn, zk_server.hosts, paths.cluster, *features)
            yield Served(address, zk, zk_server.hosts, paths, spawn, shards)
        finally:
            spawn.close()


@pytest.fixture
def served(cluster: Served) -> Served:
    """The module's cluster with every shard running (a killed one restarted) and in the
    frontend's view."""
    for node, proc in cluster.shards.items():
        if not proc.running:
            proc.close()
            cluster.shards[node] = start_shard(cluster.spawn, cluster.zk_hosts, cluster.paths.cluster, node)
    live_nodes(cluster.address, NODES, 60, f"all {NODES} shards in the frontend's view")
    return cluster


def live_nodes(address: str, n: int, timeout_s: float, what: str) -> None:
    """Wait until the frontend sees ``n`` shard nodes registered."""
    wait_for(lambda: stats(address)["view_live_nodes"] == n, timeout_s, what)


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


def answered(load: ClosedLoop) -> int:
    return sum(len(s) for s in load.seen)


def more_answers(load: ClosedLoop, n: int, timeout_s: float, what: str) -> None:
    target = answered(load) + n
    wait_for(lambda: answered(load) >= target or load.errors, timeout_s, what)


@contextlib.contextmanager
def under_load(served: Served, reference, seed: int):  # noqa: F811
    """A closed-loop client running, requests flowing; yields it and the frontend's counters
    before the fault. At exit: no request failed and every response equals the reference."""
    requests = random_requests(40, seed=seed)
    with ClosedLoop(served.address, requests) as load:
        more_answers(load, 30, 30, "requests to flow")
        yield load, stats(served.address)
    assert not load.errors, load.errors[:3]
    oracle = CachedReference(reference)
    for r in load.replies():
        check_response(oracle, requests[r.index], r.response)


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


def busiest_node(address: str, load: ClosedLoop, before: dict) -> str:
    """The node that got the most Lookups while 20 more requests were answered (the fault
    goes where the traffic is: choice by latency may leave a node idle for a while)."""
    more_answers(load, 20, 30, "requests to flow")
    d = delta(before, stats(address))
    return max((n for n in d if n.startswith("node_rpcs_")), key=d.get).removeprefix("node_rpcs_")


def test_paused_replica_is_hedged_around_and_probed_back(served, reference):  # noqa: F811
    with under_load(served, reference, seed=22) as (load, before):
        victim = busiest_node(served.address, load, before)
        before = stats(served.address)
        paused_at = time.monotonic()
        served.shards[victim].pause()
        try:
            live_nodes(served.address, NODES - 1, SESSION_TIMEOUT_S + 2.0, "the paused shard's session to expire")
            more_answers(load, 20, 30, "requests served while the shard is paused")
            # the fault lasts twice the session timeout, whatever the load did meanwhile
            wait_for(lambda: time.monotonic() - paused_at >= 2 * SESSION_TIMEOUT_S, 2 * SESSION_TIMEOUT_S + 1, "the pause to last")
            during = stats(served.address)
        finally:
            served.shards[victim].resume()
        live_nodes(served.address, NODES, 30, "the resumed shard to register again")
        used = during.get(f"node_rpcs_{victim}", 0)
        wait_for(lambda: stats(served.address).get(f"node_rpcs_{victim}", 0) > used + 10, 30,
                 "the resumed shard to be probed back and used")
        more_answers(load, 20, 30, "requests served after the pause")
        after = stats(served.address)
    d = delta(before, during)
    print(f"paused {victim}: {d}; whole test: {delta(before, after)}")
    assert d["lookup_hedge_wins"] + d["lookup_failovers"] + d["lookup_stall_retries"] >= 1, d
    assert d["lookup_hedges"] <= HEDGE_BUDGET * d["lookup_rpcs"] + HEDGE_BURST, d


def test_kill_one_replica_loses_no_request(served, reference):  # noqa: F811
    with under_load(served, reference, seed=21) as (load, before):
        victim = busiest_node(served.address, load, before)
        sent_before_kill = stats(served.address).get(f"node_rpcs_{victim}", 0)
        killed_at = time.monotonic()
        served.shards[victim].kill()
        live_nodes(served.address, NODES - 1, SESSION_TIMEOUT_S + 2.0, "the killed shard to leave the frontend's view")
        left_after_s = time.monotonic() - killed_at
        more_answers(load, 30, 30, "requests served without the killed shard")
        after = stats(served.address)
    d = delta(before, after)
    print(f"killed {victim}, it left the view after {left_after_s:.2f}s; {answered(load)} requests; {d}")
    if after.get(f"node_rpcs_{victim}", 0) > sent_before_kill:  # calls reached the dead node: each was failed over
        assert d["lookup_failovers"] + d["lookup_stall_retries"] + d["lookup_hedge_wins"] >= 1, d
    assert d["lookup_hedges"] <= HEDGE_BUDGET * d["lookup_rpcs"] + HEDGE_BURST, d


def test_refusals_are_rerouted_on_the_current_view(served, checkpoint):  # noqa: F811
    """A lookup client whose view is one shard map ahead of the shards: it routes ``tags`` to
    the one node that does not hold it yet. That node answers FAILED_PRECONDITION, the batch is
    re-routed (and waits, since the map names no other replica), and it completes, equal to the
    in-process lookup, once the map reaches ZooKeeper and the node has loaded the table live."""
    reader = CheckpointReader(checkpoint)
    version = reader.latest_version()
    rng = np.random.default_rng(4)

    def bags(rows: int, n: int) -> Bags:
        lengths = rng.integers(0, 6, size=n).astype(np.int32)
        return Bags(rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64), lengths)

    features = [
        FeatureLookup("item_id", "items", PoolingType.SUM, bags(5000, 64)),  # row-wise, 2 partitions
        FeatureLookup("item_tags", "tags", PoolingType.MEAN, bags(300, 64)),  # replicated on 2 of 3 nodes
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
            store = ClusterStore(served.zk, served.paths)
            smap, znode_version = await loop.run_in_executor(None, store.read_active)
            holders = set(smap.tables["tags"].partitions[0])
            newcomer = next(n for n in smap.nodes if n not in holders)
            tables = dict(smap.tables)
            tables["tags"] = dataclasses.replace(tables["tags"], partitions=((newcomer,),))
            ahead = dataclasses.replace(smap, version=smap.version + 1, tables=tables)
            view.shard_map = ahead  # as if its watch fired before the shards' did
            task = asyncio.ensure_future(client.lookup(features, version=version, timeout_s=20.0, request_id="reroute"))
            await until(lambda: client.stats.reroutes >= 1, 10, f"{newcomer} to refuse tags, which it does not hold")
            assert not task.done()
            await loop.run_in_executor(None, store.write_active, ahead, znode_version)  # it loads tags live
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
    assert stats_.reroutes >= 1 and stats_.failovers == 0 and stats_.ejections == 0, stats_


# ---- ZooKeeper sessions (docs/zookeeper.md, "Sessions, expiry and outages") ----------------------

RECOMMENDER, EMBEDDING_SHARD = "shardrec.v1.Recommender", "shardrec.v1.EmbeddingShard"
MARGIN = 5  # timed bounds: the target times this


def node_record(served: Served, node: str) -> NodeRecord:
    return NodeRecord.from_bytes(served.zk.get(served.paths.node(node))[0])


def log_time(log: str, marker: str) -> float:
    """The wall-clock time (``time.time()``) of the first log line containing ``marker``."""
    for line in log.splitlines():
        if marker in line:
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ", line)
            if stamp:
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise AssertionError(f"no log line with {marker!r}")


def lookups_served(address: str) -> int:
    with make_channel(address, aio=False) as ch:
        d = embedding_pb2_grpc.EmbeddingShardStub(ch).Describe(embedding_pb2.DescribeRequest(), timeout=2)
    return sum(p.lookups for p in d.partitions)


def frontend(served: Served):
    return next(p for p in served.spawn.processes if p.name == "frontend" and p.running)


def health_targets(served: Served) -> dict[str, tuple[str, str]]:
    """The readiness of the frontend and of every shard."""
    targets = {"frontend": (served.address, RECOMMENDER)}
    for node in served.shards:
        targets[node] = (node_record(served, node).address, EMBEDDING_SHARD)
    return targets


def test_shard_restarted_with_its_node_id_serves_within_2s_of_loaded(served, reference):  # noqa: F811
    """kill -9, then the same node id at once on the same address. The old znode lives as long
    as the dead process's session (30 s here); the new process takes it over as soon as it is
    loaded, since the address recorded there answers as another instance (itself)."""
    node = sorted(served.shards)[-1]
    port = free_port()
    before = node_record(served, node).instance_id
    served.shards[node].kill()  # its first life: a 30 s session, on a fixed port
    served.shards[node] = start_shard(served.spawn, served.zk_hosts, served.paths.cluster, node, "--port", str(port),
                                      "--session-timeout-s", "30")
    first = wait_for(lambda: (r := node_record(served, node)).instance_id != before and r, 60, f"{node}'s first life to register")
    live_nodes(served.address, NODES, 60, f"{node} back in the frontend's view")
    with under_load(served, reference, seed=31) as (load, _before):
        served.shards[node].kill()
        served.shards[node] = start_shard(served.spawn, served.zk_hosts, served.paths.cluster, node, "--port", str(port))
        fresh = wait_for(lambda: (r := node_record(served, node)).instance_id not in ("", first.instance_id) and r, 60,
                         f"{node} to register as a new instance")
        wait_for(lambda: lookups_served(fresh.address) > 0, 30, f"the new {node} to serve Lookups")
        served_at = time.time()
        more_answers(load, 20, 30, "requests after the restart")
    log = served.shards[node].log_text()
    loaded_at = log_time(log, "ready: every condition holds")
    registered_s = log_time(log, "registered /") - loaded_at
    serving_s = served_at - loaded_at
    print(f"restarted {node}: registered {registered_s * 1e3:.0f} ms and served Lookups {serving_s * 1e3:.0f} ms after it was "
          f"loaded (its predecessor's session: 30 s)")
    assert "taking over the znode of session" in log, "the new process waited for the old session instead of probing it"
    assert registered_s < 2.0 * MARGIN and serving_s < 2.0 * MARGIN


def test_frontend_session_expiry_fails_no_request(served, reference):  # noqa: F811
    fe = frontend(served)
    (fe_id,) = served.zk.get_children(served.paths.frontends)
    path = served.paths.frontend(fe_id)
    record = FrontendRecord.from_bytes(served.zk.get(path)[0])
    old_session = served.zk.exists(path).ephemeralOwner
    with HealthWatch(health_targets(served)) as watch, under_load(served, reference, seed=32) as (load, _before):
        fe.pause()
        try:
            wait_for(lambda: not served.zk.exists(path), SESSION_TIMEOUT_S + 10, "the paused frontend's session to expire")
        finally:
            fe.resume()
        resumed = time.monotonic()
        wait_for(lambda: (st := served.zk.exists(path)) and st.ephemeralOwner != old_session, 10 * MARGIN,
                 "the frontend to register again under a new session")
        back_s = time.monotonic() - resumed
        assert FrontendRecord.from_bytes(served.zk.get(path)[0]).instance_id == record.instance_id
        more_answers(load, 30, 30, "requests after the frontend resumed")
        assert stats(served.address)["view_live_nodes"] == NODES, "the view emptied itself"
    print(f"frontend {fe_id} registered again {back_s * 1e3:.0f} ms after SIGCONT")
    assert not watch.not_serving() and not watch.errors, (watch.not_serving(), watch.errors)
    assert back_s < SESSION_TIMEOUT_S * MARGIN


def test_shard_session_expiry_fails_no_request(served, reference):  # noqa: F811
    node = sorted(served.shards)[0]
    path = served.paths.node(node)
    record = node_record(served, node)
    old_session = served.zk.exists(path).ephemeralOwner
    with HealthWatch(health_targets(served)) as watch, under_load(served, reference, seed=33) as (load, _before):
        served.shards[node].pause()
        try:
            wait_for(lambda: not served.zk.exists(path), SESSION_TIMEOUT_S + 10, f"the paused {node}'s session to expire")
            live_nodes(served.address, NODES - 1, 10, f"{node} to leave the frontend's view")
        finally:
            served.shards[node].resume()
        resumed = time.monotonic()
        wait_for(lambda: (st := served.zk.exists(path)) and st.ephemeralOwner != old_session, 10 * MARGIN,
                 f"{node} to register again under a new session")
        back_s = time.monotonic() - resumed
        assert node_record(served, node).instance_id == record.instance_id
        live_nodes(served.address, NODES, 10, f"{node} back in the frontend's view")
        used = lookups_served(record.address)
        wait_for(lambda: lookups_served(record.address) > used, 30, f"{node} to serve Lookups again")
        more_answers(load, 30, 30, "requests after the shard resumed")
    print(f"{node} registered again {back_s * 1e3:.0f} ms after SIGCONT")
    assert not watch.not_serving() and not watch.errors, (watch.not_serving(), watch.errors)
    assert back_s < SESSION_TIMEOUT_S * MARGIN


def test_zookeeper_outage_changes_no_readiness_and_fails_no_request(served, reference, zk_server):  # noqa: F811
    """ZooKeeper frozen for 3 s (three session timeouts): every process sees its connection
    SUSPENDED, then, once it resumes, its session expire; all register again. Meanwhile they
    serve from their last view: no readiness changes and no request fails."""
    members = {served.paths.node(n) for n in served.shards} | {served.paths.frontend(f) for f in served.zk.get_children(served.paths.frontends)}
    sessions = {p: served.zk.exists(p).ephemeralOwner for p in members}
    with HealthWatch(health_targets(served)) as watch, under_load(served, reference, seed=34) as (load, _before):
        zk_server.pause()
        paused_at = time.monotonic()
        try:
            more_answers(load, 20, 30, "requests served while ZooKeeper is frozen")
            wait_for(lambda: time.monotonic() - paused_at >= 3 * SESSION_TIMEOUT_S, 3 * SESSION_TIMEOUT_S + 1, "the outage to last")
        finally:
            zk_server.resume()
        resumed = time.monotonic()

        wait_for(lambda: all(served.zk.exists(p) for p in members), 10 * MARGIN, "every member registered after the outage")
        live_nodes(served.address, NODES, 10, "every shard in the frontend's view")
        more_answers(load, 30, 30, "requests after the outage")
        renewed = sum(served.zk.exists(p).ephemeralOwner != sessions[p] for p in members)
    print(f"ZooKeeper frozen {resumed - paused_at:.1f}s: {renewed}/{len(members)} members registered again under a new "
          f"session; {sum(len(s) for s in load.seen)} requests, none failed")
    assert not watch.not_serving() and not watch.errors, (watch.not_serving(), watch.errors)
    assert health(served.address, LIVENESS) == health(served.address, "") == SERVING
