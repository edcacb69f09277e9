"""Health, readiness and the registration probe against real gRPC servers and a real ZooKeeper
(docs/health.md; docs/zookeeper.md, "Sessions, expiry and outages")."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kazoo.client import KazooClient

from services.core.clients import make_channel
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import FrontendRecord, NodeRecord
from services.core.discovery.registry import NodeRegistration
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import ConfigError
from services.core.placement import PlacementSpec, initial_shard_map, node_ids
from services.core.rpc.probe import answering_instance, holder_probe
from services.core.rpc.readiness import Readiness
from services.core.rpc.server import LIVENESS, start_aio_server, start_sync_server
from services.core.types import TableSpec
from services.frontend.readiness import CLUSTER_VIEW, LOADED, ViewReadiness
from services.frontend.view import ClusterView
from tests.support.servers import free_port
from tests.support.waiting import until

SERVICE = "shardrec.v1.EmbeddingShard"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str) -> int:
    with make_channel(address, aio=False) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture
def live_server():
    """A started sync server (health only) named instance "inst-a", with its readiness."""
    readiness = Readiness(("loaded",))
    server = start_sync_server("127.0.0.1", 0, threads=2, max_message_bytes=1 << 20, add_servicers=[], service_names=[SERVICE],
                               instance_id="inst-a")
    server.follow(readiness)
    yield server, readiness, f"127.0.0.1:{server.port}"
    server.stop(0)


# ---- liveness and readiness ------------------------------------------------------------------------


def test_liveness_serves_from_start_and_readiness_follows_its_conditions(live_server) -> None:
    server, readiness, address = live_server
    assert health(address, LIVENESS) == SERVING
    assert health(address, SERVICE) == health(address, "") == NOT_SERVING
    readiness.set("loaded", True)
    assert health(address, SERVICE) == health(address, "") == SERVING
    readiness.set("loaded", False, "dropped")
    assert (health(address, SERVICE), health(address, ""), health(address, LIVENESS)) == (NOT_SERVING, NOT_SERVING, SERVING)


def test_aio_server_follows_readiness_changed_from_any_thread() -> None:
    async def main() -> list[int]:
        readiness = Readiness(("loaded",))
        server = await start_aio_server("127.0.0.1", 0, max_message_bytes=1 << 20, add_servicers=[], service_names=[SERVICE],
                                        instance_id="inst-aio")
        server.follow(readiness)
        address = f"127.0.0.1:{server.port}"
        channel = make_channel(address)
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

        async def until(want: int) -> None:
            deadline = time.monotonic() + 5
            while await status(SERVICE) != want:
                assert time.monotonic() < deadline, f"{SERVICE} never became {want}"
                await asyncio.sleep(0.01)  # step of the polling loop

        try:
            seen = [await status(LIVENESS), await status(SERVICE)]
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, readiness.set, "loaded", True)  # another thread
            await until(SERVING)
            for _ in range(10):  # a burst of flips: the last one wins
                readiness.set("loaded", False)
                readiness.set("loaded", True)
            readiness.set("loaded", False)
            await until(NOT_SERVING)
            seen.append(await status(LIVENESS))
            assert await loop.run_in_executor(None, answering_instance, address, 2.0) == "inst-aio"
            return seen
        finally:
            await channel.close()
            await server.stop(0)

    assert asyncio.run(main()) == [SERVING, NOT_SERVING, SERVING]


def test_answering_instance(live_server) -> None:
    _server, _readiness, address = live_server
    assert answering_instance(address) == "inst-a"  # ready or not: liveness answers
    assert answering_instance(f"127.0.0.1:{free_port()}", 0.5) is None  # refused
    with socket.socket() as frozen:  # accepts connections (the kernel does) but never speaks: SIGSTOPped
        frozen.bind(("127.0.0.1", 0))
        frozen.listen()
        t0 = time.monotonic()
        assert answering_instance(f"127.0.0.1:{frozen.getsockname()[1]}", 0.3) is None  # the timeout ends it
        assert time.monotonic() - t0 < 3


# ---- the registration probe ------------------------------------------------------------------------


def test_znode_of_a_gone_process_is_taken_over_at_once(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    """The holder's session is alive (a kill -9'd process's lingers until it times out), but the
    address it recorded no longer answers: taken over without waiting for the session."""
    path = zk_paths.node("shard-0")
    dead = NodeRecord(node_id="shard-0", address=f"127.0.0.1:{free_port()}", instance_id="dead")
    NodeRegistration(member, path, dead).register()
    mine = NodeRecord(node_id="shard-0", address="127.0.0.1:1", instance_id="new")
    reg = NodeRegistration(zk, path, mine, stale_wait_s=30, probe=holder_probe(NodeRecord.from_bytes))
    t0 = time.monotonic()
    reg.register()
    took_s = time.monotonic() - t0
    assert zk.exists(path).ephemeralOwner == zk.client_id[0] != member.client_id[0]
    assert NodeRecord.from_bytes(zk.get(path)[0]).instance_id == "new"
    print(f"took over a dead holder's znode in {took_s * 1e3:.0f} ms")
    assert took_s < 5.0  # the probe's refusal is immediate; a session wait would be 30 s


def test_znode_answered_by_another_instance_is_taken_over(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths,
                                                          live_server) -> None:
    """A restart on the same address: the new process (instance inst-a) answers there, not the
    one recorded (inst-old)."""
    _server, _readiness, address = live_server
    path = zk_paths.frontend("fe")
    NodeRegistration(member, path, FrontendRecord(frontend_id="fe", address=address, instance_id="inst-old")).register()
    reg = NodeRegistration(zk, path, FrontendRecord(frontend_id="fe", address=address, instance_id="inst-a"),
                           stale_wait_s=30, probe=holder_probe(FrontendRecord.from_bytes))
    reg.register()
    assert zk.exists(path).ephemeralOwner == zk.client_id[0]


def test_second_live_process_with_one_id_is_refused(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths, live_server) -> None:
    """Two live processes with one node id: the first answers as itself, the second refuses to
    register and says so; the first keeps its znode."""
    _server, _readiness, address = live_server
    path = zk_paths.node("shard-0")
    NodeRegistration(member, path, NodeRecord(node_id="shard-0", address=address, instance_id="inst-a")).register()
    second = NodeRegistration(zk, path, NodeRecord(node_id="shard-0", address="127.0.0.1:2", instance_id="inst-b"),
                              stale_wait_s=0.5, probe=holder_probe(NodeRecord.from_bytes))
    with pytest.raises(ConfigError, match="answers as the instance it recorded: two processes were given the same id"):
        second.register()
    assert zk.exists(path).ephemeralOwner == member.client_id[0]


def test_holder_without_instance_id_is_waited_for(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths, live_server) -> None:
    """An older process records no instance id: if its address answers without one too, the
    probe cannot tell, and its session decides (as before)."""
    path = zk_paths.node("shard-0")
    server = start_sync_server("127.0.0.1", 0, threads=2, max_message_bytes=1 << 20, add_servicers=[], service_names=[])
    address = f"127.0.0.1:{server.port}"  # answers with no instance id, as an older process does
    try:
        NodeRegistration(member, path, NodeRecord(node_id="shard-0", address=address)).register()
        second = NodeRegistration(zk, path, NodeRecord(node_id="shard-0", address="h:2"), stale_wait_s=0.5,
                                  probe=holder_probe(NodeRecord.from_bytes))
        with pytest.raises(ConfigError, match="two processes were given the same id"):
            second.register()
    finally:
        server.stop(0)


# ---- the frontend's cluster_view condition ---------------------------------------------------------


def test_cluster_view_readiness_with_grace(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    """Ready while every partition has a replica ready at the served version in the view; a
    node that leaves still counts for the grace period (a session being re-established), and
    readiness fails once it ends; the node coming back makes it ready again."""
    tables = (TableSpec("users", 100, 4), TableSpec("items", 60, 4))
    spec = PlacementSpec.from_json({"default": {"sharding": "row_wise", "partitions": 2, "replicas": 1}})
    ClusterStore(zk, zk_paths).write_active(initial_shard_map(spec, tables, node_ids(2), version=1), None)
    ClusterStore(zk, zk_paths).write_model("file:///nowhere", "m")
    regs = {n: NodeRegistration(member, zk_paths.node(n), NodeRecord(node_id=n, address=f"h:{i}", versions_ready=(1,)))
            for i, n in enumerate(node_ids(2))}
    for r in regs.values():
        r.register()
    grace_s = 0.5

    async def main() -> list[tuple[bool, float]]:
        loop = asyncio.get_running_loop()
        view = ClusterView(zk, zk_paths, loop)
        await loop.run_in_executor(None, view.start_blocking)
        await view.wait_for(lambda v: v.shard_map is not None and len(v.nodes) == 2, 10, "the view")
        readiness = Readiness((LOADED, CLUSTER_VIEW))
        flips: list[tuple[bool, float]] = []
        readiness.subscribe(lambda ready: flips.append((ready, time.monotonic())))
        readiness.set(LOADED, True)
        task = asyncio.ensure_future(ViewReadiness(view, readiness, lambda: 1, grace_s).run())
        try:
            await until(lambda: readiness.ready, 10.0, "ready")
            left = time.monotonic()
            await loop.run_in_executor(None, regs["shard-1"].deregister)
            await until(lambda: not readiness.ready, 10.0, "NOT ready once the grace ended")
            assert time.monotonic() - left >= grace_s
            assert readiness.failing() == {CLUSTER_VIEW: "no replica ready at version 1 in the view for items/1, users/1"}
            await loop.run_in_executor(None, regs["shard-1"].register)
            await until(lambda: readiness.ready, 10.0, "ready again")
            await until(lambda: "shard-1" in view.nodes, 10.0, "shard-1 back in the view")
            left = time.monotonic()
            await loop.run_in_executor(None, regs["shard-0"].deregister)
            await until(lambda: "shard-0" in view.departed, 10.0, "shard-0 to leave the view")
            await loop.run_in_executor(None, regs["shard-0"].register)
            await until(lambda: "shard-0" in view.nodes, 10.0, "shard-0 back in the view")
            assert time.monotonic() - left < grace_s, "shard-0 was away longer than the grace: the test proves nothing"
            assert "shard-0" not in view.departed  # back within the grace: readiness never flipped
            return flips
        finally:
            task.cancel()

    flips = asyncio.run(main())
    assert [ready for ready, _ in flips] == [False, True, False, True]


@pytest.fixture
def member(zk_config):
    """A second client, as another process would have."""
    from services.core.clients import make_kazoo

    client = make_kazoo(zk_config)
    yield client
    client.stop()
    client.close()



def test_view_announces_a_node_back_as_another_process(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    """The fan-out forgets a node's ejection when it registers as another process: the view
    calls its listeners with the node and the address its previous process had."""
    tables = (TableSpec("items", 60, 4),)
    ClusterStore(zk, zk_paths).write_active(initial_shard_map(PlacementSpec.from_json({}), tables, node_ids(1), version=1), None)
    ClusterStore(zk, zk_paths).write_model("file:///nowhere", "m")
    reg = NodeRegistration(member, zk_paths.node("shard-0"), NodeRecord(node_id="shard-0", address="h:1", instance_id="a"))
    reg.register()

    async def main() -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        view = ClusterView(zk, zk_paths, loop)
        renewed: list[tuple[str, str]] = []
        view.on_new_instance.append(lambda node, previous: renewed.append((node, previous)))
        await loop.run_in_executor(None, view.start_blocking)
        await until(lambda: "shard-0" in view.nodes, 10.0, "shard-0 in the view")
        for record in (NodeRecord(node_id="shard-0", address="h:1", instance_id="a", versions_ready=(1,)),  # same process
                       NodeRecord(node_id="shard-0", address="h:1", instance_id="b"),  # restarted in place
                       NodeRecord(node_id="shard-0", address="h:2", instance_id="c")):  # restarted elsewhere
            await loop.run_in_executor(None, reg.update, record)
            await until(lambda: view.nodes["shard-0"] == record, 10.0, f"{record} in the view")
        return renewed

    assert asyncio.run(main()) == [("shard-0", "h:1"), ("shard-0", "h:1")]
