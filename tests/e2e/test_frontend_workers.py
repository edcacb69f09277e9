"""``frontend serve --workers 2`` (docs/workers.md), for real: two worker processes share one
port; connections spread over both, every answer equals ``core.reference``; a worker killed with
SIGKILL is restarted under its id while the other keeps answering; SIGTERM stops both and
removes their znodes. Real ZooKeeper, Redis, shard and frontend processes."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services._proto.shardrec.v1 import recommend_pb2_grpc
from services.core.clients import make_channel
from services.core.rpc.probe import instance_on
from tests.e2e.test_recommend import check_response, checkpoint, features, random_requests, reference  # noqa: F401
from tests.support.cluster import start_cluster, start_frontend, zk_namespace
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

ONE_NODE = {"default": {"sharding": "replicated", "replicas": "all"}}
WORKERS = ("fw-w0", "fw-w1")


def fresh_channel(address: str) -> grpc.Channel:
    """A channel with a connection of its own (not shared with other channels to ``address``)."""
    return make_channel(address, aio=False, options=[("grpc.use_local_subchannel_pool", 1)])


def instance_of(channel: grpc.Channel) -> str:
    """The instance id of the process at the other end of ``channel``'s connection."""
    iid = instance_on(channel, 5.0)
    assert iid, "no instance id: nothing answered, or not a shardrec server"
    return iid


def records(zk, paths) -> dict[str, dict]:
    out = {}
    for child in zk.get_children(paths.frontends):
        data, _ = zk.get(paths.frontend(child))
        out[child] = json.loads(data)
    return out


def both_instances(address: str) -> list[grpc.Channel]:
    """Channels opened until one reaches each worker (connections are hashed to a worker):
    [channel to one, channel to the other]."""
    by_instance: dict[str, grpc.Channel] = {}

    def two() -> bool:
        ch = fresh_channel(address)
        iid = instance_of(ch)
        if iid in by_instance:
            ch.close()
        else:
            by_instance[iid] = ch
        return len(by_instance) == 2

    wait_for(two, 30, "connections reaching both workers")
    return list(by_instance.values())


def answer_all(channels: list[grpc.Channel], requests, reference) -> None:  # noqa: F811
    """Every request over every channel, 8 at a time; every answer checked."""

    def one(pair) -> None:
        ch, req = pair
        check_response(reference, req, recommend_pb2_grpc.RecommenderStub(ch).Recommend(req, timeout=10))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, [(ch, req) for ch in channels for req in requests]))


@pytest.mark.timeout(180)
def test_two_workers_share_a_port_and_survive_a_killed_worker(zk_server, tmp_path_factory, checkpoint, features, reference):  # noqa: F811
    zk_server.ensure_running()
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-workers"))
    with zk_namespace(zk_server.hosts, "w-") as (zk, paths):
        try:
            start_cluster(zk, paths, spawn, zk_server.hosts, checkpoint, ONE_NODE, 1)
            address = start_frontend(spawn, zk_server.hosts, paths.cluster, *features, "--workers", "2", "--frontend-id", "fw",
                                     "--metrics-port", "0", "--grace-s", "2", "--lame-duck-s", "0.2")  # fmt: skip
            parent = next(p for p in spawn.processes if p.name == "frontend")
            # READY comes once both workers are ready: both registered, one address, two processes
            regs = records(zk, paths)
            assert sorted(regs) == list(WORKERS), regs
            assert {r["address"] for r in regs.values()} == {address}
            assert len({r["pid"] for r in regs.values()} | {parent.pid}) == 3
            assert parent.log_text().count("METRICS frontend ") == 2  # each worker's own endpoint
            assert parent.log_text().count("READY frontend ") == 1

            channels = both_instances(address)
            answer_all(channels, random_requests(20, seed=31), reference)

            # SIGKILL one worker (calls on its connections fail UNAVAILABLE: a crash); once it is
            # gone, new connections reach the other, and the dead one comes back under its id
            victim = regs["fw-w0"]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda: not _alive(victim["pid"]), 10, "the killed worker gone (reaped by its parent)")
            answer_all([fresh_channel(address) for _ in range(4)], random_requests(10, seed=32), reference)
            back = wait_for(lambda: (r := records(zk, paths).get("fw-w0")) and r["pid"] != victim["pid"] and r, 60,
                            "worker 0 restarted and registered again")  # fmt: skip
            assert back["address"] == address
            channels = both_instances(address)
            assert instance_of(channels[0]) != instance_of(channels[1])
            answer_all(channels, random_requests(10, seed=33), reference)
            for ch in channels:
                ch.close()

            # SIGTERM: both workers drain and exit, their znodes go, the parent exits 0
            pids = [r["pid"] for r in records(zk, paths).values()]
            parent.terminate()
            assert parent.wait(30) == 0, parent.log_text()[-3000:]
            assert records(zk, paths) == {}
            for pid in pids:
                wait_for(lambda pid=pid: not _alive(pid), 10, f"worker pid {pid} gone")
        finally:
            spawn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
