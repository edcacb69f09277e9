"""Embedding shard processes over real gRPC and a real ZooKeeper, against the reference path."""

from __future__ import annotations

import threading
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2
from services.core import sharding, wire
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.zk_paths import ZkPaths
from services.core.types import PoolingType
from tests.support.cluster import start_cluster, start_shard, wait_registered
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

RTOL, ATOL = 1e-5, 1e-6
MAX_IDS = 50_000
SPEC = {
    "default": {"sharding": "replicated", "replicas": "all"},
    "tables": {
        "users": {"sharding": "row_wise", "partitions": 3, "replicas": 1},
        "items": {"sharding": "row_wise", "partitions": 2, "replicas": 2},
        "tags": {"sharding": "table_wise"},
        "item_categories": {"sharding": "replicated", "replicas": 2},
    },
}
POOLING = {PoolingType.SUM: embedding_pb2.POOLING_SUM, PoolingType.MEAN: embedding_pb2.POOLING_MEAN, PoolingType.MAX: embedding_pb2.POOLING_MAX}


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def reference(small_reference):
    return small_reference.model


@pytest.fixture(scope="module")
def env(zk_server, tmp_path_factory, checkpoint):
    """One shard cluster (3 nodes, mixed placement) shared by the tests of this module."""
    zk_server.ensure_running()
    paths = ZkPaths("t-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs"))
    try:
        cluster = start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, SPEC, 3, "--max-ids", str(MAX_IDS))
        channels = {n: grpc.insecure_channel(a) for n, a in cluster.addresses.items()}
        stubs = {n: embedding_pb2_grpc.EmbeddingShardStub(c) for n, c in channels.items()}
        yield zk, paths, spawn, cluster, stubs
        for c in channels.values():
            c.close()
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def request(groups, **kw) -> embedding_pb2.LookupRequest:
    """groups: (table, partition, pooling, ids, lengths, weights | None)."""
    req = embedding_pb2.LookupRequest(request_id="test", **kw)
    for table, partition, pooling, ids, lengths, weights in groups:
        g = req.groups.add(table=table, partition=partition, pooling=POOLING[pooling])
        wire.encode(np.asarray(ids, np.int64), g.ids)
        wire.encode(np.asarray(lengths, np.int32), g.lengths)
        if weights is not None:
            wire.encode(np.asarray(weights, np.float32), g.weights)
    return req


def random_bags(rng, candidates: np.ndarray, bags: int, max_len: int):
    """Bags over ``candidates`` (sorted row ids): an empty bag, the first and last row included."""
    lengths = rng.integers(0, max_len + 1, size=bags).astype(np.int32)
    lengths[0], lengths[1] = 0, max(2, lengths[1])
    ids = rng.choice(candidates, size=int(lengths.sum()))
    ids[0], ids[1] = candidates[0], candidates[-1]
    return ids.astype(np.int64), lengths


CASES = [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.MAX, False), (PoolingType.SUM, True)]


@pytest.mark.parametrize("pooling, weighted", CASES, ids=["sum", "mean", "max", "weighted-sum"])
def test_every_partition_matches_reference(env, reference, pooling, weighted):
    """Each partition, on each of its replicas, pools exactly as the reference does."""
    _, _, _, cluster, stubs = env
    rng = np.random.default_rng(11)
    checked = 0
    for table, tp in cluster.smap.tables.items():
        rows = reference.spec.table(table).rows
        for p, replicas in enumerate(tp.partitions):
            members = np.arange(p, rows, tp.num_partitions)
            ids, lengths = random_bags(rng, members, 40, 7)
            weights = rng.random(len(ids)).astype(np.float32) if weighted else None
            want = reference.pool(table, ids, lengths, pooling, weights)
            for node in replicas:
                resp = stubs[node].Lookup(request([(table, p, pooling, ids, lengths, weights)]), timeout=10)
                got = wire.decode(resp.results[0].pooled, "pooled", dtype="float32", ndim=2)
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{table}/{p} on {node}")
                np.testing.assert_array_equal(wire.decode(resp.results[0].counts, "counts", dtype="int32", ndim=1), lengths)
                checked += 1
    assert checked >= 10


@pytest.mark.parametrize("pooling", list(PoolingType))
def test_row_wise_bags_split_and_merged_match_reference(env, reference, pooling):
    """Whole bags over a row-wise table: split by partition, one Lookup per node, merged."""
    _, _, _, cluster, stubs = env
    rng = np.random.default_rng(5)
    for table in ("users", "items"):
        tp = cluster.smap.tables[table]
        ids, lengths = random_bags(rng, np.arange(reference.spec.table(table).rows), 60, 9)
        partials = []
        for sub in sharding.split_bags(ids, lengths, tp.num_partitions):
            node = tp.partitions[sub.partition][0]
            req = request([(table, sub.partition, sharding.partial_pooling(pooling), sub.ids, sub.lengths, None)])
            res = stubs[node].Lookup(req, timeout=10).results[0]
            partials.append((wire.decode(res.pooled, "p", dtype="float32", ndim=2), wire.decode(res.counts, "c", dtype="int32", ndim=1)))
        got = sharding.merge_partials(partials, pooling)
        np.testing.assert_allclose(got, reference.pool(table, ids, lengths, pooling), rtol=RTOL, atol=ATOL)


def test_float16_output(env, reference):
    _, _, _, cluster, stubs = env
    node = cluster.smap.tables["countries"].partitions[0][0]
    ids, lengths = np.array([0, 1, 2], np.int64), np.array([2, 1], np.int32)
    resp = stubs[node].Lookup(request([("countries", 0, PoolingType.SUM, ids, lengths, None)], output_dtype=tensor_pb2.DTYPE_FLOAT16), timeout=10)
    got = wire.decode(resp.results[0].pooled, "pooled", dtype="float16", ndim=2)
    np.testing.assert_allclose(got.astype(np.float32), reference.pool("countries", ids, lengths, PoolingType.SUM), rtol=1e-3, atol=1e-3)


def _bad_requests(cluster):
    """(name, request, expected code, message fragment): every bad input the shard must refuse."""
    users = cluster.smap.tables["users"]
    node = users.partitions[0][0]
    not_held = next(p for p, r in enumerate(users.partitions) if node not in r)
    ok = ("users", 0, PoolingType.SUM, [0, 3], [2], None)
    short = request([ok])
    short.groups[0].ids.data = short.groups[0].ids.data[:-4]
    bad_dtype = request([ok])
    bad_dtype.groups[0].lengths.dtype = tensor_pb2.DTYPE_INT64
    IA, FP, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED
    return node, [
        ("unknown table", request([("nope", 0, PoolingType.SUM, [0], [1], None)]), IA, "unknown table 'nope'"),
        ("partition out of range", request([("users", 7, PoolingType.SUM, [0], [1], None)]), IA, "table 'users': partition 7 out of range [0, 3)"),
        ("partition not held", request([("users", not_held, PoolingType.SUM, [not_held], [1], None)]), FP, f"table 'users' partition {not_held} is not held"),
        ("id out of range", request([("users", 0, PoolingType.SUM, [0, 3_000_000], [2], None)]), IA, "table 'users': id 3000000 out of range"),
        ("negative id", request([("users", 0, PoolingType.SUM, [-3], [1], None)]), IA, "table 'users': id -3 out of range"),
        ("id not in partition", request([("users", 0, PoolingType.SUM, [0, 4], [2], None)]), IA, "table 'users': id 4 is not in partition 0 of 3"),
        ("lengths do not add up", request([("users", 0, PoolingType.SUM, [0, 3], [1], None)]), IA, "lengths add up to 1 but 2 ids were sent"),
        ("negative length", request([("users", 0, PoolingType.SUM, [0, 3], [3, -1], None)]), IA, "negative bag length -1"),
        ("bytes disagree with shape", short, IA, "needs 16 bytes, got 12"),
        ("wrong dtype", bad_dtype, IA, "lengths: dtype must be int32"),
        ("weights with mean", request([("users", 0, PoolingType.MEAN, [0], [1], [1.0])]), IA, "per-id weights need SUM pooling"),
        ("no pooling", embedding_pb2.LookupRequest(groups=[embedding_pb2.BagGroup(table="users")]), IA, "pooling must be SUM, MEAN or MAX"),
        ("version not ready", request([ok], version=99), FP, "version 99 is not ready"),
        ("over the id cap", request([("users", 0, PoolingType.SUM, np.zeros(MAX_IDS + 1, np.int64), [MAX_IDS + 1], None)]), RE, f"over this node's cap of {MAX_IDS}"),
    ]


def test_bad_input_gets_status_while_good_stream_flows(env, reference):
    _, _, _, cluster, stubs = env
    node, cases = _bad_requests(cluster)
    stub = stubs[node]
    good = request([("users", 0, PoolingType.MEAN, [0, 3, 6], [1, 2], None)])
    want = reference.pool("users", [0, 3, 6], [1, 2], PoolingType.MEAN)
    stop, errors, good_calls = threading.Event(), [], [0]

    def good_stream():
        while not stop.is_set():
            try:
                got = wire.decode(stub.Lookup(good, timeout=10).results[0].pooled, "p", dtype="float32", ndim=2)
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
                good_calls[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    t = threading.Thread(target=good_stream)
    t.start()
    try:
        wait_for(lambda: good_calls[0] > 0, 10, "the good stream to start")
        for name, req, code, fragment in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Lookup(req, timeout=10)
            assert info.value.code() == code, f"{name}: {info.value.code()} {info.value.details()}"
            assert fragment in info.value.details(), f"{name}: {info.value.details()!r}"
        before = good_calls[0]
        wait_for(lambda: good_calls[0] > before + 3, 10, "the good stream to keep flowing after bad input")
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]


def test_describe_reports_partitions_and_counters(env):
    _, _, _, cluster, stubs = env
    for node, stub in stubs.items():
        d = stub.Describe(embedding_pb2.DescribeRequest(), timeout=10)
        assert d.node_id == node
        held = {(p.table, p.partition) for p in d.partitions}
        assert held == {(k.table, k.partition) for k in cluster.smap.partitions_of(node)}
        assert list(d.versions_ready) == [1] and d.serving_version == 1 and d.shard_map_version == 1


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="shardrec.v1.EmbeddingShard"), timeout=5).status


def test_registers_only_after_load_and_deregisters_on_sigterm(env):
    """A throttled load: while it runs the node listens NOT_SERVING with no znode; the znode
    appears only once every partition is loaded; SIGTERM removes it and the process exits 0."""
    zk, paths, spawn, cluster, _ = env
    node = cluster.smap.nodes[0]
    # A second process for a node id already serving would be refused; use a fresh cluster view:
    # stop the node, then start it again throttled.
    cluster.processes[node].terminate()
    assert cluster.processes[node].wait(30) == 0
    wait_for(lambda: not zk.exists(paths.node(node)), 10, f"{node}'s znode to go after SIGTERM")
    proc = start_shard(spawn, cluster.zk_hosts, cluster.cluster, node, "--max-ids", str(MAX_IDS), "--load-rate-bytes-s", "200000")
    line = wait_for(lambda: next((ln for ln in proc.log_text().splitlines() if ln.startswith("LISTENING")), None), 60, "the node to listen")
    address = line.split()[2]
    assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not zk.exists(paths.node(node)), "registered before its partitions were loaded"
    data = wait_registered(zk, paths, node)
    assert _health(address) == health_pb2.HealthCheckResponse.SERVING
    assert sorted(data["partitions"]) == sorted(str(k) for k in cluster.smap.partitions_of(node))
    assert data["versions_ready"] == [1] and data["address"] == address
    cluster.processes[node] = proc
    cluster.addresses[node] = address


def test_znode_disappears_after_kill_9(env):
    zk, paths, spawn, cluster, _ = env
    proc = start_shard(spawn, cluster.zk_hosts, cluster.cluster, "shard-spare")  # in no partition
    data = wait_registered(zk, paths, "shard-spare")
    assert data["partitions"] == []
    proc.kill()
    wait_for(lambda: not zk.exists(paths.node("shard-spare")), 10, "the killed node's znode to expire")


def test_a_second_live_process_with_a_node_id_refuses_to_register(env):
    """Two live processes given one node id: the first answers its health probe as the instance
    it recorded, so the second, once loaded, refuses to register, says so and exits 1; the
    first keeps its znode."""
    zk, paths, spawn, cluster, stubs = env
    node = cluster.smap.nodes[1]
    held = zk.get(paths.node(node))[0]
    second = start_shard(spawn, cluster.zk_hosts, cluster.cluster, node)
    assert second.wait(60) == 1
    assert "answers as the instance it recorded: two processes were given the same id" in second.log_text()
    assert zk.get(paths.node(node))[0] == held
    assert stubs[node].Describe(embedding_pb2.DescribeRequest(), timeout=10).node_id == node
