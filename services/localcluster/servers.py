"""Real ZooKeeper and Redis server processes on loopback, for the local cluster and the tests:
free port, own session, log file, readiness probed by a real client, and stop / kill / pause /
resume / restart on the same port and data so tests inject faults for real
(docs/local-cluster.md, "Servers").

Not thread-safe: one thread (the launcher's or pytest's main thread) owns each object.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from services.core.errors import ConfigError, UnavailableError

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
SLF4J_NOP_JAR = Path("/usr/share/java/slf4j-nop.jar")
# ZooKeeper's own default; sessions then last at least 2 x tick = 4 s.
DEFAULT_ZK_TICK_MS = 2000
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Step of the readiness polling loop (each probe itself waits up to 1 s for an answer).
_PROBE_STEP_S = 0.02

INSTALL_HINT = "install the zookeeper and redis-server Debian packages (`make setup` does)"


class MissingServerError(ConfigError, RuntimeError):
    """A server binary is not installed; the message says how to install it."""


class ServerStartError(UnavailableError, RuntimeError):
    """A server exited while starting or did not answer in time; the message holds its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def log_tail(path: Path, max_chars: int = 4000) -> str:
    """The last ``max_chars`` characters of a log file, or ``"(no log)"``."""
    try:
        return Path(path).read_text(errors="replace")[-max_chars:]
    except OSError:
        return "(no log)"


class ServerProcess:
    """A server subprocess we start, signal and stop. Subclasses say how to run and probe it.

    ``pid`` and ``running`` describe the process this object started; ``port`` is fixed at
    construction, so a restart keeps the address.
    """

    name = "server"
    install_hint = INSTALL_HINT

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        *,
        log_path: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        kill_at_exit: bool = False,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path is not None else self.work_dir / f"{self.name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        if kill_at_exit:
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

        No-op if it is running. Raises ServerStartError (a RuntimeError) with the server's log
        if it exits or does not answer within ``ready_timeout_s``; the process is killed then.
        ``start()`` is ``launch()`` then ``wait_ready()``.
        """
        if self.running:
            return
        self.launch()
        self.wait_ready()

    def launch(self) -> int:
        """Start the process without waiting for it to answer; return its pid. No-op (the
        running pid) if it runs. Callers that must record the pid before anything can
        interrupt them (the local cluster) use this, then ``wait_ready()``."""
        if self.running:
            return self._proc.pid  # type: ignore[union-attr]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the launcher, not the server
            )
        finally:
            log.close()
        self._paused = False
        return self._proc.pid

    def wait_ready(self) -> None:
        """Poll until a client gets an answer; ServerStartError (process killed) if the
        process exits or ``ready_timeout_s`` passes first."""
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not launched")
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {proc.returncode} while starting on port "
                    f"{self.port}; log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self._probe(timeout_s=1.0):
                return
            if time.monotonic() >= deadline:
                self.close()
                raise ServerStartError(
                    f"{self.name} did not answer on port {self.port} within {self.ready_timeout_s:.0f}s; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(_PROBE_STEP_S)  # step of the readiness loop, not a wait for something

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
        """Undo what an earlier user may have left: resume if paused, start if stopped."""
        if self._paused:
            self.resume()
        if not self.running:
            self.start()

    def close(self) -> None:
        """Kill the server for good (teardown). Idempotent."""
        self.kill()

    def log_text(self) -> str:
        return log_tail(self.log_path, max_chars=1_000_000)


class ZkServer(ServerProcess):
    """A standalone ZooKeeper 3.8 on loopback.

    ``hosts`` is the connect string ("127.0.0.1:PORT"). ``tick_ms`` bounds session timeouts
    below (``min_session_timeout_ms``, default 2 x tick): the local cluster keeps ZooKeeper's
    2000 ms, tests use 200 ms so a 1 s session expires in about 1 s. ``stop()``/``start()``
    restart it on the same port and data directory (``<work_dir>/data``); ``pause()`` /
    ``resume()`` freeze it. Raises MissingServerError when java or the jar is missing.
    """

    name = "zookeeper"

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        *,
        tick_ms: int = DEFAULT_ZK_TICK_MS,
        min_session_timeout_ms: int | None = None,
        max_session_timeout_ms: int = 60_000,
        log_path: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        kill_at_exit: bool = False,
    ) -> None:
        java = shutil.which("java")
        missing = [what for what, ok in (("java", java), (str(ZOOKEEPER_JAR), ZOOKEEPER_JAR.exists())) if not ok]
        if missing:
            raise MissingServerError(f"ZooKeeper cannot start: {', '.join(missing)} not found; {self.install_hint}")
        self._java = java or "java"
        super().__init__(work_dir, port, log_path=log_path, ready_timeout_s=ready_timeout_s, kill_at_exit=kill_at_exit)
        self.tick_ms = tick_ms
        self.data_dir = self.work_dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.work_dir / "zoo.cfg"
        self.config_path.write_text(
            "\n".join(
                [
                    f"tickTime={tick_ms}",
                    f"minSessionTimeout={min_session_timeout_ms or 2 * tick_ms}",
                    f"maxSessionTimeout={max_session_timeout_ms}",
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
            "-XX:TieredStopAtLevel=1",  # starts faster; the load here is tiny
            "-cp",
            classpath,
            "-Dzookeeper.admin.enableServer=false",
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(self.config_path),
        ]

    def _probe(self, timeout_s: float) -> bool:
        from services.core.clients import make_kazoo
        from services.core.config import ZkConfig

        if not port_open(self.port):  # cheap until the JVM listens
            return False
        try:
            # A 0.5 s session timeout is also the connect/read timeout: a not-yet-serving
            # server costs 0.5 s, not 2; quiet, since a server not up yet is not news.
            client = make_kazoo(ZkConfig(self.hosts, "", session_timeout_s=0.5, connect_timeout_s=timeout_s), quiet=True)
        except UnavailableError:
            return False
        try:
            client.get_children("/")
            return True
        finally:
            client.stop()
            client.close()


class RedisServer(ServerProcess):
    """``redis-server`` on loopback with ``maxmemory-policy noeviction`` (a full store refuses
    writes instead of silently dropping records).

    ``persistence`` True: an append-only file, fsynced every second (``--appendonly yes
    --appendfsync everysec``, no RDB snapshots), so a restart on the same ``work_dir`` loses at
    most the last second of writes; False: nothing on disk (``--save '' --appendonly no``). It is
    read at each start, so a test may change it between restarts. ``replica_of`` (a port on
    127.0.0.1) starts it as a replica of that primary.

    ``url`` is ``redis://127.0.0.1:PORT/0``; with ``password`` the server requires AUTH (set in
    its config file, not on its command line). Raises MissingServerError when redis-server is
    not on PATH.
    """

    name = "redis"

    def __init__(
        self,
        work_dir: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        replica_of: int | None = None,
        log_path: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        kill_at_exit: bool = False,
        password: str | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise MissingServerError(f"Redis cannot start: redis-server not found; {self.install_hint}")
        self._binary = binary
        self.password = password
        self.persistence = persistence
        self.replica_of = replica_of
        super().__init__(work_dir, port, log_path=log_path, ready_timeout_s=ready_timeout_s, kill_at_exit=kill_at_exit)
        self._conf = self.work_dir / "redis.conf"
        fd = os.open(self._conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            if password:  # a replica shows the primary the same password
                f.write(f'requirepass "{password}"\nmasterauth "{password}"\n')

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _argv(self) -> list[str]:
        durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persistence else ["--appendonly", "no"]
        replica = ["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []
        return [
            self._binary,
            str(self._conf),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            *durability,
            "--maxmemory-policy", "noeviction",
            "--repl-diskless-sync-delay", "0",  # a replica syncs at once (no waiting for others)
            *replica,
            "--dir", str(self.work_dir),
        ]  # fmt: skip

    def _probe(self, timeout_s: float) -> bool:
        return redis_pings(self.url, timeout_s, self.password)


def redis_pings(url: str, timeout_s: float, password: str | None = None) -> bool:
    """True when the Redis (or Sentinel) at ``url`` answers PING within ``timeout_s``."""
    import redis

    from services.core.clients import make_redis
    from services.core.config import RedisAuth

    client = make_redis(url, timeout_s=timeout_s, retries=0, auth=RedisAuth(password))
    try:
        return bool(client.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):  # not up, or busy loading its data
        return False
    finally:
        client.close()
