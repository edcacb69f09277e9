"""An open loop whose rate changes by phase, recording every request, and what to read off it.

``drive_phases`` sends Poisson arrivals at ``factor x base_rps`` for each ``Phase`` in turn, one
schedule with no gap between phases, and records each request (intended send time, actual send,
completion, gRPC status name, phase). Times are seconds from the start of the schedule.
Latency is ``completion - intended`` (coordinated omission cannot hide queueing).

``phase_summary`` and ``recovery_s`` turn the records into the overload figures of
docs/benchmarks.md ("Overload"): goodput (OK answers inside the deadline per second), sheds and
their latency, admitted p99, and how long p99 takes to come back after a burst.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness.driver import status_name

OK = "OK"
SHED = "RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Phase:
    name: str
    factor: float  # x the base rate
    duration_s: float


@dataclass
class Records:
    """One row per request, in send order (numpy arrays once ``freeze``d)."""

    phases: tuple[Phase, ...]
    base_rps: float
    deadline_s: float
    intended: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    phase: list[int] = field(default_factory=list)
    samples: dict[str, str] = field(default_factory=dict)  # status -> first message

    def phase_start_s(self, index: int) -> float:
        return sum(p.duration_s for p in self.phases[:index])

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "intended": np.asarray(self.intended, dtype=np.float64),
            "sent": np.asarray(self.sent, dtype=np.float64),
            "done": np.asarray(self.done, dtype=np.float64),
            "status": np.asarray(self.status, dtype=object),
            "phase": np.asarray(self.phase, dtype=np.int64),
        }


async def drive_phases(
    call: Callable[[Any], Awaitable[Any]],
    requests: Callable[[int], Any],
    phases: Sequence[Phase],
    base_rps: float,
    *,
    deadline_s: float,
    seed: int = 0,
    at: Sequence[tuple[float, Callable[[], Any]]] = (),
) -> Records:
    """Run the schedule; ``at``: (seconds from start, callable) events (e.g. SIGSTOP a shard,
    read the frontend's counters), each run once on the loop at its time (a coroutine function
    is awaited, events in order). Returns after every call ended."""
    rec = Records(tuple(phases), base_rps, deadline_s)
    rng = np.random.default_rng(seed)
    clock = time.perf_counter
    t0 = clock()
    tasks: set[asyncio.Task] = set()
    index = 0

    async def one(i: int, req: Any, intended: float, phase: int) -> None:
        t_send = clock() - t0
        status = OK
        try:
            async with asyncio.timeout(deadline_s):
                await call(req)
        except TimeoutError:
            status = "DEADLINE_EXCEEDED"
        except Exception as e:  # noqa: BLE001 - every failure is a recorded status
            status = status_name(e)
            if status not in rec.samples:
                details = getattr(e, "details", None)
                rec.samples[status] = str(details() if callable(details) else e)[:300]
        rec.intended.append(intended)
        rec.sent.append(t_send)
        rec.done.append(clock() - t0)
        rec.status.append(status)
        rec.phase.append(phase)

    async def events() -> None:
        for when, fn in sorted(at, key=lambda e: e[0]):
            await asyncio.sleep(max(0.0, when - (clock() - t0)))
            result = fn()
            if inspect.isawaitable(result):
                await result

    ev = asyncio.create_task(events())
    start = 0.0
    for pi, ph in enumerate(phases):
        rate = ph.factor * base_rps
        end = start + ph.duration_s
        t = start + rng.exponential(1.0 / rate)
        while t < end:
            await asyncio.sleep(max(0.0, t - (clock() - t0)))
            task = asyncio.create_task(one(index, requests(index), t, pi))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
            t += rng.exponential(1.0 / rate)
        start = end
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    await ev
    return rec


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if len(values) else None


def phase_summary(rec: Records) -> list[dict]:
    """Per phase: offered and goodput rates, sheds and their latency, admitted latency, errors."""
    a = rec.arrays()
    latency = a["done"] - a["intended"]
    out = []
    for pi, ph in enumerate(rec.phases):
        m = a["phase"] == pi
        st, lat = a["status"][m], latency[m]
        ok = (st == OK) & (lat <= rec.deadline_s)
        shed = st == SHED
        errors: dict[str, int] = {}
        for s in st[(st != OK) & (st != SHED)]:
            errors[s] = errors.get(s, 0) + 1
        out.append({
            "phase": ph.name,
            "factor": ph.factor,
            "offered_rps": round(int(m.sum()) / ph.duration_s, 1),
            "goodput_rps": round(int(ok.sum()) / ph.duration_s, 1),
            "goodput_share_of_base": round(int(ok.sum()) / ph.duration_s / rec.base_rps, 3),
            "ok": int(ok.sum()),
            "shed": int(shed.sum()),
            "shed_latency_ms": {"p50": _pct(lat[shed], 50), "p99": _pct(lat[shed], 99)},
            "admitted_latency_ms": {"p50": _pct(lat[ok], 50), "p99": _pct(lat[ok], 99)},
            "errors": dict(sorted(errors.items())),
        })  # fmt: skip
    return out


def window_p99_ms(rec: Records, phase: int, window_s: float = 0.25) -> list[tuple[float, float | None]]:
    """(window start from the phase start, p99 of OK latencies sent in it) for ``phase``."""
    a = rec.arrays()
    start, dur = rec.phase_start_s(phase), rec.phases[phase].duration_s
    m = (a["phase"] == phase) & (a["status"] == OK)
    t, lat = a["intended"][m] - start, (a["done"] - a["intended"])[m]
    out = []
    for w in np.arange(0.0, dur - 1e-9, window_s):
        sel = (t >= w) & (t < w + window_s)
        out.append((float(w), _pct(lat[sel], 99)))
    return out


def recovery_s(rec: Records, baseline_phase: int, after_phase: int, *, ratio: float = 1.2, window_s: float = 0.25) -> float | None:
    """Seconds into ``after_phase`` from which every window's p99 stays within ``ratio`` x the
    p99 of ``baseline_phase`` (None: it never did). A window with no OK answer counts as not
    recovered."""
    a = rec.arrays()
    base = a["phase"] == baseline_phase
    base_ok = base & (a["status"] == OK)
    ref = _pct((a["done"] - a["intended"])[base_ok], 99)
    if ref is None:
        return None
    windows = window_p99_ms(rec, after_phase, window_s)
    recovered_from: float | None = None
    for start, p99 in windows:
        if p99 is None or p99 > ratio * ref:
            recovered_from = None
        elif recovered_from is None:
            recovered_from = start
    return recovered_from
