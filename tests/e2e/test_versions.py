"""Incremental checkpoints on a live cluster: deltas published while a closed-loop client runs.

Real ZooKeeper, Redis, three shard processes (mixed placement: row-wise, replicated and
table-wise tables) and a frontend. Every response must equal ``core.reference`` at exactly the
version it reports, versions must only move forward for each client, and nothing may fail.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from services.control.features import load_features
from services.control.publish import model_reader, publish_version
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_delta
from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.zk_paths import ZkPaths
from services.core.reference import ReferenceRecommender
from services.core.synth import synthesize
from tests.e2e.test_recommend import PLACEMENTS, check_response, random_requests
from tests.support.closed_loop import ClosedLoop
from tests.support.cluster import LENIENT_ADMISSION, start_cluster
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

DELTAS = 5
CLIENTS = 2
CHECKS_PER_VERSION = 25


def drift_delta(root: str, version: int, seed: int) -> None:
    """Delta ``version`` over ``version - 1``: the 20 hottest rows of every table (which the
    requests' power-law ids hit) plus 3% random rows; every other delta also moves the dense
    weights."""
    reader = CheckpointReader(root)
    spec = reader.manifest(version - 1).model
    rng = np.random.default_rng(seed)
    rows = {}
    for t in spec.tables:
        ids = np.unique(np.concatenate([np.arange(min(20, t.rows)), rng.choice(t.rows, size=max(1, t.rows * 3 // 100), replace=False)]))
        rows[t.name] = (ids, rng.normal(0.0, 2.0, size=(len(ids), t.dim)).astype(np.float32))
    dense = None
    if version % 2 == 0:
        dense = {k: (v + rng.normal(0.0, 0.05, size=v.shape)).astype(np.float32) for k, v in reader.dense_state(version - 1).items()}
    write_delta(root, version, version - 1, spec, rows, dense)


@pytest.fixture
def live(zk_server, redis_server, tmp_path, spawn):
    """A fresh small model (base version 1 only), its features in Redis, 3 shards, 1 frontend."""
    root = str(tmp_path / "ckpt")
    synthesize(root, "small", seed=9)
    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    load_features(root, redis_server.url, prefix=prefix)
    paths = ZkPaths("v-" + uuid.uuid4().hex[:10])
    zk = make_kazoo(ZkConfig(hosts=zk_server.hosts, cluster=paths.cluster))
    try:
        start_cluster(zk, paths, spawn, zk_server.hosts, root, PLACEMENTS["mixed"], 3, "--version-drain-s", "1", version=1)
        fe = spawn(
            "frontend", "serve", "--zk", zk_server.hosts, "--cluster", paths.cluster, "--redis", redis_server.url,
            "--redis-prefix", prefix, "--max-wait-ms", "5", "--session-timeout-s", "1.0", "--default-timeout-ms", "5000", *LENIENT_ADMISSION,
            name="frontend",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        yield root, line.split()[2], zk, paths, zk_server.hosts
    finally:
        spawn.close()
        zk.delete(paths.base, recursive=True)
        zk.stop()
        zk.close()


def test_five_deltas_under_load_every_response_matches_its_version(live):
    root, address, zk, paths, hosts = live
    requests = random_requests(60, seed=5)
    store = ClusterStore(zk, paths)
    versions = list(range(1, 2 + DELTAS))
    with ClosedLoop(address, requests, CLIENTS) as load:
        wait_for(lambda: 1 in load.versions(), 60, "responses at version 1")
        for v in range(2, 2 + DELTAS):
            drift_delta(root, v, seed=v)
            publish_version(store, model_reader(store), v)
            wait_for(lambda v=v: v in load.versions(), 60, f"responses at version {v}")
        wait_for(lambda: load.count(versions[-1]) >= 20, 60, "traffic at the last version")
    assert not load.errors, load.errors[:3]
    assert load.versions() == set(versions)
    for s in load.seen:  # each client sees versions in order
        seq = [r.response.version for r in s]
        assert seq == sorted(seq)
    assert store.read_serving_version() == versions[-1]
    print(f"responses per version: { {v: load.count(v) for v in versions} }")
    rng = np.random.default_rng(0)
    for v in versions:
        reference = ReferenceRecommender(root, v)
        at_v = [(r.index, r.response) for r in load.replies() if r.response.version == v]
        for k in rng.choice(len(at_v), size=min(CHECKS_PER_VERSION, len(at_v)), replace=False):
            i, resp = at_v[k]
            check_response(reference, requests[i], resp)

