"""Saturation sweep: raise the open-loop rate until p99 passes the SLO; pure control logic.

``sweep(run_at_rate, start_rps)`` calls ``run_at_rate(rate)`` at ``start, start*f, start*f^2, ...``
until a point fails (p99 above ``slo_p99_ms`` or error share above ``max_error_share``) or
``max_steps`` points ran; then, when ``refine`` is on, runs once at the geometric mean of the
last good and the first bad rate. The saturation point is the highest rate that met the SLO
(None when even the first rate failed).

``run_at_rate`` may return anything ``measure`` can read; the default reads a ``RunStats``
(``.p99_ms``, ``.error_share``) or a result-JSON run record (``latency_ms.p99_ms``,
``error_share``). ``SweepController`` holds the decisions (``next_rate`` / ``observe``) so a
sync (``sweep``) and an async (``sweep_async``) loop share them.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SLO_P99_MS = 50.0
DEFAULT_MAX_ERROR_SHARE = 0.01


def default_measure(result: Any) -> tuple[float, float, float | None]:
    """(p99 ms, error share, throughput rps or None) of a RunStats or a run record."""
    if isinstance(result, Mapping):
        return float(result["latency_ms"]["p99_ms"]), float(result["error_share"]), result.get("throughput_rps")
    return float(result.p99_ms), float(result.error_share), getattr(result, "throughput_rps", None)


@dataclass
class SweepPoint:
    rate_rps: float
    p99_ms: float
    error_share: float
    throughput_rps: float | None
    ok: bool
    refine: bool
    result: Any = None  # what run_at_rate returned

    def to_dict(self) -> dict:
        return {
            "offered_rps": self.rate_rps,
            "p99_ms": self.p99_ms,
            "error_share": self.error_share,
            "throughput_rps": self.throughput_rps,
            "ok": self.ok,
            "refine": self.refine,
        }


@dataclass
class SweepResult:
    slo_p99_ms: float
    max_error_share: float
    factor: float
    points: list[SweepPoint] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def saturation(self) -> SweepPoint | None:
        """The highest-rate point that met the SLO."""
        good = [p for p in self.points if p.ok]
        return max(good, key=lambda p: p.rate_rps) if good else None

    @property
    def saturation_rps(self) -> float | None:
        s = self.saturation
        return s.rate_rps if s else None

    def to_dict(self) -> dict:
        s = self.saturation
        return {
            "slo_p99_ms": self.slo_p99_ms,
            "max_error_share": self.max_error_share,
            "factor": self.factor,
            "points": [p.to_dict() for p in self.points],
            "saturation_rps": s.rate_rps if s else None,
            "saturation_throughput_rps": s.throughput_rps if s else None,
            "stop_reason": self.stop_reason,
        }


class SweepController:
    """The sweep's decisions, without running anything: ask ``next_rate()`` (None: done),
    run it, ``observe(rate, result)``; ``result`` holds the points and the reason it stopped."""

    def __init__(
        self,
        start_rps: float,
        *,
        slo_p99_ms: float = DEFAULT_SLO_P99_MS,
        factor: float = 1.5,
        max_steps: int = 12,
        max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
        refine: bool = True,
        measure: Callable[[Any], tuple[float, float, float | None]] = default_measure,
    ) -> None:
        if not start_rps > 0:
            raise ValueError(f"start_rps must be > 0, got {start_rps}")
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.start_rps = float(start_rps)
        self.max_steps = max_steps
        self.refine = refine
        self.measure = measure
        self.result = SweepResult(slo_p99_ms=slo_p99_ms, max_error_share=max_error_share, factor=factor)
        self._next: float | None = self.start_rps
        self._refining = False

    def next_rate(self) -> float | None:
        return self._next

    def observe(self, rate: float, result: Any) -> SweepPoint:
        if self._next is None or rate != self._next:
            raise ValueError(f"observed rate {rate} but the sweep asked for {self._next}")
        r = self.result
        p99, err, tput = self.measure(result)
        ok = p99 <= r.slo_p99_ms and err <= r.max_error_share
        point = SweepPoint(rate, p99, err, tput, ok, self._refining, result)
        r.points.append(point)
        if self._refining:
            self._next = None
            r.stop_reason = f"{r.stop_reason}; refined at {rate:g} rps ({'ok' if ok else 'failed'})"
            return point
        if ok:
            steps = len(r.points)
            if steps >= self.max_steps:
                self._next = None
                r.stop_reason = f"max_steps ({self.max_steps}) reached without passing the SLO"
            else:
                self._next = rate * r.factor
            return point
        why = f"p99 {p99:.2f} ms > SLO {r.slo_p99_ms:g} ms" if p99 > r.slo_p99_ms else (
            f"error share {err:.2%} > {r.max_error_share:.2%}"
        )
        r.stop_reason = f"{why} at {rate:g} rps"
        good = [p.rate_rps for p in r.points if p.ok]
        if self.refine and good:
            self._next = math.sqrt(max(good) * rate)
            self._refining = True
        else:
            self._next = None
            if not good:
                r.stop_reason += "; the first rate already failed: start lower"
        return point


def sweep(
    run_at_rate: Callable[[float], Any],
    start_rps: float,
    *,
    slo_p99_ms: float = DEFAULT_SLO_P99_MS,
    factor: float = 1.5,
    max_steps: int = 12,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
    refine: bool = True,
    measure: Callable[[Any], tuple[float, float, float | None]] = default_measure,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Run the sweep with a blocking ``run_at_rate(rate)``; see the module docstring."""
    c = SweepController(
        start_rps, slo_p99_ms=slo_p99_ms, factor=factor, max_steps=max_steps,
        max_error_share=max_error_share, refine=refine, measure=measure,
    )  # fmt: skip
    while (rate := c.next_rate()) is not None:
        point = c.observe(rate, run_at_rate(rate))
        if on_point is not None:
            on_point(point)
    return c.result


async def sweep_async(
    run_at_rate: Callable[[float], Awaitable[Any]],
    start_rps: float,
    *,
    slo_p99_ms: float = DEFAULT_SLO_P99_MS,
    factor: float = 1.5,
    max_steps: int = 12,
    max_error_share: float = DEFAULT_MAX_ERROR_SHARE,
    refine: bool = True,
    measure: Callable[[Any], tuple[float, float, float | None]] = default_measure,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """``sweep`` with an ``async def run_at_rate(rate)`` (one event loop for the whole sweep)."""
    c = SweepController(
        start_rps, slo_p99_ms=slo_p99_ms, factor=factor, max_steps=max_steps,
        max_error_share=max_error_share, refine=refine, measure=measure,
    )  # fmt: skip
    while (rate := c.next_rate()) is not None:
        point = c.observe(rate, await run_at_rate(rate))
        if on_point is not None:
            on_point(point)
    return c.result
