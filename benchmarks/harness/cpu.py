"""What the system under test spent: CPU seconds of its processes and the frontend's counters.

``CpuMeter(pids)`` sums user + system CPU time (every thread of each process, via psutil) over
a window; ``CounterMeter(address)`` reads ``FrontendAdmin.GetStats`` at both edges of the window
and keeps the delta (bytes on the wire per feature side, batches, Lookup RPCs, ...). Both fit
``run_load(..., meters=[...])``, which starts them when the measured window opens and stops
them when it closes (after warm-up, before the drain).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
import psutil

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.clients import make_channel

# Counters that are levels, not running totals: their delta is the later value.
GAUGE_COUNTERS = frozenset({"largest_batch", "view_live_nodes"})
# The counter of Recommend requests the frontend handled (the denominator of per-request figures).
REQUESTS_COUNTER = "requests_batched"
WIRE_BYTES_PREFIX = "wire_bytes_"


@dataclass
class _Proc:
    pid: int
    name: str
    proc: psutil.Process | None
    first: float | None = None  # cpu seconds at start
    last: float | None = None  # latest reading
    exited: bool = False


def _cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()  # user + system of every thread; children of the process are not included
    return float(t.user + t.system)


class CpuMeter:
    """CPU seconds (user + system, all threads) consumed by a set of processes in a window.

    ``pids``: process ids, or a mapping ``{pid: name}`` (names label ``by_process``). A process
    that exits during the window counts up to its last reading (``start``, each ``tick``, or
    ``stop``; ``run_load`` ticks every progress interval) and is listed in ``exited``; a pid that
    does not exist at ``start`` is listed in ``missing`` and counts 0. Child processes are not
    followed: pass every pid of the system under test. Owned by one thread or loop.

        meter = CpuMeter({12: "frontend", 13: "shard-0"})
        meter.start(); ...; meter.stop()
        meter.seconds, meter.by_process
    """

    def __init__(self, pids: Iterable[int] | Mapping[int, str]) -> None:
        names = dict(pids) if isinstance(pids, Mapping) else {int(p): str(p) for p in pids}
        self._procs = [_Proc(int(pid), name, None) for pid, name in names.items()]
        self._started = self._stopped = False

    def start(self) -> None:
        for p in self._procs:
            p.exited = False
            try:
                p.proc = psutil.Process(p.pid)
                p.first = p.last = _cpu_seconds(p.proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                p.proc, p.first, p.last = None, None, None
        self._started, self._stopped = True, False

    def tick(self) -> None:
        """Refresh every process's reading (bounds what an exiting process can lose)."""
        for p in self._procs:
            if p.proc is None or p.exited:
                continue
            try:
                p.last = _cpu_seconds(p.proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                p.exited = True

    def stop(self) -> None:
        if not self._started:
            raise RuntimeError("CpuMeter.stop() before start()")
        self.tick()
        self._stopped = True

    @property
    def seconds(self) -> float:
        """CPU seconds consumed by all processes between ``start`` and ``stop`` (or now's last
        reading)."""
        return sum(self.by_process.values())

    @property
    def by_process(self) -> dict[str, float]:
        return {p.name: (p.last - p.first) if p.first is not None else 0.0 for p in self._procs}  # type: ignore[operator]

    @property
    def exited(self) -> list[str]:
        return [p.name for p in self._procs if p.exited]

    @property
    def missing(self) -> list[str]:
        return [p.name for p in self._procs if self._started and p.first is None]

    def to_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 6),
            "by_process": {k: round(v, 6) for k, v in self.by_process.items()},
            "exited": self.exited,
            "missing": self.missing,
        }


# -- frontend counters ---------------------------------------------------------------------


def snapshot_counters(frontend_address: str, *, timeout_s: float = 5.0) -> dict[str, int]:
    """``FrontendAdmin.GetStats`` counters of the frontend at ``frontend_address`` (blocking;
    for a command line, not an event loop)."""
    with make_channel(frontend_address, aio=False) as ch:
        resp = recommend_pb2_grpc.FrontendAdminStub(ch).GetStats(recommend_pb2.GetStatsRequest(), timeout=timeout_s)
    return dict(resp.counters)


async def read_counters(channel: grpc.aio.Channel, *, timeout_s: float = 5.0, token: str | None = None) -> dict[str, int]:
    """``FrontendAdmin.GetStats`` counters over an open grpc.aio channel; ``token``: an admin
    token, sent as ``authorization: Bearer`` (GetStats needs one when authentication is on)."""
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    stub = recommend_pb2_grpc.FrontendAdminStub(channel)
    resp = await stub.GetStats(recommend_pb2.GetStatsRequest(), timeout=timeout_s, metadata=metadata)
    return dict(resp.counters)


def counters_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per counter (a counter missing before counts from 0); gauges such as
    ``largest_batch`` keep their later value."""
    return {
        k: (int(v) if k in GAUGE_COUNTERS else int(v) - int(before.get(k, 0))) for k, v in sorted(after.items())
    }


def wire_bytes_per_request(delta: Mapping[str, int], requests: int | None = None) -> dict[str, float] | None:
    """Embedding bytes on the wire per Recommend, by feature side, from a counters delta:
    ``{"user": .., "item": .., "total": ..}`` (total = every ``wire_bytes_*`` side). The
    denominator is the frontend's own ``requests_batched`` delta when present, else
    ``requests``. None when there is no denominator or no ``wire_bytes_*`` counter."""
    n = delta.get(REQUESTS_COUNTER) or requests
    sides = {k[len(WIRE_BYTES_PREFIX) :]: int(v) for k, v in delta.items() if k.startswith(WIRE_BYTES_PREFIX)}
    if not n or not sides:
        return None
    out = {side: sides.get(side, 0) / n for side in ("user", "item")}
    out.update({side: v / n for side, v in sides.items() if side not in out})
    out["total"] = sum(sides.values()) / n
    return out


class CounterMeter:
    """The frontend's counters over a window: ``start`` and ``stop`` read ``GetStats`` (async,
    on the caller's loop, over one channel opened at ``start`` and closed at ``stop``);
    ``delta`` is the difference. Fits ``run_load(..., meters=[...])``. With authentication on
    (docs/security.md), ``token`` is an admin token (a string, or a callable asked at each read,
    so a rotated one is picked up) and ``tls_ca`` the CA of a TLS frontend's certificate."""

    def __init__(
        self, frontend_address: str, *, timeout_s: float = 5.0, token: str | Callable[[], str] | None = None, tls_ca: str = ""
    ) -> None:
        self.address = frontend_address
        self.timeout_s = timeout_s
        self._token = (lambda: token) if isinstance(token, str) else token
        self._tls_ca = tls_ca
        self.before: dict[str, int] | None = None
        self.after: dict[str, int] | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        credentials = None
        if self._tls_ca:
            from services.core.tls import client_credentials

            credentials = client_credentials(self._tls_ca)
        self._channel = make_channel(self.address, credentials=credentials)
        self.after = None
        self.before = await self._read()

    async def _read(self) -> dict[str, int]:
        assert self._channel is not None
        return await read_counters(self._channel, timeout_s=self.timeout_s, token=None if self._token is None else self._token())

    async def stop(self) -> None:
        if self._channel is None:
            raise RuntimeError("CounterMeter.stop() before start()")
        try:
            self.after = await self._read()
        finally:
            ch, self._channel = self._channel, None
            await ch.close()

    @property
    def delta(self) -> dict[str, int] | None:
        if self.before is None or self.after is None:
            return None
        return counters_delta(self.before, self.after)
