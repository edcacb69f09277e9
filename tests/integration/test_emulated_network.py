"""The emulated data centre network of ``bench compare --network dc`` (docs/deploy.md, "The
emulated-network benchmark"): the delay proxy forwards bytes intact and adds its delay each
way; the bandwidth cap is set up, holds and is torn down (in a network namespace of its own,
skipped with the reason where namespaces or tc are not permitted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.network.emulated import PROXY_HOST, EchoServer, EmulatedNetwork, NetworkConfig, NetworkMeter, enter_private_network, report_lines
from services.core.errors import ConfigError, FailedPreconditionError
from services.core.hostport import split_host_port
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
DELAY_MS = 20.0


@pytest.fixture
def proxy():
    """(proxy address, echo port, the proxy's process) with DELAY_MS each way."""
    echo = EchoServer("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.network.delay_proxy", "--delay-ms", str(DELAY_MS),
                             f"127.0.0.1:0=127.0.0.1:{echo.port}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    ready = wait_for(lambda: next((line for line in lines if line.startswith("READY")), None), 30, "the delay proxy printing READY")
    try:
        yield split_host_port(ready.split()[1]), echo.port, proc
    finally:
        echo.listener.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _rtt_s(address: tuple[str, int]) -> float:
    with socket.create_connection(address, timeout=10) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            c.sendall(b"x" * 100)
            got = 0
            while got < 100:
                got += len(c.recv(1 << 16))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_delay_proxy_forwards_bytes_intact(proxy) -> None:
    (host, port), _, _ = proxy
    payload = os.urandom(3 << 20)
    received = bytearray()
    with socket.create_connection((host, port), timeout=30) as c:
        sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        sender.start()
        while data := c.recv(1 << 16):  # EOF: the client's half-close went through and back
            received += data
        sender.join()
    assert bytes(received) == payload


def test_delay_proxy_adds_its_delay_each_way(proxy) -> None:
    address, echo_port, _ = proxy
    direct, proxied = _rtt_s(("127.0.0.1", echo_port)), _rtt_s(address)
    added = proxied - direct
    assert added >= 2 * DELAY_MS / 1e3, f"the proxy added {added * 1e3:.2f} ms to a round trip, less than 2 x {DELAY_MS} ms"
    assert added < 2 * DELAY_MS / 1e3 + 0.5, f"the proxy added {added * 1e3:.2f} ms to a round trip"


def test_delay_proxy_stops_on_sigterm(proxy) -> None:
    _, _, proc = proxy
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: proc.poll() is not None, 10, "the proxy exiting on SIGTERM")
    assert proc.returncode == 0


def test_link_cap_set_up_holds_and_torn_down() -> None:
    mbit, size = 16.0, 1_000_000
    run = subprocess.run([sys.executable, "-m", "tests.support.link_probe", str(mbit), str(size)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    probe = json.loads(run.stdout)
    if "skip" in probe:
        pytest.skip(f"the bandwidth cap cannot be set up here: {probe['skip']}")
    assert "htb" in probe["qdisc_during"]
    ideal_s = size * 8 / (mbit * 1e6)
    assert probe["capped_s"] >= 0.8 * ideal_s, f"{size} bytes at {mbit} Mbit/s took {probe['capped_s']:.3f} s (ideal {ideal_s:.3f} s)"
    assert probe["link_bytes"]["sink in"] >= size and probe["link_bytes"]["sink out"] < size / 10
    assert "htb" not in probe["qdisc_after"] and probe["classes_after"] == {}
    assert probe["free_s"] < probe["capped_s"] / 4, "the cap still held after clear()"


def test_entering_a_namespace_refuses_a_threaded_process() -> None:
    """Setting up a namespace needs a single-threaded process; this one has threads (pytest's
    and ours), so it refuses before touching anything."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(FailedPreconditionError, match="before any thread starts"):
            enter_private_network()
    finally:
        stop.set()
        t.join()


def test_network_config_and_report_without_proxy_or_cap(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        NetworkConfig(link_mbit=-1)
    network = EmulatedNetwork(NetworkConfig(link_mbit=0, delay_ms=0), tmp_path)
    assert network.shard_args() == () and network.frontend_args() == []
    network.start({"shard-0": 7001}, 6379)  # no proxy: nothing starts
    assert network.redis_url == "redis://127.0.0.1:6379/0" and network.proxy is None
    meter = NetworkMeter(network)
    meter.start()
    meter.stop()
    record = meter.to_dict(10)
    assert record["proxy_cpu_seconds_per_request"] is None and record["busiest_link_utilization"] is None
    doc = {"systems": [{"name": "shardrec", "runs": [{"label": "cpu", "network": record}]}]}
    assert "proxy CPU - ms/request" in report_lines(doc)[0]
    network.stop()


def test_emulated_network_proxies_every_server_and_calibrates(tmp_path: Path) -> None:
    """With a delay, the proxy stands on PROXY_HOST at each server's port; its added round trip
    is measured at start, and its CPU is metered apart; stop() ends it."""
    shard, redis = EchoServer("127.0.0.1"), EchoServer("127.0.0.1")
    network = EmulatedNetwork(NetworkConfig(link_mbit=0, delay_ms=2.0), tmp_path)
    try:
        network.start({"shard-0": shard.port}, redis.port)
        assert network.shard_args() == ("--advertise-host", PROXY_HOST)
        assert network.frontend_args() == ["--redis", f"redis://{PROXY_HOST}:{redis.port}/0"]
        assert network.describe()["added_rtt_ms_p50"] >= 4.0
        assert _rtt_s((PROXY_HOST, shard.port)) >= 4e-3
        meter = network.meter()
        meter.start()
        _rtt_s((PROXY_HOST, redis.port))
        meter.stop()
        assert meter.to_dict(5)["proxy_cpu_seconds_per_request"] is not None
    finally:
        network.stop()
        shard.listener.close()
        redis.listener.close()
    assert network.proxy is not None and network.proxy.returncode is not None
