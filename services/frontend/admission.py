"""Admission control: decide at the door, in microseconds, whether a request may queue.

Three checks, in order (docs/overload.md):

1. **Per-caller rate** (``CallerLimits``): a token bucket per caller identity; over it is
   RESOURCE_EXHAUSTED with the time until the next token as the retry hint.
2. **Concurrency limit** (``LatencyLimit``): requests admitted and not finished (queued or in
   a batch) may not exceed a limit that adapts so that the admitted requests' latency holds a
   target (``latency_target_s``, whatever the callers' deadlines): a window whose latency
   quantile is over the target shrinks the limit by the ratio target / measured (at most
   halving it, a gradient step as in Netflix's Gradient2 and Envoy's adaptive concurrency); a
   window under the target in which the limit was nearly reached grows it by sqrt(limit).
   Little's law makes the limit converge on throughput x target. It never shrinks below the
   concurrency that carries the best throughput of the last ``capacity_horizon_s`` within the
   target (peak answers/s x target): latency that is not queueing (an event loop busy
   refusing a flood of calls) would otherwise shrink it to a few requests, batches to one or
   two, and throughput with them, raising latency further (measured: limit 6, batches of 2.4,
   goodput a third of saturation at 3x).
3. **Deadline feasibility** (``ServiceEstimate``): a request whose remaining deadline is
   shorter than its expected time (the fastest recent batch, plus its share of the work
   queued ahead of it) is refused at once instead of expiring in the queue.

Pure: every method takes ``now`` from the caller; one owner (the frontend's event loop).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AdmissionPolicy:
    enabled: bool = True
    latency_target_s: float = 0.050
    initial_limit: int = 64
    min_limit: int = 4
    max_limit: int = 1024
    window_s: float = 0.5  # the limit moves at most once per window
    min_window_samples: int = 20
    quantile: float = 0.99  # the latency quantile held at or under the target
    grow_when_used: float = 0.75  # grow only if in-flight reached this fraction of the limit
    capacity_horizon_s: float = 10.0  # the floor remembers the best window this long

    def __post_init__(self) -> None:
        if self.latency_target_s <= 0:
            raise ValueError(f"latency_target_s must be > 0, got {self.latency_target_s}")
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(
                f"need 1 <= min_limit <= initial_limit <= max_limit, got {self.min_limit}, {self.initial_limit}, {self.max_limit}"
            )
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")


class LatencyLimit:
    """The adaptive concurrency limit (see the module docstring)."""

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self.limit = float(policy.initial_limit)
        self._samples: list[float] = []
        self._window_start: float | None = None
        self._peak_in_flight = 0
        self._rates: deque[tuple[float, float]] = deque()  # (window end, answers/s) of recent windows
        self.last_quantile_s: float | None = None  # of the last closed window

    def note_in_flight(self, in_flight: int) -> None:
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def observe(self, latency_s: float, now: float) -> None:
        """One admitted request finished (answered or failed) after ``latency_s`` in this process."""
        if self._window_start is None:
            self._window_start = now
        self._samples.append(latency_s)
        p = self.policy
        if now - self._window_start < p.window_s or len(self._samples) < p.min_window_samples:
            return
        q = float(np.quantile(np.asarray(self._samples), p.quantile))
        self.last_quantile_s = q
        self._close_rate(len(self._samples), now)
        if q > p.latency_target_s:
            self.limit = max(self.floor(now), self.limit * max(0.5, p.latency_target_s / q))
        elif self._peak_in_flight >= p.grow_when_used * self.limit:
            self.limit = min(p.max_limit, self.limit + max(1.0, math.sqrt(self.limit)))
        self._samples.clear()
        self._window_start = now
        self._peak_in_flight = 0

    def _close_rate(self, n: int, now: float) -> None:
        assert self._window_start is not None
        self._rates.append((now, n / max(now - self._window_start, 1e-9)))
        while self._rates and now - self._rates[0][0] > self.policy.capacity_horizon_s:
            self._rates.popleft()

    def floor(self, now: float) -> float:
        """The lowest the limit may shrink to now: the concurrency that carried the best recent
        throughput within the target (Little's law), within [min_limit, max_limit]."""
        p = self.policy
        peak = max((r for t, r in self._rates if now - t <= p.capacity_horizon_s), default=0.0)
        return float(min(p.max_limit, max(p.min_limit, peak * p.latency_target_s)))

    @property
    def value(self) -> int:
        return int(self.limit)


class ServiceEstimate:
    """What a request costs this frontend, from the batches it ran in the last ``horizon_s``.

    ``fastest_s``: the shortest recent batch (a floor no request beats); ``per_request_s``:
    EWMA of batch time / batch size, divided by the batches that run at once: the marginal cost
    of one more queued request (conservative at low load, where batches are small). Batches
    older than the horizon are forgotten, so a slow spell (a paused shard) cannot keep
    refusing short deadlines once it is over: with nothing recent, nothing is refused."""

    def __init__(self, *, in_flight_batches: int, horizon_s: float = 5.0, recent: int = 64, alpha: float = 0.2) -> None:
        self._slots = max(1, in_flight_batches)
        self._horizon_s = horizon_s
        self._recent: deque[tuple[float, float]] = deque(maxlen=recent)  # (when, seconds)
        self._alpha = alpha
        self._per_request_s: float | None = None

    def observe_batch(self, seconds: float, size: int, now: float) -> None:
        self._recent.append((now, seconds))
        cost = seconds / max(1, size) / self._slots
        prev = self._per_request_s
        self._per_request_s = cost if prev is None else (1 - self._alpha) * prev + self._alpha * cost

    def _forget(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > self._horizon_s:
            self._recent.popleft()

    def fastest_s(self, now: float) -> float:
        self._forget(now)
        return min(s for _, s in self._recent) if self._recent else 0.0

    def per_request_s(self, now: float) -> float:
        self._forget(now)
        return (self._per_request_s or 0.0) if self._recent else 0.0

    def expected_s(self, queued_ahead: int, now: float) -> float:
        """Expected time from admission to answer of a request with ``queued_ahead`` before it."""
        return self.fastest_s(now) + queued_ahead * self.per_request_s(now)


class TokenBucket:
    """``rate_per_s`` tokens a second, held up to ``burst``; starts full."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self._stamp) * self.rate_per_s)
        self._stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self, now: float) -> float:
        """Seconds until one token is there."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate_per_s


@dataclass(frozen=True)
class CallerRate:
    """Requests a second (0 = unlimited) and the burst a caller may save up."""

    rate_per_s: float = 0.0
    burst: float = 0.0  # 0 = one second of rate

    def __post_init__(self) -> None:
        if self.rate_per_s < 0 or self.burst < 0:
            raise ValueError(f"caller rate and burst must be >= 0, got {self.rate_per_s}, {self.burst}")


@dataclass(frozen=True)
class CallerLimitsConfig:
    default: CallerRate = field(default_factory=CallerRate)
    callers: tuple[tuple[str, CallerRate], ...] = ()

    def rate_of(self, caller: str) -> CallerRate:
        for name, rate in self.callers:
            if name == caller:
                return rate
        return self.default


def load_caller_limits(path: str, default: CallerRate) -> CallerLimitsConfig:
    """Per-caller rates from a TOML file (docs/overload.md)::

        [callers.search]
        rate_rps = 200
        burst = 400

    ``default`` applies to every caller the file does not name. ConfigError naming the file and
    key on anything else."""
    import tomllib

    from services.core.errors import ConfigError

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"caller limits {path}: {e}") from None
    callers = []
    for name, entry in (doc.get("callers") or {}).items():
        unknown = set(entry) - {"rate_rps", "burst"} if isinstance(entry, dict) else {"<not a table>"}
        if unknown:
            raise ConfigError(f"caller limits {path}: [callers.{name}] has unknown keys {sorted(unknown)} (rate_rps, burst)")
        try:
            callers.append((name, CallerRate(float(entry.get("rate_rps", 0.0)), float(entry.get("burst", 0.0)))))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"caller limits {path}: [callers.{name}]: {e}") from None
    extra = set(doc) - {"callers"}
    if extra:
        raise ConfigError(f"caller limits {path}: unknown top-level keys {sorted(extra)} (only [callers.NAME] tables)")
    return CallerLimitsConfig(default=default, callers=tuple(callers))


class CallerLimits:
    """One token bucket per caller identity, created on first use."""

    def __init__(self, config: CallerLimitsConfig) -> None:
        self.config = config
        self._buckets: dict[str, TokenBucket | None] = {}

    def take(self, caller: str, now: float) -> float:
        """0.0 when ``caller`` may go now, else the seconds until it may."""
        bucket = self._buckets.get(caller, ...)
        if bucket is ...:
            rate = self.config.rate_of(caller)
            bucket = None if rate.rate_per_s == 0 else TokenBucket(rate.rate_per_s, rate.burst or rate.rate_per_s, now)
            self._buckets[caller] = bucket
        if bucket is None or bucket.take(now):
            return 0.0
        return bucket.wait_s(now)


@dataclass(frozen=True)
class Shed:
    """A refusal: why (a short machine-readable reason), a message, and the retry hint."""

    reason: str  # "caller_rate" | "concurrency" | "deadline"
    message: str
    retry_after_s: float


class Admission:
    """The three checks together, and the bookkeeping of admitted requests."""

    def __init__(self, policy: AdmissionPolicy, callers: CallerLimits, estimate: ServiceEstimate) -> None:
        self.policy = policy
        self.callers = callers
        self.limit = LatencyLimit(policy)
        self.estimate = estimate
        self.in_flight = 0
        self.admitted = 0
        self.shed: dict[str, int] = {"caller_rate": 0, "concurrency": 0, "deadline": 0}
        self.last_shed_at: float | None = None
        self._shed_times = _Ring(256)

    def check(self, caller: str, remaining_s: float, queued: int, now: float) -> Shed | None:
        """None: admitted (the caller must call ``finished`` once, whatever happens next)."""
        wait = self.callers.take(caller, now)
        if wait > 0:
            return self._shed("caller_rate", f"caller {caller!r} is over its rate limit", wait, now)
        if self.policy.enabled:
            if self.in_flight >= self.limit.value:
                return self._shed(
                    "concurrency",
                    f"frontend overloaded: {self.in_flight} requests in flight, limit {self.limit.value} "
                    f"(holding {self.policy.latency_target_s * 1e3:.0f} ms latency)",
                    self.policy.latency_target_s,
                    now,
                )
            expected = self.estimate.expected_s(queued, now)
            if expected > remaining_s:
                return self._shed(
                    "deadline",
                    f"cannot finish within the deadline: {remaining_s * 1e3:.1f} ms left, about {expected * 1e3:.1f} ms expected "
                    f"({queued} requests queued ahead)",
                    max(expected - remaining_s, self.policy.latency_target_s),
                    now,
                )
        self.in_flight += 1
        self.admitted += 1
        self.limit.note_in_flight(self.in_flight)
        return None

    def finished(self, latency_s: float, now: float) -> None:
        self.in_flight -= 1
        self.limit.observe(latency_s, now)

    def pressured(self, now: float, window_s: float) -> bool:
        """Was a request shed for load (concurrency or deadline) within ``window_s``?"""
        return self.last_shed_at is not None and now - self.last_shed_at <= window_s

    def record_shed_time(self, seconds: float) -> None:
        """How long the refusal took in this process, from the call's arrival."""
        self._shed_times.add(seconds)

    def shed_p99_s(self) -> float | None:
        """Server-side time to refuse, p99 over the last 256 refusals (None before any)."""
        return self._shed_times.quantile(0.99)

    def _shed(self, reason: str, message: str, retry_after_s: float, now: float) -> Shed:
        self.shed[reason] += 1
        if reason != "caller_rate":
            self.last_shed_at = now
        return Shed(reason, message, retry_after_s)


class _Ring:
    """The last ``size`` values and their quantiles."""

    def __init__(self, size: int) -> None:
        self._buf = np.zeros(size)
        self._n = 0

    def add(self, value: float) -> None:
        self._buf[self._n % len(self._buf)] = value
        self._n += 1

    def quantile(self, q: float) -> float | None:
        n = min(self._n, len(self._buf))
        return None if n == 0 else float(np.quantile(self._buf[:n], q))
