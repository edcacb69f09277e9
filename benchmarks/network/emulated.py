"""The emulated data centre network of ``shardrec bench compare --network dc``
(docs/deploy.md, "The emulated-network benchmark").

- ``enter_private_network``: the benchmark process moves into a network namespace of its own
  (``unshare(CLONE_NEWNET)``, root), with only a loopback device; everything it starts (the
  cluster, the frontends, the load client) lives there, so shaping it touches nothing else on
  the machine, and it all disappears when the benchmark's processes exit.
- ``LinkShaper``: each remote server (every shard node, Redis) gets its own link of
  ``link_mbit`` in each direction: an htb class per server and direction on that loopback,
  selected by the server's address and port (this kernel has htb and tbf but no netem).
- ``EmulatedNetwork``: with ``delay_ms``, the delay proxy (``delay_proxy.py``, its own process,
  its CPU reported apart) stands in front of every server: shards advertise ``PROXY_HOST``
  (``--advertise-host``) where the proxy listens on their port, and frontends dial Redis there.
  ``NetworkMeter`` reads the proxy's CPU and each link's bytes over a measured window.
"""

from __future__ import annotations

import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from services.core.errors import ConfigError, FailedPreconditionError
from services.core.hostport import split_host_port
from services.localcluster.state import ROLE_SHARD

if TYPE_CHECKING:
    from services.localcluster.launcher import LocalCluster

PROXY_HOST = "127.0.0.2"  # where the delay proxy listens (the advertised addresses); servers bind 127.0.0.1
SERVER_HOST = "127.0.0.1"
CLONE_NEWNET = 0x40000000
READY_TIMEOUT_S = 30.0
_POLL_S = 0.05  # step of the polling loop while the proxy starts


@dataclass(frozen=True)
class NetworkConfig:
    """``link_mbit``: each server's link, each direction (0: no cap); ``delay_ms``: added one
    way by the delay proxy (0: no proxy)."""

    link_mbit: float = 1000.0
    delay_ms: float = 0.25

    def __post_init__(self) -> None:
        if self.link_mbit < 0 or self.delay_ms < 0:
            raise ConfigError("--link-mbit and --delay-ms must be >= 0")

    @property
    def proxied(self) -> bool:
        return self.delay_ms > 0


def enter_private_network() -> None:
    """Move this process into a new network namespace with its loopback up. Call it before the
    process starts a thread that opens sockets or processes (a thread keeps the namespace it
    was started in; native compute threads such as a BLAS pool's do neither). Raises
    FailedPreconditionError saying why when it cannot."""
    import ctypes

    if threading.active_count() != 1:
        raise FailedPreconditionError(f"--network must move the process into its namespace before any thread starts "
                                      f"({threading.active_count()} threads)")  # fmt: skip

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise FailedPreconditionError(f"--network needs a network namespace of its own: unshare(CLONE_NEWNET): {os.strerror(err)} "
                                      "(run as root, or without --network)")  # fmt: skip
    _run(["ip", "link", "set", "lo", "up"])


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise FailedPreconditionError(f"`{' '.join(argv)}` failed: {out.stderr.strip()}")
    return out.stdout


class LinkShaper:
    """htb on the namespace's loopback: class ``1:1`` (unshaped) by default; per server two
    classes of ``rate = ceil = link_mbit``, one for the bytes to it (destination its address
    and port) and one for the bytes from it (source its address and port). ``bytes()`` reads
    each class's counter."""

    def __init__(self, link_mbit: float) -> None:
        self.link_mbit = link_mbit
        self.classes: dict[str, str] = {}  # "shard-0 in" -> classid
        self.applied = False

    def apply(self, servers: dict[str, int]) -> None:
        """``servers``: name -> port on ``SERVER_HOST``."""
        rate = f"{self.link_mbit:g}mbit"
        _run(["tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "1"])
        self.applied = True
        _run(["tc", "class", "replace", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit", "quantum", "200000"])
        minor = 0x10
        for name, port in servers.items():
            for direction, match in (("in", ["dst", f"{SERVER_HOST}/32", "match", "ip", "dport"]),
                                     ("out", ["src", f"{SERVER_HOST}/32", "match", "ip", "sport"])):  # fmt: skip
                classid = f"1:{minor:x}"
                _run(["tc", "class", "replace", "dev", "lo", "parent", "1:", "classid", classid, "htb", "rate", rate, "ceil", rate,
                      "quantum", "200000"])  # fmt: skip
                _run(["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                      "match", "ip", *match, str(port), "0xffff", "flowid", classid])  # fmt: skip
                self.classes[f"{name} {direction}"] = classid
                minor += 1

    def clear(self) -> None:
        """Remove every cap: the loopback's root qdisc back to the kernel's default."""
        if self.applied:
            _run(["tc", "qdisc", "del", "dev", "lo", "root"])
            self.applied, self.classes = False, {}

    def bytes(self) -> dict[str, int]:
        """Bytes each link class has sent so far."""
        text = _run(["tc", "-s", "class", "show", "dev", "lo"])
        sent = {m.group(1): int(m.group(2)) for m in re.finditer(r"class htb (\S+) .*?\n\s*Sent (\d+) bytes", text)}
        return {name: sent.get(classid, 0) for name, classid in self.classes.items()}


class EchoServer:
    """A TCP echo server (a thread per connection): the far end of the proxy's calibration,
    and of the proxy in its tests."""

    def __init__(self, host: str = SERVER_HOST) -> None:
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def _rtt_us(host: str, port: int, pings: int = 300) -> float:
    """Median round trip of 100 bytes to ``host:port`` (an echo) over one connection."""
    with socket.create_connection((host, port), timeout=READY_TIMEOUT_S) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(pings):
            t0 = time.perf_counter()
            c.sendall(b"x" * 100)
            got = 0
            while got < 100:
                got += len(c.recv(65536))
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


class EmulatedNetwork:
    """The network of one benchmark: the delay proxy (``start``) and the link caps (``shape``).
    Main thread only; ``stop`` ends the proxy."""

    def __init__(self, config: NetworkConfig, logs_dir: Path) -> None:
        self.config = config
        self.logs_dir = logs_dir
        self.proxy: subprocess.Popen[bytes] | None = None
        self.shaper = LinkShaper(config.link_mbit) if config.link_mbit > 0 else None
        self.servers: dict[str, int] = {}
        self.redis_url = ""
        self.calibration: dict[str, float] = {}

    def shard_args(self) -> tuple[str, ...]:
        """Further ``shard serve`` flags: advertise the proxy's address (the port is the shard's)."""
        return ("--advertise-host", PROXY_HOST) if self.config.proxied else ()

    def start(self, shard_ports: dict[str, int], redis_port: int) -> None:
        """Start the proxy in front of every shard and Redis (with ``delay_ms``), and measure
        what it adds to a round trip."""
        self.servers = {**shard_ports, "redis": redis_port}
        host = PROXY_HOST if self.config.proxied else SERVER_HOST
        self.redis_url = f"redis://{host}:{redis_port}/0"
        if not self.config.proxied:
            return
        echo = EchoServer()
        routes = [f"{PROXY_HOST}:{p}={SERVER_HOST}:{p}" for p in [*self.servers.values(), echo.port]]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / "delay-proxy.log"
        with open(log, "wb") as out:
            self.proxy = subprocess.Popen([sys.executable, "-m", "benchmarks.network.delay_proxy", "--delay-ms", str(self.config.delay_ms), *routes],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "READY" not in log.read_text(errors="replace"):
            if self.proxy.poll() is not None or time.monotonic() > deadline:
                raise FailedPreconditionError(f"the delay proxy did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(_POLL_S)  # step of the polling loop
        try:
            direct, proxied = _rtt_us(SERVER_HOST, echo.port), _rtt_us(PROXY_HOST, echo.port)
        finally:
            echo.close()
        self.calibration = {"rtt_direct_us_p50": round(direct, 1), "rtt_proxied_us_p50": round(proxied, 1),
                            "added_rtt_ms_p50": round((proxied - direct) / 1e3, 3)}  # fmt: skip

    def frontend_args(self) -> list[str]:
        """Further ``frontend serve`` flags: Redis through the proxy (the shards come through
        it by their advertised addresses)."""
        return ["--redis", self.redis_url] if self.config.proxied else []

    def shape(self) -> None:
        """Cap every server's link (after loading, so only the measured traffic is shaped)."""
        if self.shaper is not None:
            self.shaper.apply(self.servers)

    def describe(self) -> dict:
        return {**asdict(self.config), "servers": sorted(self.servers), "proxy_pid": self.proxy.pid if self.proxy else None,
                **self.calibration}  # fmt: skip

    def meter(self) -> "NetworkMeter":
        return NetworkMeter(self)

    def stop(self) -> None:
        """Remove the caps and end the proxy (the namespace goes with the benchmark's processes)."""
        if self.shaper is not None:
            self.shaper.clear()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()


class NetworkMeter:
    """A window meter (``run_load(meters=[...])``): the delay proxy's CPU seconds and each
    link's bytes between start and stop. ``to_dict(requests)`` per request."""

    def __init__(self, network: EmulatedNetwork) -> None:
        from benchmarks.harness.cpu import CpuMeter

        self.network = network
        self.cpu = CpuMeter({network.proxy.pid: "delay-proxy"} if network.proxy is not None else {})
        self._bytes0: dict[str, int] = {}
        self.link_bytes: dict[str, int] = {}
        self._t0 = self.seconds = 0.0

    def start(self) -> None:
        self.cpu.start()
        self._bytes0 = self.network.shaper.bytes() if self.network.shaper else {}
        self._t0 = time.monotonic()

    def tick(self) -> None:
        self.cpu.tick()

    def stop(self) -> None:
        self.cpu.stop()
        self.seconds = time.monotonic() - self._t0
        now = self.network.shaper.bytes() if self.network.shaper else {}
        self.link_bytes = {k: v - self._bytes0.get(k, 0) for k, v in now.items()}

    def to_dict(self, requests: int) -> dict:
        n, s = max(requests, 1), max(self.seconds, 1e-9)
        busiest = max(self.link_bytes.values(), default=0)
        return {
            "proxy_cpu_seconds": round(self.cpu.seconds, 6),
            "proxy_cpu_seconds_per_request": round(self.cpu.seconds / n, 9) if self.network.proxy else None,
            "link_bytes_per_request": {k: round(v / n, 1) for k, v in sorted(self.link_bytes.items())},
            "busiest_link_utilization": round(busiest * 8 / s / (self.network.config.link_mbit * 1e6), 4) if self.network.shaper else None,
        }


def server_ports(cluster: "LocalCluster") -> tuple[dict[str, int], int]:
    """(shard node -> the port it registered, Redis's port) of a started cluster."""
    shards = {name: split_host_port(cluster.state.record(name).address)[1] for name in cluster.pids(ROLE_SHARD)}
    port = urlparse(cluster.state.redis_url).port
    if port is None:
        raise FailedPreconditionError(f"--network: the cluster's Redis URL {cluster.state.redis_url!r} has no port")
    return shards, port


def report_lines(doc: dict) -> list[str]:
    """One line per measured run: the proxy's CPU per request (not in the system's) and the
    busiest link's utilisation."""
    lines = []
    for s in doc["systems"]:
        for r in s["runs"]:
            n = r.get("network") or {}
            cpu = n.get("proxy_cpu_seconds_per_request")
            cpu_ms = "-" if cpu is None else f"{cpu * 1e3:.3f}"
            lines.append(f"  {s['name']:<17} {r['label']:<16} proxy CPU {cpu_ms} ms/request (not in the system's), "
                         f"busiest link {n.get('busiest_link_utilization')}")  # fmt: skip
    return lines
