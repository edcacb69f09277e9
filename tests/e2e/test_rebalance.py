"""Live rebalancing under load: a cluster moves 3 -> 4 nodes, makes a row-wise table whole on
every node, then goes back to 3 nodes, while a closed-loop client sends Recommend calls.

Real ZooKeeper, Redis, shard processes (loading throttled, so every move spans seconds of
traffic; a partition no map gives its node any more drops after a short drain) and a frontend.
During the last move the frontend's ZooKeeper notifications lag (``tests.support.zk_lag``, as
behind a lagging follower) past the drain, so it keeps routing with the old map after the
removed node dropped its rows: it gets FAILED_PRECONDITION and re-routes to the replicas that
kept them. Every response must equal ``core.reference.ReferenceRecommender``, none may fail,
and re-routes must have happened.
"""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from services.control.features import load_features
from services.control.rebalance import apply_plan, plan_rebalance, read_overview
from services.control.rebalance_report import format_show
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.placement import PlannerConfig, TablePlacementSpec, diff
from services.core.rebalance import PlanRequest, RebalancePlan
from services.core.types import PartitionId
from tests.e2e.test_recommend import check_response, random_requests, stats
from tests.support.closed_loop import ClosedLoop
from tests.support.cluster import LENIENT_ADMISSION, start_cluster, start_shard, wait_registered
from tests.support.waiting import wait_for
from tests.support.zk_lag import NotificationLag

# Every partition on 2 nodes; users and items row-wise.
SPEC = {
    "default": {"sharding": "replicated", "replicas": 2},
    "tables": {
        "users": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
        "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
    },
}
LOAD_RATE_BYTES_S = 40_000  # items/<p>of2 (160 KB) in 4 s, users/0of1 (128 KB) in 3.2 s
DRAIN_S = 0.5
SHARD_ARGS = ("--load-rate-bytes-s", str(LOAD_RATE_BYTES_S), "--partition-drain-s", str(DRAIN_S), "--stats-interval-s", "1")
CLIENTS = 3
MIN_MOVE_S = 2.0


class CachedReference:
    """``ReferenceRecommender.scores`` once per request (requests repeat; the cluster serves
    one version throughout)."""

    def __init__(self, reference) -> None:
        self._reference = reference
        self._scores: dict[str, np.ndarray] = {}

    def scores(self, user_id, candidates, dense, overrides) -> np.ndarray:
        key = repr((user_id, candidates, sorted(dense.items()), sorted(overrides.items())))
        if key not in self._scores:
            self._scores[key] = self._reference.scores(user_id, candidates, dense, overrides)
        return self._scores[key]


def only_drops_on(node: str, old, new, tables) -> bool:
    """Going from ``old`` to ``new``, only ``node`` frees partitions, and every one of them keeps
    a replica that held it."""
    drops = [m for m in diff(old, new, tables) if m.kind.value == "drop"]
    return all(m.node_id == node for m in drops) and all(
        any(r != node for r in old.replicas(PartitionId(m.table, m.partition, m.num_partitions).key)) for m in drops
    )


@pytest.fixture
def live(zk_server, redis_server, spawn, small_checkpoint):
    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    load_features(small_checkpoint, redis_server.url, prefix=prefix)
    paths = ZkPaths("rb-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    lag = NotificationLag(zk_server.hosts)
    try:
        start_cluster(zk, paths, spawn, zk_server.hosts, small_checkpoint, SPEC, 3, *SHARD_ARGS)
        fe = spawn(
            "frontend", "serve", "--zk", lag.hosts, "--cluster", paths.cluster, "--redis", redis_server.url,
            "--redis-prefix", prefix, "--max-wait-ms", "5", "--session-timeout-s", "1.0", "--default-timeout-ms", "5000", *LENIENT_ADMISSION,
            name="frontend",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        yield zk, paths, zk_server.hosts, spawn, line.split()[2], lag
    finally:
        lag.close()
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def test_live_rebalance_under_load_fails_no_request(live, small_reference, tmp_path, capsys):
    zk, paths, hosts, spawn, address, lag = live
    store = ClusterStore(zk, paths)
    requests = random_requests(60, seed=17)

    def measured() -> bool:  # every node holding something reports its ids/s: the planner sees real load
        nodes = store.live_nodes()
        return all(any(h.ids_per_s > 0 for h in d.held.values()) for d in nodes.values() if d.held)

    moves: list[tuple[str, float, float]] = []

    def plan(name: str, request: PlanRequest, config: PlannerConfig | None = None) -> str:
        """``rebalance plan``: the plan file written."""
        out = str(tmp_path / f"{name}.json")
        plan_rebalance(store, request, config=config).plan.save(out)
        return out

    def loads(out: str) -> int:
        """Bytes the plan's nodes load."""
        active, _ = store.read_active()
        target = RebalancePlan.load(out).target
        return sum(m.size_bytes for m in diff(active, target, small_reference.spec.tables) if m.kind.value == "add")

    def move(name: str, request: PlanRequest | None = None, out: str | None = None) -> None:
        out = out or plan(name, request)
        t0 = time.monotonic()
        assert apply_plan(store, RebalancePlan.load(out), timeout_s=60)
        moves.append((name, t0, time.monotonic()))
        active, _ = store.read_active()
        assert active.to_json() == RebalancePlan.load(out).target.to_json()
        print(capsys.readouterr().out)

    with ClosedLoop(address, requests, CLIENTS) as load:
        wait_for(lambda: len(load.replies()) >= 20 and measured(), 60, "traffic and measured load on every node")
        steady = time.monotonic()
        wait_for(lambda: time.monotonic() - steady >= 2.0, 5, "2 s of steady traffic")
        shard3 = start_shard(spawn, hosts, paths.cluster, "shard-3", *SHARD_ARGS)
        wait_registered(zk, paths, "shard-3")
        print(format_show(paths.cluster, read_overview(store)))
        move("add", PlanRequest(add_nodes=1))
        wait_for(measured, 30, "measured load on the new node")
        move("flip", PlanRequest(sets=(("users", TablePlacementSpec.from_json("users", {"sharding": "replicated"})),)))
        # Back to 3 nodes: only the removed node's partitions move (a wide load tolerance: no
        # balancing), so a frontend routing with the old map finds every other replica in place.
        # Remove the node whose partitions take longest to place elsewhere.
        active, _ = store.read_active()
        wide = PlannerConfig(replicate_max_bytes=1 << 20, load_tolerance=0.9)
        plans = {n: plan(f"remove-{n}", PlanRequest(remove_nodes=(n,)), wide) for n in active.nodes}
        for node, out in plans.items():
            assert only_drops_on(node, active, RebalancePlan.load(out).target, small_reference.spec.tables), node
        gone = max(plans, key=lambda node: loads(plans[node]))
        before = stats(address)["lookup_reroutes"]
        with lag.hold():  # the frontend learns of the switch late: it routes to the dropped rows
            move("remove", out=plans[gone])
            wait_for(lambda: stats(address)["lookup_reroutes"] > before, 10, "the frontend to re-route from dropped rows")
        wait_for(lambda: not json.loads(zk.get(paths.node(gone))[0])["held"], 30, f"{gone} to drop everything")
        after = time.monotonic()
        wait_for(lambda: len(load.sent_between(after, float("inf"))) >= 20, 30, "traffic on the final map")
    shard3.terminate()
    counters = stats(address)
    print(f"{len(load.replies())} responses, {len(load.errors)} errors, reroutes {counters['lookup_reroutes']}, failovers {counters['lookup_failovers']}")
    assert not load.errors, [f"{e.code()}: {e.details()}" for e in load.errors[:3]]
    for name, t0, t1 in moves:
        assert t1 - t0 >= MIN_MOVE_S, f"move {name!r} took {t1 - t0:.2f}s: too short to span traffic"
        assert len(load.sent_between(t0, t1)) >= 10, f"too little traffic during {name!r}"
    assert counters["lookup_reroutes"] >= 1, counters
    replies = load.replies()
    assert {r.response.shard_map_version for r in replies} == {1, 2, 3, 4}
    reference = CachedReference(small_reference)
    for r in replies:
        check_response(reference, requests[r.index], r.response)
    steady_p99, n0 = load.p99_ms(steady, moves[0][1])
    report = [f"steady p99 {steady_p99:.1f} ms ({n0} requests)"]
    for name, t0, t1 in moves:
        p99, n = load.p99_ms(t0, t1)
        report.append(f"{name}: {t1 - t0:.1f}s, p99 {p99:.1f} ms ({n} requests)")
    print("; ".join(report))
