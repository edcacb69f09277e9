"""Live rebalancing against real ZooKeeper and real shard processes: shards follow the target
map while serving, ``apply_plan`` (``shardrec rebalance apply``) switches only when the target
is ready, and a killed CLI, a killed new owner or a stale plan leave a cluster serving on a
valid map.

Expected values come from ``core.reference.ReferenceModel``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from services._proto.shardrec.v1 import embedding_pb2_grpc
from services.control.rebalance import abort_rebalance, apply_plan, plan_rebalance, read_status
from services.control.rebalance_report import format_status
from services.core import wire
from services.core.checkpoint.reader import CheckpointReader
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import FailedPreconditionError
from services.core.placement import PlannerConfig, ShardMap, TablePlacementSpec
from services.core.rebalance import PlanRequest, RebalancePlan, plan_target
from services.core.reference import ReferenceModel
from services.core.synth import synthesize
from services.core.types import PartitionId, PoolingType
from tests.integration.test_shard import request
from tests.integration.test_shard_versions import _delta
from tests.support.cluster import ShardCluster, start_cluster, start_shard, wait_registered
from tests.support.waiting import wait_for

RTOL, ATOL = 1e-5, 1e-6
# Every partition on 2 of the 3 nodes, so any one node can die.
SPEC = {
    "default": {"sharding": "replicated", "replicas": 2},
    "tables": {
        "users": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
        "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
    },
}
# users/0of1 (128 KB) takes ~2 s to load at this rate: a move spans seconds of traffic.
SLOW = 64_000


def pin(table: str, sharding: str, **shape) -> tuple[str, TablePlacementSpec]:
    """A table's pin, as ``rebalance plan --set TABLE=SHARDING[:...]`` gives it."""
    return table, TablePlacementSpec.from_json(table, {"sharding": sharding, **shape})


@dataclass
class Live:
    """A 3-node cluster in a fresh namespace and what the tests ask of it."""

    zk: object
    paths: ZkPaths
    hosts: str
    spawn: object
    cluster: ShardCluster
    root: str

    @property
    def store(self) -> ClusterStore:
        return ClusterStore(self.zk, self.paths)

    def znode(self, node: str) -> dict:
        return json.loads(self.zk.get(self.paths.node(node))[0])

    def held(self, node: str) -> set[str]:
        return set(self.znode(node)["held"])

    def plan(self, tmp_path, name: str, request: PlanRequest) -> str:
        """``rebalance plan``: the plan file written."""
        out = str(tmp_path / f"{name}.json")
        plan_rebalance(self.store, request).plan.save(out)
        return out

    def apply(self, plan: str, timeout_s: float = 600.0) -> bool:
        """``rebalance apply PLAN --yes``: True once the plan's map is the active one."""
        return apply_plan(self.store, RebalancePlan.load(plan), timeout_s=timeout_s)

    def status(self) -> str:
        """The report of ``rebalance status``."""
        return format_status(read_status(self.store))

    def start(self, node: str, *extra: str):
        proc = start_shard(self.spawn, self.hosts, self.paths.cluster, node, *extra)
        self.cluster.processes[node] = proc
        self.cluster.addresses[node] = wait_registered(self.zk, self.paths, node)["address"]
        return proc


def shard_args(rate: int = SLOW, drain_s: float = 0.5) -> tuple[str, ...]:
    return ("--load-rate-bytes-s", str(rate), "--partition-drain-s", str(drain_s), "--stats-interval-s", "1")


@pytest.fixture
def live(zk_server, spawn, small_checkpoint):
    paths = ZkPaths("rb-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    try:
        cluster = start_cluster(zk, paths, spawn, zk_server.hosts, small_checkpoint, SPEC, 3, *shard_args())
        yield Live(zk, paths, zk_server.hosts, spawn, cluster, small_checkpoint)
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def lookup(address: str, pid: PartitionId, rows: int, *, map_version: int, version: int = 0, seed: int = 0):
    """Pool random bags of ``pid``'s rows on the node at ``address``: (ids, lengths, pooled)."""
    rng = np.random.default_rng(seed)
    members = np.arange(pid.partition, rows, pid.num_partitions)
    lengths = rng.integers(1, 5, size=20).astype(np.int32)
    ids = rng.choice(members, size=int(lengths.sum())).astype(np.int64)
    with grpc.insecure_channel(address) as ch:
        stub = embedding_pb2_grpc.EmbeddingShardStub(ch)
        req = request([(pid.table, pid.partition, PoolingType.SUM, ids, lengths, None)], shard_map_version=map_version, version=version)
        resp = stub.Lookup(req, timeout=10)
    return ids, lengths, wire.decode(resp.results[0].pooled, "pooled", dtype="float32", ndim=2)


def check_lookup(ref: ReferenceModel, address: str, pid: PartitionId, *, map_version: int, version: int = 0) -> None:
    rows = ref.spec.table(pid.table).rows
    ids, lengths, got = lookup(address, pid, rows, map_version=map_version, version=version)
    np.testing.assert_allclose(got, ref.pool(pid.table, ids, lengths, PoolingType.SUM), rtol=RTOL, atol=ATOL, err_msg=f"{pid} at {address}")


def target_of(live: Live, *sets: tuple[str, TablePlacementSpec]) -> ShardMap:
    """The map ``rebalance plan --set ...`` would make, built in process."""
    active, _ = live.store.read_active()
    tables = list(CheckpointReader(live.root).manifest(1).model.tables)
    request = PlanRequest(sets=sets)
    return plan_target(active, tables, {}, request, node_memory_bytes=1 << 36, config=PlannerConfig(replicate_max_bytes=1 << 20))


def test_stale_plan_is_refused_and_apply_is_idempotent(live, tmp_path, capsys):
    a = live.plan(tmp_path, "a", PlanRequest(sets=(pin("tags", "replicated"),)))
    b = live.plan(tmp_path, "b", PlanRequest(sets=(pin("countries", "table_wise", replicas=1),)))
    assert live.apply(a)
    assert "switched: the active shard map is version 2" in capsys.readouterr().out
    assert live.apply(a)  # again: nothing to do
    assert "already applied" in capsys.readouterr().out
    with pytest.raises(FailedPreconditionError, match="stale plan: it was made against shard map version 1, the active map is version 2"):
        live.apply(b)
    active, _ = live.store.read_active()
    assert active.version == 2 and active.to_json() == RebalancePlan.load(a).target.to_json()
    assert live.store.read_target() is None


def test_apply_resumes_after_the_cli_is_killed_mid_move(live, tmp_path, capsys):
    plan = live.plan(tmp_path, "p", PlanRequest(sets=(pin("users", "replicated"),)))  # users/0of1 on every node, ~2 s each
    proc = live.spawn("rebalance", "apply", plan, "--yes", "--zk", live.hosts, "--cluster", live.paths.cluster, name="apply")
    wait_for(lambda: live.store.read_target() is not None, 30, "the CLI to write the target")
    wait_for(lambda: any(live.znode(n)["partitions_loading"] for n in live.cluster.smap.nodes), 30, "a node to load for the target")
    proc.kill()  # kill -9 mid-move
    assert proc.returncode == -9
    active, _ = live.store.read_active()
    assert active.version == 1, "the active map switched before the target was ready"
    assert "rebalancing to version 2" in live.status()
    assert live.apply(plan)
    out = capsys.readouterr().out
    assert "resuming" in out and "switched: the active shard map is version 2" in out
    ref = ReferenceModel(live.root, 1)
    users = PartitionId("users", 0, 1)
    for node, address in live.cluster.addresses.items():
        assert str(users) in live.held(node)
        check_lookup(ref, address, users, map_version=2)
    for node in live.cluster.smap.nodes:  # the old row-wise users partitions go after the drain
        wait_for(lambda n=node: not any(h.startswith("users/") and h != str(users) for h in live.held(n)), 30, f"{node} to drop users/*of2")
    assert "no rebalance in progress" in live.status()


def test_abort_after_a_new_owner_was_killed(live, tmp_path, capsys):
    slow = live.start("shard-3", *shard_args(rate=8_000))  # a new node: 16 s for users/0of1
    plan = live.plan(tmp_path, "p", PlanRequest(add_nodes=1, sets=(pin("users", "replicated"),)))
    assert "shard-3" in RebalancePlan.load(plan).target.tables["users"].partitions[0]
    assert not live.apply(plan, timeout_s=1)
    out = capsys.readouterr().out
    assert "timed out after 1s" in out and "users/0of1 on shard-3: loading" in out
    slow.kill()
    wait_for(lambda: not live.zk.exists(live.paths.node("shard-3")), 15, "shard-3's znode to expire")
    assert not live.apply(plan, timeout_s=0.5)
    assert "users/0of1 on shard-3: down" in capsys.readouterr().out
    active, aborted = abort_rebalance(live.store)
    assert aborted is not None and (aborted.version, active.version) == (2, 1)
    assert live.store.read_target() is None
    active, _ = live.store.read_active()
    assert active.version == 1
    ref = ReferenceModel(live.root, 1)
    for node in active.nodes:  # what they loaded for the target goes; what the active map gives them stays
        want = {str(p) for p in active.partition_ids_of(node)}
        wait_for(lambda n=node: live.held(n) == want, 30, f"{node} to hold only its active partitions")
        for pid in active.partition_ids_of(node):
            check_lookup(ref, live.cluster.addresses[node], pid, map_version=1)


def test_a_shard_serves_old_and_new_map_versions_during_a_move_then_drops_after_the_drain(zk_server, spawn, small_checkpoint):
    """users goes from row_wise(2) to whole on every node: a node holding users/0of2 and
    users/0of1 answers requests routed with either map; after the switch the old partition
    stays for the drain period, then goes (requests routed with the old map are then served from
    the whole table)."""
    drain_s = 2.0
    paths = ZkPaths("rb-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    try:
        cluster = start_cluster(zk, paths, spawn, zk_server.hosts, small_checkpoint, SPEC, 3, *shard_args(drain_s=drain_s))
        live = Live(zk, paths, zk_server.hosts, spawn, cluster, small_checkpoint)
        target = target_of(live, pin("users", "replicated"))
        old, new = PartitionId("users", 0, 2), PartitionId("users", 0, 1)
        node = cluster.smap.tables["users"].partitions[0][0]
        address = cluster.addresses[node]
        ref = ReferenceModel(small_checkpoint, 1)
        target_zv = live.store.write_target(target, None)
        d = wait_for(lambda: z if str(new) in (z := live.znode(node))["held"] else None, 30, f"{node} to load {new}")
        assert str(old) in d["held"] and d["target_map_version"] == 2 and d["map_version"] == 1
        for map_version in (1, 2):  # routed with the old map and with the new one, both served
            check_lookup(ref, address, old, map_version=map_version)
            check_lookup(ref, address, new, map_version=map_version)
            check_lookup(ref, address, PartitionId("users", 1, 2), map_version=map_version)  # from users/0of1
        wait_for(lambda: all(str(new) in live.held(n) for n in cluster.smap.nodes), 30, "every node to load users/0of1")
        _, active_zv = live.store.read_active()
        live.store.promote_target(target, active_zv, target_zv)
        switched = time.monotonic()
        d = wait_for(lambda: z if (z := live.znode(node))["map_version"] == 2 else None, 10, f"{node} to follow map 2")
        assert str(old) in d["held"] and str(old) in d["partitions_draining"] and d["partitions"] == sorted(d["partitions"])
        check_lookup(ref, address, old, map_version=1)  # still served while draining
        wait_for(lambda: str(old) not in live.held(node), drain_s + 10, f"{node} to drop {old}")
        assert time.monotonic() - switched >= drain_s - 0.2
        check_lookup(ref, address, old, map_version=1)
        check_lookup(ref, address, new, map_version=2)
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def test_a_delta_published_during_a_move_is_served_at_every_version(zk_server, spawn, tmp_path):
    """Version 2 is published while the nodes load two partitions each for the target (items
    then users, whole): the first is added at version 1 and moved to 2 with the others, the
    second is read at both (full rows at 2, version 1's differing rows as an overlay). Every
    partition ends up held at every version, each equal to the reference at it."""
    root = str(tmp_path / "ckpt")
    synthesize(root, "small", seed=9)
    paths = ZkPaths("rb-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    try:
        cluster = start_cluster(zk, paths, spawn, zk_server.hosts, root, SPEC, 3, *shard_args(), "--version-drain-s", "60")
        live = Live(zk, paths, zk_server.hosts, spawn, cluster, root)
        target = target_of(live, pin("users", "replicated"), pin("items", "replicated"))
        new = PartitionId("users", 0, 1)
        live.store.write_target(target, None)
        wait_for(lambda: any(live.znode(n)["partitions_loading"] for n in cluster.smap.nodes), 30, "a node to load for the target")
        _delta(root, 2, 1, seed=2)
        live.store.write_target_version(2)
        for node in cluster.smap.nodes:
            wait_for(lambda n=node: str(new) in (z := live.znode(n))["held"] and z["versions_ready"] == [1, 2], 60, f"{node}: {new} at 1 and 2")
        refs = {v: ReferenceModel(root, v) for v in (1, 2)}
        for node, address in cluster.addresses.items():
            for v, ref in refs.items():
                for pid in (new, PartitionId("items", 0, 1), *cluster.smap.partition_ids_of(node)):
                    check_lookup(ref, address, pid, map_version=2, version=v)
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()
