"""Start a real shard cluster for tests: a checkpoint, a shard map in ZooKeeper, shard processes
(and a frontend over them)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from services.control.placement import init_cluster, initial_placement
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.placement import PlacementSpec, ShardMap
from tests.support.processes import ProcessFactory, ServiceProcess
from tests.support.waiting import wait_for

SHARD_START_TIMEOUT_S = 60.0
# Frontends of correctness and fault tests hold a 1 s latency target instead of 50 ms: on two
# shared cores their concurrent clients would otherwise be shed (RESOURCE_EXHAUSTED), which
# is right for a server and beside the point of those tests; tests/e2e/test_overload.py tests
# shedding with its own target.
LENIENT_ADMISSION = ("--latency-target-ms", "1000")


@dataclass
class ShardCluster:
    zk_hosts: str
    cluster: str
    checkpoint: str
    smap: ShardMap
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)


def publish_cluster(zk, paths: ZkPaths, checkpoint: str, spec: dict, num_nodes: int, version: int | None = None) -> ShardMap:
    """What ``shardrec placement init`` does (``control.placement.init_cluster``): the model,
    the versions (``version``, default the latest complete one, is both serving and target),
    then the shard map."""
    initial = initial_placement(checkpoint, PlacementSpec.from_json(spec), num_nodes, version)
    smap, _cleared = init_cluster(ClusterStore(zk, paths), initial)
    return smap


def start_shard(spawn: ProcessFactory, zk_hosts: str, cluster: str, node_id: str, *extra: str) -> ServiceProcess:
    return spawn(
        "shard", "serve", "--node-id", node_id, "--zk", zk_hosts, "--cluster", cluster,
        "--session-timeout-s", "1.0", "--grace-s", "2", *extra,
        name=node_id,
    )


def wait_registered(zk, paths: ZkPaths, node_id: str, timeout_s: float = SHARD_START_TIMEOUT_S) -> dict:
    """Wait for the node's znode; return its data."""

    def data():
        raw, _ = zk.get(paths.node(node_id))
        return json.loads(raw)

    return wait_for(data, timeout_s, f"{node_id} to register in ZooKeeper")


def start_cluster(zk, paths: ZkPaths, spawn: ProcessFactory, zk_hosts: str, checkpoint: str, spec: dict,
                  num_nodes: int, *extra: str, version: int | None = None) -> ShardCluster:
    smap = publish_cluster(zk, paths, checkpoint, spec, num_nodes, version)
    cluster = ShardCluster(zk_hosts, paths.cluster, checkpoint, smap)
    for node in smap.nodes:
        cluster.processes[node] = start_shard(spawn, zk_hosts, paths.cluster, node, *extra)
    for node in smap.nodes:
        cluster.addresses[node] = wait_registered(zk, paths, node)["address"]
    return cluster


@contextlib.contextmanager
def zk_namespace(zk_hosts: str, prefix: str = "t-") -> Iterator[tuple[object, ZkPaths]]:
    """A started kazoo client and a fresh cluster name (``<prefix><uuid>``); at exit the
    cluster's whole tree is deleted and the client closed. Stop the processes first."""
    paths = ZkPaths(prefix + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_hosts, cluster=paths.cluster))
    try:
        yield zk, paths
    finally:
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def start_frontend(spawn: ProcessFactory, zk_hosts: str, cluster: str, redis_url: str, redis_prefix: str, *extra: str,
                   timeout_s: float = 90.0) -> str:
    """``shardrec frontend serve`` over the cluster (1 s ZooKeeper session, 5 ms batching wait,
    5 s default deadline, then ``extra`` flags); its address once it prints READY."""
    fe = spawn(
        "frontend", "serve", "--zk", zk_hosts, "--cluster", cluster, "--redis", redis_url, "--redis-prefix", redis_prefix,
        "--max-wait-ms", "5", "--session-timeout-s", "1.0", "--default-timeout-ms", "5000", *LENIENT_ADMISSION, *extra,
        name="frontend",
    )
    line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None),
                    timeout_s, "the frontend to be ready")
    return line.split()[2]
