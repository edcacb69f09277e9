"""Replica choice, ejection and the hedge budget: the pure decisions of the fan-out.

``ReplicaBoard`` owns one ``ReplicaStats`` per shard node: a peak latency EWMA, a window of
recent latencies (for the p95 that delays hedges), outstanding calls, consecutive failures and
the ejection / probe state. ``HedgeBudget`` caps hedges at a fraction of Lookup RPCs.

Ejection is the core circuit breaker opened by one failure. A node is blamed only for its own
faults: never for lateness that its peers share (the frontend's own queueing or CPU).

Every method takes the time (``now``, seconds of ``time.monotonic()``) from the caller, so unit
tests drive the state machines without a clock, gRPC or a cluster. No locks: the frontend's
event loop is the only caller.

A node's state::

    HEALTHY --unreachable; late while a peer answered, in time, a call sent after it (``outpaced``);
              or N hedges lost in a row--> EJECTED (base * 2**k, capped)
    EJECTED --time passes--> PROBING (one call at a time) --success--> HEALTHY
                                                          --error-->   EJECTED (backoff doubled)
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.core.breaker import BreakerPolicy, BreakerState, CircuitBreaker


_ANSWER_MEMORY_S = 2.0  # how long a node's answers are kept as evidence for ``outpaced``


@dataclass(frozen=True)
class ReplicaPolicy:
    """How replicas are scored, ejected and hedged (built from ``FrontendConfig``)."""

    eject_s: float = 1.0  # first ejection; doubles with each failure in a row
    eject_max_s: float = 10.0
    # Hedges lost in a row (no answer while another replica answered the same units) that
    # count as one failure: a stalled node (SIGSTOP, GC, swap) is ejected like a dead one.
    stall_after_hedges_lost: int = 3
    ewma_decay_s: float = 1.0  # time constant of the latency EWMA (and of forgetting a peak)
    latency_window: int = 128  # recent latencies kept per node for the p95
    min_latency_samples: int = 8  # before this many answers a node has no p95 of its own
    # Hedge delay: None = the node's recent p95 (at least ``hedge_min_delay_s``); 0 = no hedging.
    hedge_delay_s: float | None = None
    hedge_min_delay_s: float = 0.002
    hedge_quantile: float = 0.95
    hedge_budget: float = 0.05  # hedge RPCs per Lookup RPC, at most
    hedge_burst: float = 10.0  # hedges that may be saved up for a burst
    # A call still unanswered after stall_factor x the node's p95 (at least stall_min_s) is a
    # stall (SIGSTOP, GC pause, dead peer not yet noticed): it gets one retry on other replicas
    # even when the hedge budget is empty, so a stalled node never holds a batch to its
    # deadline. Outliers that far out are rare by construction; they are counted apart.
    stall_factor: float = 10.0
    stall_min_s: float = 0.1


class LatencyWindow:
    """The last ``size`` latencies of one node and their quantiles.

    ``quantile(q)`` sorts the window only when it changed since the last call, so asking once
    per RPC costs one small sort per new sample at most.
    """

    def __init__(self, size: int = 128) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0  # samples ever added
        self._sorted: np.ndarray | None = None

    def __len__(self) -> int:
        return min(self._n, len(self._buf))

    def add(self, latency_s: float) -> None:
        self._buf[self._n % len(self._buf)] = latency_s
        self._n += 1
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the window, None when it is empty."""
        n = len(self)
        if n == 0:
            return None
        if self._sorted is None:
            self._sorted = np.sort(self._buf[:n])
        return float(self._sorted[min(n - 1, max(0, math.ceil(q * n) - 1))])


class PeakEwma:
    """Latency EWMA that jumps to a slower sample at once and forgets it over ``decay_s``.

    Weights are by elapsed time (Finagle's and Linkerd's peak EWMA): with no samples the value
    decays towards 0, so a node that was slow once and then left alone is tried again.
    """

    def __init__(self, decay_s: float) -> None:
        self._decay_s = decay_s
        self._cost = 0.0
        self._stamp = 0.0
        self.samples = 0

    def value(self, now: float) -> float:
        if self.samples == 0:
            return 0.0
        return self._cost * math.exp(-max(0.0, now - self._stamp) / self._decay_s)

    def observe(self, latency_s: float, now: float) -> None:
        decayed = self.value(now)
        if self.samples == 0 or latency_s > decayed:
            self._cost = latency_s
        else:
            w = math.exp(-max(0.0, now - self._stamp) / self._decay_s)
            self._cost = decayed + latency_s * (1.0 - w)
        self._stamp = now
        self.samples += 1


class ReplicaState(enum.Enum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    PROBING = "probing"


@dataclass
class ReplicaStats:
    """One node's latency statistics, outstanding calls and ejection state: ejection is the
    core circuit breaker (``services.core.breaker``), opened by one failure."""

    ewma: PeakEwma
    window: LatencyWindow
    breaker: CircuitBreaker
    outstanding: int = 0
    hedges_lost: int = 0  # hedges lost in a row; 0 after a success
    answered: deque[tuple[float, float]] = field(default_factory=deque)  # (answered at, sent at) of recent answers, oldest first

    @property
    def failures(self) -> int:
        """Failures (ejections) in a row; 0 after a success."""
        return self.breaker.opens

    @property
    def ejected_until(self) -> float | None:
        """None: not ejected since its last success."""
        return self.breaker.open_until

    @property
    def probe_in_flight(self) -> bool:
        return self.breaker.probe_in_flight

    def state(self, now: float) -> ReplicaState:
        return _STATES[self.breaker.state(now)]


_STATES = {BreakerState.CLOSED: ReplicaState.HEALTHY, BreakerState.OPEN: ReplicaState.EJECTED, BreakerState.HALF_OPEN: ReplicaState.PROBING}


@dataclass
class ReplicaBoard:
    """Per-node statistics and the decisions over them. Nodes appear on first use."""

    policy: ReplicaPolicy = field(default_factory=ReplicaPolicy)
    rng: random.Random = field(default_factory=random.Random)
    nodes: dict[str, ReplicaStats] = field(default_factory=dict)

    def stats(self, node: str) -> ReplicaStats:
        s = self.nodes.get(node)
        if s is None:
            p = self.policy
            breaker = CircuitBreaker(BreakerPolicy(failures_to_open=1, open_s=p.eject_s, open_max_s=p.eject_max_s))
            s = self.nodes[node] = ReplicaStats(PeakEwma(p.ewma_decay_s), LatencyWindow(p.latency_window), breaker)
        return s

    # -- choice -------------------------------------------------------------------------------
    def usable(self, node: str, now: float) -> bool:
        """HEALTHY, or PROBING with no probe in flight."""
        return self.stats(node).breaker.usable(now)

    def score(self, node: str, now: float) -> float:
        """Expected cost of one more call: latency EWMA x (outstanding + 1). A node without
        answers yet is scored at the mean EWMA of the others (1 ms when none has any)."""
        s = self.stats(node)
        if s.ewma.samples:
            latency = s.ewma.value(now)
        else:
            known = [o.ewma.value(now) for o in self.nodes.values() if o.ewma.samples]
            latency = sum(known) / len(known) if known else 1e-3
        return latency * (s.outstanding + 1)

    def pick(self, pool: list[str], now: float) -> str:
        """Power of two choices: two distinct nodes at random, the lower score wins."""
        if len(pool) == 1:
            return pool[0]
        a, b = self.rng.sample(pool, 2)
        return a if self.score(a, now) <= self.score(b, now) else b

    # -- calls --------------------------------------------------------------------------------
    def begin(self, node: str, now: float) -> bool:
        """A call to ``node`` starts; returns True when it is the node's probe."""
        s = self.stats(node)
        s.outstanding += 1
        return s.breaker.begin(now)

    def end(self, node: str, probe: bool) -> None:
        """The call ``begin`` started is over (answered, failed or cancelled)."""
        s = self.stats(node)
        s.outstanding -= 1
        s.breaker.end(probe)

    def succeeded(self, node: str, latency_s: float, now: float) -> None:
        s = self.stats(node)
        s.ewma.observe(latency_s, now)
        s.window.add(latency_s)
        s.hedges_lost = 0
        s.answered.append((now, now - latency_s))
        while now - s.answered[0][0] > _ANSWER_MEMORY_S:
            s.answered.popleft()
        s.breaker.succeeded()

    def failed(self, node: str, now: float) -> bool:
        """An error or timeout that another replica may not have: eject for base * 2**k
        (k = failures in a row before this one, capped). Failures of calls that were in flight
        while the node was already ejected do not extend it. Returns True when it ejected."""
        s = self.stats(node)
        s.hedges_lost = 0
        return s.breaker.failed(now)

    def renewed(self, node: str) -> None:
        """``node`` registered again as another process (a restart): its ejection and failures
        were the old process's, so it is usable at once."""
        s = self.nodes.get(node)
        if s is not None:
            s.breaker.succeeded()
            s.hedges_lost = 0

    def outpaced(self, node: str, sent: float, deadline: float) -> bool:
        """Did another node answer, by ``deadline``, a call sent after ``sent``? Only then is a
        call to ``node`` sent at ``sent`` and unanswered at ``deadline`` late because of ``node``.
        When no peer did, every node was slow alike, or this process was not running to see the
        answers in time (a frontend short of CPU notices answers and expiries together, after
        the deadline: such an answer proves nothing); the cause is on this side (the frontend's
        own queueing or CPU), never a shard to eject. Each peer's latest answer noticed by the
        deadline decides (answers are remembered for ``_ANSWER_MEMORY_S``)."""
        for n, o in self.nodes.items():
            if n == node:
                continue
            for at, peer_sent in reversed(o.answered):
                if at <= deadline:
                    if peer_sent > sent:
                        return True
                    break
        return False

    def lost_hedge(self, node: str, elapsed_s: float, now: float) -> bool:
        """Another replica answered first and this call was cancelled after ``elapsed_s``: a
        lower bound of its latency. ``stall_after_hedges_lost`` in a row count as a failure, one
        is enough for a node not answered since its ejection. Returns True when it ejected."""
        s = self.stats(node)
        s.ewma.observe(elapsed_s, now)
        s.hedges_lost += 1
        if s.hedges_lost >= self.policy.stall_after_hedges_lost or s.ejected_until is not None:
            return self.failed(node, now)
        return False

    # -- hedging ------------------------------------------------------------------------------
    def hedge_delay(self, node: str) -> float | None:
        """How long to wait for ``node`` before hedging; None = do not hedge.

        A fixed ``hedge_delay_s`` wins; else the node's p95 over its recent answers (at least
        ``hedge_min_delay_s``), or, before it has ``min_latency_samples`` answers, the largest
        p95 among the nodes that have (None when no node has)."""
        p = self.policy
        if p.hedge_delay_s is not None:
            return p.hedge_delay_s if p.hedge_delay_s > 0 else None
        own = self._p95(self.stats(node))
        if own is None:
            known = [q for q in (self._p95(s) for s in self.nodes.values()) if q is not None]
            own = max(known) if known else None
        return None if own is None else max(p.hedge_min_delay_s, own)

    def stall_delay(self, node: str) -> float:
        """How long to wait for ``node`` before a budget-free retry elsewhere: ``stall_factor``
        x its p95 (or the largest known p95), at least ``stall_min_s``."""
        p = self.policy
        own = self._p95(self.stats(node))
        if own is None:
            known = [q for q in (self._p95(s) for s in self.nodes.values()) if q is not None]
            own = max(known) if known else 0.0
        return max(p.stall_min_s, p.stall_factor * own)

    def _p95(self, s: ReplicaStats) -> float | None:
        if len(s.window) < self.policy.min_latency_samples:
            return None
        return s.window.quantile(self.policy.hedge_quantile)


class HedgeBudget:
    """Token bucket: each Lookup RPC earns ``ratio`` tokens (held up to ``burst``), a hedge RPC
    spends one. It starts empty, so at any moment hedges <= ratio x RPCs so far; the burst cap
    keeps a quiet hour from paying for a storm of hedges later."""

    def __init__(self, ratio: float, burst: float = 10.0) -> None:
        self.ratio = ratio
        self.burst = max(1.0, burst)
        self.tokens = 0.0

    def earn(self, rpcs: int = 1) -> None:
        self.tokens = min(self.burst, self.tokens + self.ratio * rpcs)

    def take(self, hedges: int = 1) -> bool:
        """Spend ``hedges`` tokens if there are that many; False (nothing spent) otherwise."""
        if hedges <= 0 or self.tokens < hedges:
            return False
        self.tokens -= hedges
        return True


def choose_replica(board: ReplicaBoard, candidates: list[str], chosen: set[str], now: float) -> str:
    """Among ``candidates`` (non-empty, already filtered to live and preferred ones): a node
    already chosen for this batch if any (one RPC per node per batch), else power of two
    choices over them all."""
    reuse = [c for c in candidates if c in chosen]
    return board.pick(reuse or candidates, now)
