"""Fixtures shared by every test: real servers, per-test isolation, service processes.

Session-wide: ``zk_server`` (ZooKeeper 3.8) and ``redis_server`` (redis-server), each one real
process on a free loopback port (or a container when ``SHARDREC_TEST_DOCKER=1`` and Docker
answers). Per test: ``cluster_name`` (every znode of a cluster lives under
``/shardrec/<cluster>/``, so a fresh name isolates a test like a chroot), ``zk_config``, ``zk``,
``redis_prefix``, ``redis_client`` and ``spawn``.

Tests wait with ``tests.support.waiting.wait_for``, never with bare sleeps.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so every test imports ``tests.support`` by one name
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.processes import ProcessFactory  # noqa: E402
from tests.support import servers  # noqa: E402

_SPAWN_KEY = pytest.StashKey[ProcessFactory]()


def _docker_or_none() -> bool:
    ok, _why = servers.docker_available()
    return ok


def _session_server(local_cls, docker_cls, work_dir_factory):
    """A started server of ``local_cls`` in a fresh folder (or ``docker_cls`` where Docker is
    opted in); a missing binary fails the session with the install hint, not a skip."""
    if _docker_or_none():
        return docker_cls()
    missing = None
    try:
        server = local_cls(work_dir_factory())
    except servers.MissingServerError as e:
        missing = str(e)
    if missing:
        pytest.fail(missing, pytrace=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.ZkServer]:
    """A real ZooKeeper for the whole session: ``.hosts``, ``.port``, ``.stop()``, ``.start()``
    (same port and data), ``.kill()``, ``.pause()``, ``.resume()``. Killed at session end."""
    server = _session_server(servers.ZkServer, servers.DockerZkServer, lambda: tmp_path_factory.mktemp("zookeeper"))
    try:
        yield server  # type: ignore[misc]
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    """A real Redis for the whole session: ``.port``, ``.url``, same lifecycle methods."""
    server = _session_server(servers.RedisServer, servers.DockerRedisServer, lambda: tmp_path_factory.mktemp("redis"))
    try:
        yield server  # type: ignore[misc]
    finally:
        server.close()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ``small`` demo model (seed 9), generated once per session; tests only read it."""
    from services.core.synth import synthesize

    root = tmp_path_factory.mktemp("small-checkpoint")
    synthesize(root, "small", seed=9)
    return str(root)


@pytest.fixture(scope="session")
def small_reference(small_checkpoint: str):
    """The reference recommender (the oracle) over ``small_checkpoint``."""
    from services.core.reference import ReferenceRecommender

    return ReferenceRecommender(small_checkpoint)


@pytest.fixture
def cluster_name() -> str:
    """A cluster name unique to this test, e.g. ``t-3f2a9c1b0d``."""
    return "t-" + uuid.uuid4().hex[:10]


@pytest.fixture
def zk_config(zk_server: servers.ZkServer, cluster_name: str):
    """``ZkConfig`` for this test's cluster on the session ZooKeeper, with a 1 s session.

    Also undoes an outage an earlier test left (resumes or restarts the server).
    """
    from services.core.config import ZkConfig

    zk_server.ensure_running()
    return ZkConfig(hosts=zk_server.hosts, cluster=cluster_name, session_timeout_s=1.0, connect_timeout_s=10.0)


@pytest.fixture
def zk_paths(cluster_name: str):
    """``ZkPaths`` of this test's cluster."""
    from services.core.discovery.zk_paths import ZkPaths

    return ZkPaths(cluster_name)


@pytest.fixture
def zk(zk_config, zk_paths):
    """A started kazoo client for the test (from ``services.core.clients.make_kazoo``).

    At teardown the test's whole cluster tree is deleted and the client stopped and closed.
    """
    from services.core.clients import make_kazoo

    client = make_kazoo(zk_config)
    try:
        yield client
    finally:
        try:
            client.delete(zk_paths.base, recursive=True)
        except Exception:  # best effort: the test may have left ZooKeeper down
            pass
        client.stop()
        client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A Redis key prefix unique to this test, e.g. ``t:3f2a9c1b0d:``."""
    return f"t:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def redis_client(redis_server: servers.RedisServer, redis_prefix: str):
    """``redis.Redis`` (bytes in, bytes out) on the session server; the test's keys are
    deleted at teardown."""
    from services.core.clients import make_redis

    redis_server.ensure_running()
    client = make_redis(redis_server.url)
    try:
        yield client
    finally:
        try:
            keys = list(client.scan_iter(match=redis_prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def spawn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessFactory]:
    """Start service processes: ``spawn("shard", "--node-id", ...)`` runs ``shardrec shard
    --node-id ...`` (a child Python running the CLI); ``spawn.python("-c", code)`` runs any
    Python. Each logs to ``tmp_path/logs/<name>.log``; the logs are attached to a failing
    test's report; every process still running at teardown is killed with its process group."""
    factory = ProcessFactory(tmp_path / "logs")
    request.node.stash[_SPAWN_KEY] = factory
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    """Attach the logs of the test's service processes to its failure report."""
    report = yield
    if report.failed and report.when in ("setup", "call"):
        factory = item.stash.get(_SPAWN_KEY, None)
        if factory is not None and factory.processes:
            report.sections.append(("service process logs", factory.logs()))
    return report
