"""ZooKeeper recipes against a real ZooKeeper: registration, cluster store, outages."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import threading

import pytest
from kazoo.client import KazooClient
from kazoo.protocol.states import KazooState

from services.core.clients import make_kazoo
from services.core.config import ZkConfig
from services.core.discovery.cluster_store import ClusterStore
from services.core.discovery.records import FrontendRecord, ModelPointer, NodeRecord
from services.core.discovery.registry import NodeRegistration
from services.core.discovery.zk_paths import ZkPaths
from services.core.errors import ConfigError, FailedPreconditionError, NotFoundError, UnavailableError
from services.core.placement import PlacementSpec, initial_shard_map, node_ids
from services.core.types import TableSpec
from tests.support.servers import expire_session
from tests.support.waiting import wait_for

TABLES = (TableSpec("users", 100, 4), TableSpec("items", 60, 4), TableSpec("tags", 10, 4))


def owner(zk: KazooClient, path: str) -> int | None:
    stat = zk.exists(path)
    return None if stat is None else stat.ephemeralOwner


def node_data(zk: KazooClient, path: str) -> dict:
    return json.loads(zk.get(path)[0])


def payload(**fields) -> bytes:
    """A registration's data, encoded as the records encode theirs."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def smap(version: int = 1, nodes: int = 2):
    return initial_shard_map(PlacementSpec.from_json({}), TABLES, node_ids(nodes), version=version)


@pytest.fixture
def member(zk_config: ZkConfig):
    """A second client, as a shard process would have."""
    client = make_kazoo(zk_config)
    yield client
    client.stop()
    client.close()


# ---- clients -----------------------------------------------------------------------------------


def test_make_kazoo_names_the_hosts_when_nothing_answers() -> None:
    from tests.support.servers import free_port

    hosts = f"127.0.0.1:{free_port()}"
    with pytest.raises(UnavailableError, match=hosts):
        make_kazoo(ZkConfig(hosts=hosts, cluster="x", session_timeout_s=1.0, connect_timeout_s=0.3))


# ---- registration --------------------------------------------------------------------------------


def test_registration_appears_updates_and_disappears(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    path = zk_paths.node("shard-0")
    reg = NodeRegistration(member, path, NodeRecord(node_id="shard-0", address="127.0.0.1:1", versions_ready=(1,)))
    reg.register()
    assert owner(zk, path) == member.client_id[0]
    assert node_data(zk, path)["versions_ready"] == [1]
    assert ClusterStore(zk, zk_paths).live_nodes() == {"shard-0": reg.record}

    reg.update(NodeRecord(node_id="shard-0", address="127.0.0.1:1", versions_ready=(1, 2)))
    assert node_data(zk, path)["versions_ready"] == [1, 2]

    reg.register()  # idempotent: our own node is kept
    assert owner(zk, path) == member.client_id[0]
    reg.deregister()
    assert zk.exists(path) is None
    reg.deregister()  # idempotent
    assert ClusterStore(zk, zk_paths).live_nodes() == {}


def test_frontend_registration(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    reg = NodeRegistration(member, zk_paths.frontend("fe-1"), payload(address="127.0.0.1:2", version=1))
    reg.register()
    assert ClusterStore(zk, zk_paths).live_frontends() == {"fe-1": FrontendRecord(address="127.0.0.1:2", version=1)}
    member.stop()  # closing the session removes the ephemeral node at once
    assert ClusterStore(zk, zk_paths).live_frontends() == {}


def test_reregisters_after_session_expiry(zk_server, zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    path = zk_paths.node("shard-1")
    states: list[str] = []
    member.add_listener(states.append)
    reg = NodeRegistration(member, path, payload(node_id="shard-1", versions_ready=[3]))
    reg.register()
    old_session = expire_session(zk_server.hosts, member)

    wait_for(lambda: KazooState.LOST in states, 10, "the member to see its session LOST")
    new_owner = wait_for(
        lambda: (o := owner(zk, path)) not in (None, old_session) and o,
        10,
        f"{path} to be re-created by a new session",
    )
    assert member.client_id is not None and new_owner == member.client_id[0]
    assert reg.session_id == new_owner
    assert node_data(zk, path) == {"node_id": "shard-1", "versions_ready": [3]}
    assert reg.last_error is None


def test_update_while_disconnected_is_applied_on_reconnection(
    zk_server, zk: KazooClient, member: KazooClient, zk_paths: ZkPaths
) -> None:
    path = zk_paths.node("shard-2")
    reg = NodeRegistration(member, path, payload(versions_ready=[1]))
    reg.register()
    zk_server.pause()
    try:
        wait_for(lambda: not member.connected, 10, "the member to notice the frozen ZooKeeper")
        updater = threading.Thread(target=reg.update, args=(payload(versions_ready=[1, 2]),))
        updater.start()
        updater.join(5)
        assert not updater.is_alive(), "update() blocked while disconnected"
    finally:
        zk_server.resume()
    wait_for(
        lambda: node_data(zk, path) == {"versions_ready": [1, 2]} and owner(zk, path) == member.client_id[0],
        10,
        "the node (kept or re-created) to carry the latest data",
    )


def test_same_id_in_two_live_sessions_is_refused(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    path = zk_paths.node("shard-0")
    NodeRegistration(zk, path, payload(pid=1)).register()
    other = NodeRegistration(member, path, payload(pid=2), stale_wait_s=0.3)
    with pytest.raises(ConfigError, match="another live ZooKeeper session"):
        other.register()
    assert owner(zk, path) == zk.client_id[0]
    other.deregister()  # not ours: left alone
    assert owner(zk, path) == zk.client_id[0]


def test_stale_node_of_a_crashed_process_is_taken_over(
    zk: KazooClient, zk_config: ZkConfig, zk_paths: ZkPaths, member: KazooClient, spawn
) -> None:
    path = zk_paths.node("shard-0")
    code = textwrap.dedent(
        f"""
        import os, threading
        from services.core.clients import make_kazoo
        from services.core.config import ZkConfig
        from services.core.discovery.registry import NodeRegistration
        client = make_kazoo(ZkConfig({zk_config.hosts!r}, {zk_config.cluster!r}, session_timeout_s=1.0))
        NodeRegistration(client, {path!r}, b'{{"pid":%d}}' % os.getpid()).register()
        print("registered", flush=True)
        threading.Event().wait()
        """
    )
    proc = spawn.python("-c", code, name="crashing-shard")
    wait_for(lambda: "registered" in proc.log_text(), 15, "the child process to register")
    dead_session = owner(zk, path)
    assert node_data(zk, path) == {"pid": proc.pid}
    proc.kill()  # SIGKILL: its session lives on in ZooKeeper until it times out

    reg = NodeRegistration(member, path, payload(pid=os.getpid()), stale_wait_s=10)
    reg.register()  # waits (on a watch) for the dead session to expire, then takes over
    assert owner(zk, path) == member.client_id[0] != dead_session
    assert node_data(zk, path) == {"pid": os.getpid()}


# ---- cluster store --------------------------------------------------------------------------------


def test_shard_map_compare_and_set(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    a, b = ClusterStore(zk, zk_paths), ClusterStore(member, zk_paths)
    with pytest.raises(NotFoundError, match="placement init"):
        a.read_active()
    v0 = a.write_active(smap(1), None)
    with pytest.raises(FailedPreconditionError, match="changed since version none"):
        b.write_active(smap(1), None)  # create when it exists
    m, read_version = b.read_active()
    assert (m, read_version) == (smap(1), v0)

    v1 = a.write_active(smap(2), v0)  # a wins the race
    assert v1 == v0 + 1
    with pytest.raises(FailedPreconditionError, match=f"changed since version {v0}"):
        b.write_active(smap(3, nodes=3), read_version)  # b wrote against a stale read
    assert b.read_active() == (smap(2), v1)


def test_target_map_lifecycle(zk: KazooClient, zk_paths: ZkPaths) -> None:
    store = ClusterStore(zk, zk_paths)
    assert store.read_target() is None
    store.clear_target()  # idempotent when absent
    v = store.write_target(smap(2, nodes=3), None)
    assert store.read_target() == (smap(2, nodes=3), v)
    with pytest.raises(FailedPreconditionError):
        store.write_target(smap(3), v + 5)
    with pytest.raises(FailedPreconditionError):
        store.clear_target(v + 5)
    store.clear_target(v)
    assert store.read_target() is None


def test_model_and_versions(zk: KazooClient, zk_paths: ZkPaths) -> None:
    store = ClusterStore(zk, zk_paths)
    with pytest.raises(NotFoundError):
        store.read_serving_version()
    store.write_model("file:///ckpt", "demo")
    store.write_serving_version(3)
    store.write_target_version(4)
    store.write_target_version(5)
    assert store.read_model() == ModelPointer(uri="file:///ckpt", name="demo")
    assert (store.read_serving_version(), store.read_target_version()) == (3, 5)
    assert json.loads(zk.get(zk_paths.serving_version)[0]) == {"version": 3}


def test_watch_active_delivers_every_change(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    seen: list = []
    threads: set[str] = set()
    lock = threading.Lock()

    def on_map(m) -> None:  # kazoo thread: only records
        with lock:
            seen.append(None if m is None else m.version)
            threads.add(threading.current_thread().name)

    store = ClusterStore(zk, zk_paths)
    watch = ClusterStore(member, zk_paths).watch_active(on_map)
    assert seen == [None]  # first call: synchronous, no map yet
    v = store.write_active(smap(1), None)
    wait_for(lambda: seen[-1] == 1, 5, "the watch to deliver map version 1")
    v = store.write_active(smap(2), v)
    wait_for(lambda: seen[-1] == 2, 5, "the watch to deliver map version 2")
    zk.set(zk_paths.shardmap_active, b"garbage")  # malformed: logged, not delivered
    store.write_active(smap(3), v + 1)
    wait_for(lambda: seen[-1] == 3, 5, "the watch to deliver map version 3")
    assert seen == [None, 1, 2, 3]

    watch.cancel()
    store.write_active(smap(4), v + 2)
    store.write_active(smap(5), v + 3)
    assert store.read_active()[0].version == 5
    assert seen == [None, 1, 2, 3]


def test_members_watch_delivers_records_and_leaves_out_malformed_ones(zk: KazooClient, member: KazooClient, zk_paths: ZkPaths) -> None:
    seen: list[dict[str, NodeRecord]] = []
    lock = threading.Lock()

    def on_nodes(nodes: dict[str, NodeRecord]) -> None:  # the watch's own thread: only records
        with lock:
            seen.append(nodes)

    def last() -> dict[str, NodeRecord]:
        with lock:
            return seen[-1] if seen else {}

    watch = ClusterStore(zk, zk_paths).watch_nodes(on_nodes, dialable=True)
    try:
        first = NodeRegistration(member, zk_paths.node("shard-0"), NodeRecord(node_id="shard-0", address="h:1", versions_ready=(1,)))
        first.register()
        wait_for(lambda: last() == {"shard-0": first.record}, 5, "shard-0 to join")
        first.update(dataclasses.replace(first.record, versions_ready=(1, 2)))
        wait_for(lambda: last()["shard-0"].versions_ready == (1, 2), 5, "shard-0's new version")

        second = NodeRegistration(member, zk_paths.node("shard-1"), b"garbage")
        second.register()
        second.update(NodeRecord(node_id="shard-1"))  # valid, but names no address: not dialable
        second.update(NodeRecord(node_id="shard-1", address="h:2"))
        wait_for(lambda: set(last()) == {"shard-0", "shard-1"}, 5, "shard-1 to join once it is well-formed")
        with lock:
            assert all(s.get("shard-1", second.record) == second.record for s in seen), "a malformed shard-1 was delivered"

        first.deregister()
        wait_for(lambda: set(last()) == {"shard-1"}, 5, "shard-0 to leave")
        first.register()  # the same DataWatch picks it up again
        wait_for(lambda: set(last()) == {"shard-0", "shard-1"}, 5, "shard-0 to come back")
    finally:
        watch.cancel()


# ---- outages -------------------------------------------------------------------------------------


def test_zookeeper_restart_keeps_data_and_registrations(zk_server, zk_config: ZkConfig, zk_paths: ZkPaths) -> None:
    client = make_kazoo(zk_config)
    try:
        store = ClusterStore(client, zk_paths, timeout_s=0.5)
        store.write_active(smap(1), None)
        reg = NodeRegistration(client, zk_paths.node("shard-0"), payload(node_id="shard-0"))
        reg.register()
        port = zk_server.port
        zk_server.stop()
        try:
            with pytest.raises(UnavailableError, match="no answer from ZooKeeper within 0.5s"):
                store.read_active()  # kazoo queues it; the store's deadline ends the wait
        finally:
            zk_server.start()
        assert zk_server.port == port
        wait_for(lambda: client.connected, 10, "the client to reconnect after the restart")
        assert store.read_active()[0] == smap(1)
        wait_for(
            lambda: store.live_nodes() == {"shard-0": NodeRecord(node_id="shard-0")},
            10,
            "the registration to be present after the restart (session kept or re-registered)",
        )
    finally:
        client.stop()
        client.close()


def test_paused_zookeeper_suspends_clients(zk_server, zk_config: ZkConfig) -> None:
    client = make_kazoo(zk_config)
    states: list[str] = []
    client.add_listener(states.append)
    try:
        zk_server.pause()
        try:
            wait_for(lambda: KazooState.SUSPENDED in states, 10, "the client to see SUSPENDED")
        finally:
            zk_server.resume()
        wait_for(lambda: client.connected and client.exists("/") is not None, 15, "the client to recover")
    finally:
        client.stop()
        client.close()


# ---- CLI -------------------------------------------------------------------------------------------


def test_redis_fixture(redis_client, redis_prefix: str, redis_server) -> None:
    """The session Redis answers with bytes; keys live under this test's prefix."""
    key = f"{redis_prefix}user:1".encode()
    redis_client.set(key, b"\x00\x01")
    assert redis_client.get(key) == b"\x00\x01"
    assert redis_server.url.endswith(f":{redis_server.port}/0")


# ---- opt-in Docker path ----------------------------------------------------------------------------


@pytest.mark.docker
def test_docker_zookeeper_answers() -> None:
    from tests.support.servers import DockerZkServer, docker_available

    ok, why = docker_available()
    if not ok:
        pytest.skip(why)
    server = DockerZkServer()
    try:
        client = make_kazoo(ZkConfig(hosts=server.hosts, cluster="docker", session_timeout_s=1.0))
        client.ensure_path("/shardrec/docker")
        client.stop()
        client.close()
    finally:
        server.close()
