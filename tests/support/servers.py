"""Real ZooKeeper and Redis servers for tests: one process each per test session.

``ZkServer`` runs ZooKeeper 3.8 standalone (Debian's ``/usr/share/java/zookeeper.jar``) with a
tick of 200 ms, so a session of 1 s expires in about 1 s; ``RedisServer`` runs ``redis-server``
without persistence. Both listen on a free loopback port, log to a file in their work
directory, and can be stopped, restarted on the same port and data, paused (SIGSTOP) and
resumed (SIGCONT) to inject faults for real.

An opt-in Docker path (``SHARDREC_TEST_DOCKER=1`` and a Docker engine that answers) runs the
same servers as containers through testcontainers; see ``docker_available``.

Every method here is called from the pytest main thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
SLF4J_NOP_JAR = Path("/usr/share/java/slf4j-nop.jar")
ZK_TICK_MS = 200
ZK_MIN_SESSION_TIMEOUT_MS = 400
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

_INSTALL_HINT = "run `make test`, which installs the zookeeper and redis-server Debian packages"


class MissingServerError(RuntimeError):
    """A server binary is not installed; the message says how to install it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


_QUIET_LOG = logging.getLogger("tests.support.servers.probe")
_QUIET_LOG.setLevel(logging.CRITICAL)


def _log_tail(path: Path, max_chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-max_chars:]
    except OSError:
        return "(no log)"


class _ServerProcess:
    """A server subprocess we start, signal and stop. Subclasses say how to run and probe it."""

    name = "server"

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.work_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        atexit.register(self.close)  # backstop if the session ends without teardown

    # -- subclass hooks ------------------------------------------------------------------
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, timeout_s: float) -> bool:
        """True when the server answers a client (tried once, within ``timeout_s``)."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    def start(self) -> None:
        """Start the server (same port and data as before) and return once a client connects.

        No-op if it is running. Raises RuntimeError with the server's log if it exits or does
        not answer within 30 s.
        """
        if self.running:
            return
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the server
            )
        finally:
            log.close()
        self._paused = False
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._proc.returncode} while starting on port "
                    f"{self.port}; log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if self._probe(timeout_s=1.0):
                return
            if time.monotonic() >= deadline:
                self.close()
                raise RuntimeError(
                    f"{self.name} did not answer on port {self.port} within {READY_TIMEOUT_S:.0f}s; "
                    f"log {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.02)  # step of the readiness loop, not a wait for something

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); its data stays for ``start()``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        self._proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the server (a crash); its data stays for ``start()``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        self._proc = None
        self._paused = False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP). Clients see no answers; a frozen ZooKeeper expires nothing."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        os.kill(self._proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        self._paused = True

    def resume(self) -> None:
        """Unfreeze the server (SIGCONT)."""
        if self.running:
            os.kill(self._proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        self._paused = False

    def ensure_running(self) -> None:
        """Undo what an earlier test may have left: resume if paused, start if stopped."""
        if self._paused:
            self.resume()
        if not self.running:
            self.start()

    def close(self) -> None:
        """Kill the server for good (session teardown). Idempotent."""
        self.kill()

    def log_text(self) -> str:
        return _log_tail(self.log_path, max_chars=1_000_000)


class ZkServer(_ServerProcess):
    """A standalone ZooKeeper 3.8: tickTime 200 ms, minSessionTimeout 400 ms, loopback only.

    ``hosts`` is the connect string ("127.0.0.1:PORT"). ``stop()``/``start()`` restart it on
    the same port and data directory (an outage that keeps data); ``pause()``/``resume()``
    freeze it.
    """

    name = "zookeeper"

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        java = shutil.which("java")
        missing = [what for what, ok in (("java", java), (str(ZOOKEEPER_JAR), ZOOKEEPER_JAR.exists())) if not ok]
        if missing:
            raise MissingServerError(f"ZooKeeper cannot start: {', '.join(missing)} not found; {_INSTALL_HINT}")
        self._java = java or "java"
        super().__init__(work_dir, port)
        self.data_dir = self.work_dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.work_dir / "zoo.cfg"
        self.config_path.write_text(
            "\n".join(
                [
                    f"tickTime={ZK_TICK_MS}",
                    f"minSessionTimeout={ZK_MIN_SESSION_TIMEOUT_MS}",
                    "maxSessionTimeout=60000",
                    f"dataDir={self.data_dir}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "maxClientCnxns=0",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,stat,srvr,mntr,cons",
                    "",
                ]
            )
        )

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        classpath = f"{ZOOKEEPER_JAR}:{SLF4J_NOP_JAR}"
        return [
            self._java,
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # starts faster; the load in tests is tiny
            "-cp",
            classpath,
            "-Dzookeeper.admin.enableServer=false",
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.config_path),
        ]

    def _probe(self, timeout_s: float) -> bool:
        from kazoo.client import KazooClient
        from kazoo.handlers.threading import KazooTimeoutError
        from kazoo.retry import KazooRetry

        if not _port_open(self.port):  # cheap until the JVM listens
            return False
        client = KazooClient(
            hosts=self.hosts,
            timeout=0.5,  # also the connect/read timeout: a not-yet-serving server costs 0.5 s, not 2
            connection_retry=KazooRetry(max_tries=-1, delay=0.02, backoff=1, max_jitter=0.0),
            logger=_QUIET_LOG,
        )
        try:
            client.start(timeout=timeout_s)
            client.get_children("/")
            return True
        except KazooTimeoutError:
            return False
        finally:
            client.stop()
            client.close()


class RedisServer(_ServerProcess):
    """``redis-server`` on loopback without persistence (``--save '' --appendonly no``)."""

    name = "redis"

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise MissingServerError(f"Redis cannot start: redis-server not found; {_INSTALL_HINT}")
        self._binary = binary
        super().__init__(work_dir, port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            self._binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.work_dir),
        ]  # fmt: skip

    def _probe(self, timeout_s: float) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()


# -- opt-in Docker path ---------------------------------------------------------------------

DOCKER_ENV = "SHARDREC_TEST_DOCKER"


def docker_available() -> tuple[bool, str]:
    """(True, "") when ``SHARDREC_TEST_DOCKER=1``, testcontainers is installed and a Docker
    engine answers a ping; otherwise (False, why)."""
    if os.environ.get(DOCKER_ENV) != "1":
        return False, f"set {DOCKER_ENV}=1 to run servers in Docker containers"
    try:
        import docker  # installed with testcontainers (pip install '.[docker]')
        import testcontainers  # noqa: F401
    except ImportError as e:
        return False, f"testcontainers is not installed (pip install '.[docker]'): {e}"
    try:
        docker.from_env(timeout=3).ping()
    except Exception as e:  # any failure to reach the engine means: no Docker here
        return False, f"no Docker engine answers: {e}"
    return True, ""


class _DockerServer:
    """A server in a container on a fixed host port, so stop()/start() keep the address.

    Data survives stop()/start() because the container is stopped, not removed.
    """

    image = ""
    container_port = 0

    def __init__(self, port: int | None = None) -> None:
        from testcontainers.core.container import DockerContainer

        self.port = port or free_port()
        self._container = DockerContainer(self.image).with_bind_ports(self.container_port, self.port)
        self._configure(self._container)
        self._container.start()
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
        self._container.stop()

    def log_text(self) -> str:
        out, err = self._container.get_logs()
        return (out + err).decode(errors="replace")


class DockerZkServer(_DockerServer):
    image = "zookeeper:3.8"
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
    image = "redis:7"
    container_port = 6379

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
