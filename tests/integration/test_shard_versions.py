"""A shard process following model versions through ZooKeeper: live deltas, refusals, memory.

Real ZooKeeper, real shard processes, real gRPC; expected values come from
``core.reference.ReferenceModel`` at the version asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from benchmarks.delta_swap import uss_bytes
from services._proto.shardrec.v1 import embedding_pb2_grpc
from services.control.publish import format_status, model_reader, publish_version, read_status, rollback_version
from services.core import wire
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_delta
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import ShardrecError
from services.core.reference import ReferenceModel
from services.core.synth import PRESETS, synthesize
from services.core.types import PoolingType
from tests.integration.test_shard import request
from tests.support.cluster import start_cluster
from tests.support.waiting import wait_for

RTOL, ATOL = 1e-5, 1e-6
# One node holds everything: whole tables (P = 1) and both partitions of a row-wise one.
SPEC = {"default": {"sharding": "replicated", "replicas": "all"}, "tables": {"items": {"sharding": "row_wise", "partitions": 2, "replicas": 1}}}


def _delta(root: str, version: int, parent: int, seed: int, k: int = 200, tables=None) -> dict[str, np.ndarray]:
    """Delta ``version`` over ``parent``: the 10 hottest rows and k random rows of each table."""
    reader = CheckpointReader(root)
    spec = reader.manifest(parent).model
    rng = np.random.default_rng(seed)
    rows = {}
    for t in spec.tables:
        if tables is not None and t.name not in tables:
            continue
        ids = np.unique(np.concatenate([np.arange(min(10, t.rows)), rng.choice(t.rows, size=min(k, t.rows), replace=False)]))
        rows[t.name] = (ids, rng.normal(0.0, 2.0, size=(len(ids), t.dim)).astype(np.float32))
    write_delta(root, version, parent, spec, rows)
    return {name: ids for name, (ids, _) in rows.items()}


class Node:
    """One shard process of a one-node cluster, and what tests ask of it."""

    def __init__(self, zk, paths, cluster, root, hosts) -> None:
        self.zk, self.paths, self.root, self.hosts = zk, paths, root, hosts
        self.process = cluster.processes["shard-0"]
        self.smap = cluster.smap
        self.channel = grpc.insecure_channel(cluster.addresses["shard-0"])
        self.stub = embedding_pb2_grpc.EmbeddingShardStub(self.channel)
        self.store = ClusterStore(zk, paths)

    def znode(self) -> dict:
        return json.loads(self.zk.get(self.paths.node("shard-0"))[0])

    def wait(self, predicate, what: str, timeout_s: float = 60) -> dict:
        return wait_for(lambda: d if predicate(d := self.znode()) else None, timeout_s, what)

    def lookups(self, version: int, seed: int = 1) -> list[tuple[str, int, PoolingType, np.ndarray, np.ndarray, np.ndarray]]:
        """Pool hot and random bags of every partition at ``version``: (table, p, pooling, ids, lengths, pooled)."""
        rng = np.random.default_rng(seed)
        reader = CheckpointReader(self.root)
        out = []
        for t in reader.manifest(1).model.tables:
            tp = self.smap.tables[t.name]
            for p in range(tp.num_partitions):
                members = np.arange(p, t.rows, tp.num_partitions)
                lengths = rng.integers(1, 6, size=30).astype(np.int32)
                ids = rng.choice(members, size=int(lengths.sum()))
                hot = min(10, len(ids), len(members))
                ids[:hot] = members[:hot]  # the hottest rows, which every delta here changes
                for pooling in (PoolingType.SUM, PoolingType.MEAN, PoolingType.MAX):
                    resp = self.stub.Lookup(request([(t.name, p, pooling, ids, lengths, None)], version=version), timeout=10)
                    pooled = wire.decode(resp.results[0].pooled, "pooled", dtype="float32", ndim=2)
                    out.append((t.name, p, pooling, ids, lengths, pooled, resp.version))
        return out

    def check(self, version: int, served_as: int | None = None) -> None:
        """Every partition at ``version`` equals the reference at ``served_as`` (default: itself)."""
        ref = ReferenceModel(self.root, served_as or version)
        for table, p, pooling, ids, lengths, pooled, got_version in self.lookups(version):
            assert got_version == (served_as or version)
            np.testing.assert_allclose(pooled, ref.pool(table, ids, lengths, pooling), rtol=RTOL, atol=ATOL, err_msg=f"{table}/{p} {pooling}")

    def publish(self, version: int) -> None:
        """What ``shardrec checkpoint publish VERSION`` does; ShardrecError when it refuses."""
        publish_version(self.store, model_reader(self.store), version)

    def rollback(self, version: int) -> None:
        rollback_version(self.store, model_reader(self.store), version)

    def status(self) -> str:
        """The report of ``shardrec checkpoint status``."""
        return format_status(read_status(self.store))


@contextlib.contextmanager
def one_node(zk_server, spawn, root: str, spec: dict, *extra: str) -> Iterator[Node]:
    """A one-node cluster of ``root`` in a fresh ZooKeeper namespace, torn down after."""
    paths = ZkPaths("sv-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    try:
        cluster = start_cluster(zk, paths, spawn, zk_server.hosts, root, spec, 1, *extra)
        n = Node(zk, paths, cluster, root, zk_server.hosts)
        yield n
        n.channel.close()
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


@pytest.fixture
def node(zk_server, spawn, tmp_path):
    root = str(tmp_path / "ckpt")
    synthesize(root, "small", seed=9)
    with one_node(zk_server, spawn, root, SPEC, "--version-drain-s", "0.5") as n:
        yield n


def test_delta_applies_live_both_versions_served_then_old_dropped(node):
    _delta(node.root, 2, 1, seed=2)
    node.check(1)
    node.store.write_target_version(2)
    node.wait(lambda d: d["serving_version"] == 2 and d["versions_ready"] == [1, 2], "version 2 ready beside 1")
    node.check(2)
    node.check(1)  # still served exactly, from the rows it kept
    node.check(0, served_as=2)  # version 0: the node's primary
    assert node.znode()["overlay_bytes"] > 0
    node.store.write_serving_version(2)  # what frontends write once they all switched
    d = node.wait(lambda d: d["versions_ready"] == [2], "version 1 dropped once nothing serves it")
    assert d["overlay_bytes"] == 0
    node.check(2)


def test_rollback_then_the_next_delta_must_descend_from_it(node):
    _delta(node.root, 2, 1, seed=2)
    node.store.write_target_version(2)
    node.wait(lambda d: d["serving_version"] == 2, "version 2 ready")
    node.store.write_serving_version(2)
    node.rollback(1)
    node.wait(lambda d: d["serving_version"] == 1, "rolled back to version 1")
    node.check(1)
    node.store.write_serving_version(1)
    # The next delta must have the rollback target as its parent; 3 over 2 is refused.
    _delta(node.root, 3, 2, seed=3)
    with pytest.raises(ShardrecError):
        node.publish(3)
    _delta(node.root, 4, 1, seed=4)
    node.publish(4)
    node.wait(lambda d: d["serving_version"] == 4, "version 4 ready")
    node.check(4)


def _corrupt_rows(root: str, version: int, how: str) -> None:
    folder = os.path.join(root, "versions", str(version))
    if how == "no COMPLETE":
        os.remove(os.path.join(folder, "COMPLETE"))
        return
    path = os.path.join(folder, "tables", "items.rows.npy")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size - 64)
        else:  # one flipped byte: same size, another sha256
            f.seek(size - 5)
            byte = f.read(1)
            f.seek(size - 5)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("how, message", [
    ("checksum", "sha256"),
    ("truncated", "size"),
    ("no COMPLETE", "COMPLETE"),
    ("wrong parent", "not among its ancestors"),
])
def test_bad_version_is_refused_and_nothing_changes(node, how, message):
    serving = 1
    if how == "wrong parent":
        _delta(node.root, 2, 1, seed=2)
        node.store.write_target_version(2)
        node.wait(lambda d: d["serving_version"] == 2, "version 2 ready")
        node.store.write_serving_version(2)
        node.wait(lambda d: d["versions_ready"] == [2], "version 1 dropped")
        serving, bad = 2, 3
        _delta(node.root, 3, 1, seed=3)  # a sibling of 2: its parent is not the serving version
    else:
        bad = 2
        _delta(node.root, 2, 1, seed=2)
        _corrupt_rows(node.root, 2, how)
    before = node.znode()
    with pytest.raises(ShardrecError):
        node.publish(bad)  # the publisher refuses it too
    # Published behind the CLI's back, the shard refuses it on its own.
    node.store.write_target_version(bad)
    d = node.wait(lambda d: (d.get("load_error") or {}).get("version") == bad, f"version {bad} refused")
    assert message in d["load_error"]["error"], d["load_error"]
    assert d["versions_ready"] == before["versions_ready"] and d["serving_version"] == serving
    node.check(serving)  # rows unchanged
    assert node.process.running
    assert f"REFUSED version {bad}" in node.status()


def test_applying_a_delta_grows_memory_by_the_delta_not_the_table(zk_server, spawn, tmp_path):
    """A shard holding a 150 MB table applies a delta of 4,000 rows (1 MB) and serves both
    versions: its USS grows by a few times the delta, far below one table copy."""
    from dataclasses import replace

    small = PRESETS["small"]
    rows = tuple((t, 600_000 if t == "items" else n) for t, n in small.table_rows)
    preset = replace(small, name="wide", dim=64, table_rows=rows, bottom_mlp=(32, 64))
    root = str(tmp_path / "ckpt")
    synthesize(root, preset, seed=1)
    table_bytes = 600_000 * 64 * 4
    k = 4000
    delta_bytes = k * 64 * 4
    allowed = 6 * delta_bytes + (8 << 20)
    assert table_bytes >= 10 * allowed
    with one_node(zk_server, spawn, root, {"default": {"sharding": "replicated", "replicas": "all"}}) as n:
        n.lookups(1)  # warm every code path once
        before = uss_bytes(n.process.pid)
        _delta(root, 2, 1, seed=5, k=k, tables=["items"])
        n.store.write_target_version(2)
        n.wait(lambda d: d["versions_ready"] == [1, 2] and d["serving_version"] == 2, "version 2 applied beside 1")
        n.lookups(1)
        n.lookups(2)
        growth = uss_bytes(n.process.pid) - before
        print(f"USS growth {growth / 2**20:.1f} MiB for a {delta_bytes / 2**20:.1f} MiB delta of a {table_bytes / 2**20:.0f} MiB table")
        assert growth <= allowed, f"USS grew {growth} bytes; the delta is {delta_bytes} bytes, the table {table_bytes}"
        n.check(2)
        n.check(1)


def test_restarted_shard_rebuilds_the_serving_version_before_it_registers(node, spawn):
    from tests.support.cluster import start_shard, wait_registered

    for v in (2, 3):
        _delta(node.root, v, v - 1, seed=v)
        node.publish(v)
        node.wait(lambda d, v=v: d["serving_version"] == v, f"version {v} ready")
        node.store.write_serving_version(v)  # what the frontends write once they switched
    node.process.kill()
    wait_for(lambda: not node.zk.exists(node.paths.node("shard-0")), 30, "the killed node's znode to expire")
    node.process = start_shard(spawn, node.hosts, node.paths.cluster, "shard-0", "--version-drain-s", "0.5")
    d = wait_registered(node.zk, node.paths, "shard-0")
    assert d["versions_ready"] == [3] and d["serving_version"] == 3  # ready at registration, not later
    node.channel.close()
    node.channel = grpc.insecure_channel(d["address"])
    node.stub = embedding_pb2_grpc.EmbeddingShardStub(node.channel)
    node.check(3)
