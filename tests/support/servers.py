"""Real ZooKeeper and Redis servers for tests: one process each per test session.

``ZkServer`` runs ZooKeeper 3.8 standalone (Debian's ``/usr/share/java/zookeeper.jar``) with a
tick of 200 ms, so a session of 1 s expires in about 1 s; ``RedisServer`` runs ``redis-server``
without persistence (unless asked), ``SentinelServer`` a ``redis-sentinel`` watching one primary
(tests start those per module). All listen on a free loopback port, log to a file in their work
directory, and can be stopped, restarted on the same port and data, paused (SIGSTOP) and
resumed (SIGCONT) to inject faults for real.

The process handling is ``services.localcluster.servers`` (the same code starts the servers of
``shardrec demo`` and ``shardrec cluster up``); this module only fixes the test settings: the
200 ms tick, an ``atexit`` kill as a backstop, and the install hint.

An opt-in Docker path (``SHARDREC_TEST_DOCKER=1`` and a Docker engine that answers) runs the
same servers as containers through testcontainers; see ``docker_available``.

Every method here is called from the pytest main thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path

from services.localcluster import servers as local_servers
from services.localcluster.servers import (  # noqa: F401  (re-exported for tests)
    READY_TIMEOUT_S,
    SLF4J_NOP_JAR,
    STOP_TIMEOUT_S,
    ZOOKEEPER_JAR,
    MissingServerError,
    ServerStartError,
    free_port,
)

ZK_TICK_MS = 200
ZK_MIN_SESSION_TIMEOUT_MS = 400

_INSTALL_HINT = "run `make test`, which installs the zookeeper, redis-server and redis-sentinel Debian packages"

_QUIET_LOG = logging.getLogger("tests.support.servers.probe")
_QUIET_LOG.setLevel(logging.CRITICAL)


class ZkServer(local_servers.ZkServer):
    """A standalone ZooKeeper 3.8: tickTime 200 ms, minSessionTimeout 400 ms, loopback only.

    ``hosts`` is the connect string ("127.0.0.1:PORT"). ``stop()``/``start()`` restart it on
    the same port and data directory (an outage that keeps data); ``pause()``/``resume()``
    freeze it. Killed at interpreter exit if the session ends without teardown.
    """

    install_hint = _INSTALL_HINT

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        super().__init__(
            work_dir, port, tick_ms=ZK_TICK_MS, min_session_timeout_ms=ZK_MIN_SESSION_TIMEOUT_MS, kill_at_exit=True
        )


class RedisServer(local_servers.RedisServer):
    """``redis-server`` on loopback, without persistence unless asked (``persistence``, read at
    each start; ``replica_of`` a primary's port). Killed at interpreter exit if the session ends
    without teardown."""

    install_hint = _INSTALL_HINT

    def __init__(
        self, work_dir: Path, port: int | None = None, *, persistence: bool = False, replica_of: int | None = None,
        password: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(work_dir, port, persistence=persistence, replica_of=replica_of, kill_at_exit=True, password=password)


class SentinelServer(local_servers.ServerProcess):
    """One ``redis-sentinel`` (Debian's redis-sentinel package) watching the primary on
    ``127.0.0.1:primary_port`` as ``master``, quorum 1, so the test's failovers are quick: the
    primary is down after ``down_after_ms`` without an answer, and a failover that stalls is
    retried after ``failover_timeout_ms``. ``url`` is the ``redis+sentinel://`` URL of the
    primary it watches. ``password``: the primary's (``sentinel auth-pass``), and with
    ``requirepass`` the sentinel's own too. Killed at interpreter exit if the session ends
    without teardown."""

    name = "sentinel"
    install_hint = _INSTALL_HINT

    def __init__(
        self, work_dir: Path, primary_port: int, *, master: str = "features", down_after_ms: int = 500,
        failover_timeout_ms: int = 2000, port: int | None = None, password: str | None = None, requirepass: bool = False,
    ) -> None:  # fmt: skip
        import shutil

        binary = shutil.which("redis-sentinel")
        if binary is None:
            raise MissingServerError(f"Redis Sentinel cannot start: redis-sentinel not found; {self.install_hint}")
        self._binary = binary
        super().__init__(work_dir, port, kill_at_exit=True)
        self.master = master
        self.password = password
        self._own_password = password if requirepass else None
        auth = [f'sentinel auth-pass {master} "{password}"'] if password else []
        auth += [f'requirepass "{password}"'] if requirepass and password else []
        self.config_path = self.work_dir / "sentinel.conf"  # sentinel rewrites it: its own copy
        self.config_path.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    "daemonize no",
                    f"dir {self.work_dir}",
                    f"sentinel monitor {master} 127.0.0.1 {primary_port} 1",
                    f"sentinel down-after-milliseconds {master} {down_after_ms}",
                    f"sentinel failover-timeout {master} {failover_timeout_ms}",
                    f"sentinel parallel-syncs {master} 1",
                    *auth,
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.master}"

    def _argv(self) -> list[str]:
        return [self._binary, str(self.config_path)]

    def _client(self, timeout_s: float):  # noqa: ANN202
        from services.core.clients import make_redis
        from services.core.config import RedisAuth

        return make_redis(f"redis://127.0.0.1:{self.port}/0", timeout_s=timeout_s, retries=0, auth=RedisAuth(self._own_password))

    def _probe(self, timeout_s: float) -> bool:
        return local_servers.redis_pings(f"redis://127.0.0.1:{self.port}/0", timeout_s, self._own_password)

    def primary_port(self) -> int | None:
        """The port of the primary the sentinel names now (None when it names none)."""
        client = self._client(1.0)
        try:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        finally:
            client.close()
        return None if not addr else int(addr[1])

    def replicas_known(self) -> int:
        """How many replicas of the primary the sentinel knows and sees up (whether they are in
        sync, ask them: ``INFO replication``)."""
        client = self._client(1.0)
        try:
            replicas = client.execute_command("SENTINEL", "REPLICAS", self.master)
        finally:
            client.close()
        fields = [r if isinstance(r, dict) else dict(zip(r[::2], r[1::2])) for r in replicas]
        return sum(b"down" not in f.get(b"flags", b"") for f in fields)


# -- opt-in Docker path ---------------------------------------------------------------------

DOCKER_ENV = "SHARDREC_TEST_DOCKER"


def docker_available() -> tuple[bool, str]:
    """(True, "") when ``SHARDREC_TEST_DOCKER=1``, testcontainers is installed, a Docker
    engine answers a ping and the ZooKeeper and Redis images are there (``make image`` builds
    them from Debian's packages, no registry needed); otherwise (False, why)."""
    if os.environ.get(DOCKER_ENV) != "1":
        return False, f"set {DOCKER_ENV}=1 to run servers in Docker containers"
    try:
        import docker  # installed with testcontainers (pip install '.[docker]')
        import testcontainers  # noqa: F401
    except ImportError as e:
        return False, f"testcontainers is not installed (pip install '.[docker]'): {e}"
    try:
        client = docker.from_env(timeout=3)
        client.ping()
    except Exception as e:  # any failure to reach the engine means: no Docker here
        return False, f"no Docker engine answers: {e}"
    try:
        for image in (DockerZkServer.image, DockerRedisServer.image):
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                return False, f"image {image} is missing: run `make image` (deploy/build_images.py)"
    finally:
        client.close()
    return True, ""


class _DockerServer:
    """A server in a container on a fixed host port (127.0.0.1 only), so stop()/start() keep
    the address.

    Data survives stop()/start() because the container is stopped, not removed. The images are
    the ones ``make image`` builds locally; testcontainers' reaper (Ryuk) is off because its
    image cannot be pulled without a registry: ``close()`` removes the container, and an
    ``atexit`` hook does so if the session ends without teardown.
    """

    image = ""
    container_port = 0

    def __init__(self, port: int | None = None) -> None:
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.container import DockerContainer

        testcontainers_config.ryuk_disabled = True
        self.port = port or free_port()
        self._container = DockerContainer(self.image)
        # published on loopback only (with_bind_ports takes no host address; docker-py does)
        self._container.ports[str(self.container_port)] = ("127.0.0.1", self.port)
        self._configure(self._container)
        self._closed = False
        self._container.start()
        atexit.register(self.close)
        self._paused = False
        self._wait_ready()

    def _configure(self, container) -> None:  # noqa: ANN001
        pass

    def _wait_ready(self) -> None:
        from tests.support.waiting import wait_for

        wait_for(lambda: self._probe(1.0), READY_TIMEOUT_S, f"{self.image} container on port {self.port}")

    def _probe(self, timeout_s: float) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        c = self._container.get_wrapped_container()
        c.reload()
        return c.status == "running"

    def start(self) -> None:
        self._container.get_wrapped_container().start()
        self._wait_ready()

    def stop(self) -> None:
        self._container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT_S))

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def pause(self) -> None:
        self._container.get_wrapped_container().pause()
        self._paused = True

    def resume(self) -> None:
        self._container.get_wrapped_container().unpause()
        self._paused = False

    def ensure_running(self) -> None:
        if self._paused:
            self.resume()
        if not self.running:
            self.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._container.stop()  # removes the container and its volumes

    def log_text(self) -> str:
        out, err = self._container.get_logs()
        return (out + err).decode(errors="replace")


class DockerZkServer(_DockerServer):
    """``shardrec-zookeeper:3.8`` (deploy/images/, configured like the official image by ZOO_*
    variables) with the test settings of ``ZkServer``."""

    image = "shardrec-zookeeper:3.8"
    container_port = 2181

    def _configure(self, container) -> None:  # noqa: ANN001
        container.with_env("ZOO_TICK_TIME", str(ZK_TICK_MS)).with_env(
            "ZOO_CFG_EXTRA", f"minSessionTimeout={ZK_MIN_SESSION_TIMEOUT_MS}"
        ).with_env("ZOO_ADMINSERVER_ENABLED", "false")

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    _probe = ZkServer._probe


class DockerRedisServer(_DockerServer):
    """``shardrec-redis:7`` (deploy/images/) without persistence, like ``RedisServer``; no
    AUTH (``password`` None: the session's Redis of ``RedisServer`` has none either)."""

    image = "shardrec-redis:7"
    container_port = 6379
    password: str | None = None

    def _configure(self, container) -> None:  # noqa: ANN001
        container.with_command(["redis-server", "--save", "", "--appendonly", "no"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    _probe = RedisServer._probe


# -- fault injection helpers ----------------------------------------------------------------


def expire_session(hosts: str, client, timeout_s: float = 10.0) -> int:  # noqa: ANN001
    """Expire a kazoo ``client``'s session for real; return the expired session id.

    A second client attaches to the same session (id + password), which makes the server drop
    the first client's connection, then closes the session. The first client reconnects,
    learns the session expired (state LOST, its ephemeral znodes are gone) and starts a new
    session. Repeated if the first client won the race and re-attached in between. Returns once
    ``client`` is connected with a new session. Called from the test thread.
    """
    from kazoo.client import KazooClient

    cid = client.client_id
    if cid is None:
        raise AssertionError("expire_session: the client is not connected")
    session_id, password = cid
    deadline = time.monotonic() + timeout_s
    while True:
        other = KazooClient(hosts=hosts, client_id=(session_id, password), timeout=1.0, logger=_QUIET_LOG)
        other.start(timeout=timeout_s)
        other.stop()
        other.close()
        attempt_deadline = min(deadline, time.monotonic() + 2.0)
        while time.monotonic() < attempt_deadline:
            now = client.client_id
            if now is not None and now[0] != session_id:
                return session_id
            time.sleep(0.01)  # step of the polling loop
        if time.monotonic() >= deadline:
            raise AssertionError(f"session 0x{session_id:x} did not expire within {timeout_s:.0f}s")
