"""One circuit breaker for every dependency call (shard nodes, the feature store, ...).

Pure state machine: every method takes ``now`` (seconds of ``time.monotonic()``) from the
caller, so tests drive it without a clock. Not thread-safe: one owner (an event loop, or a
caller holding its own lock). See docs/overload.md.

::

    CLOSED --``failures_to_open`` failures in a row, or trip()--> OPEN (open_s * 2**k, capped)
    OPEN --time passes--> HALF_OPEN (one probe call at a time)
    HALF_OPEN --probe succeeds--> CLOSED      --probe fails--> OPEN (period doubled)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """``failures_to_open`` failures in a row open the breaker for ``open_s``, doubled for each
    open in a row (a failed probe) up to ``open_max_s``."""

    failures_to_open: int = 5
    open_s: float = 0.5
    open_max_s: float = 10.0

    def __post_init__(self) -> None:
        if self.failures_to_open < 1:
            raise ValueError(f"failures_to_open must be >= 1, got {self.failures_to_open}")
        if not 0 < self.open_s <= self.open_max_s:
            raise ValueError(f"need 0 < open_s <= open_max_s, got {self.open_s} and {self.open_max_s}")


class CircuitBreaker:
    """Counts failures of calls to one dependency and says whether the next call may go."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.failures = 0  # failures in a row since the last success
        self.opens = 0  # opens in a row since the last success (the backoff exponent)
        self.open_until: float | None = None  # None: closed since the last success
        self.probe_in_flight = False
        self.times_opened = 0  # ever (a counter for operators)

    def state(self, now: float) -> BreakerState:
        if self.open_until is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now < self.open_until else BreakerState.HALF_OPEN

    def usable(self, now: float) -> bool:
        """Would a call be allowed now (CLOSED, or HALF_OPEN with no probe out)? No side effect."""
        state = self.state(now)
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self.probe_in_flight)

    def begin(self, now: float) -> bool:
        """A call starts; True when it is the HALF_OPEN probe (the caller passes it to ``end``)."""
        if self.state(now) is BreakerState.HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def end(self, probe: bool) -> None:
        """The call ``begin`` started is over, whatever its outcome (cancelled included)."""
        if probe:
            self.probe_in_flight = False

    def retry_after_s(self, now: float) -> float:
        """How long until a call may be tried again (0 when it may now)."""
        if self.open_until is None or now >= self.open_until:
            return 0.0
        return self.open_until - now

    def succeeded(self) -> None:
        self.failures = self.opens = 0
        self.open_until = None

    def failed(self, now: float) -> bool:
        """A call failed in a way the dependency is to blame for. Returns True when this opened
        the breaker. Failures of calls that were in flight while it was already OPEN do not
        extend it."""
        state = self.state(now)
        if state is BreakerState.OPEN:
            return False
        self.failures += 1
        if state is BreakerState.HALF_OPEN or self.failures >= self.policy.failures_to_open:
            return self.trip(now)
        return False

    def trip(self, now: float) -> bool:
        """Open now (a failed probe, or a verdict reached elsewhere, e.g. a stalled node)."""
        if self.state(now) is BreakerState.OPEN:
            return False
        p = self.policy
        self.open_until = now + min(p.open_max_s, p.open_s * 2**self.opens)
        self.opens += 1
        self.failures = 0
        self.times_opened += 1
        return True
