"""A node's share of a batch, hedged: the answer of the node planned for it or, once it is late,
the first complete answer of it and the same units sent to other replicas.

- Hedging: a node that has not answered after its hedge delay (its recent p95, or a fixed
  delay) while the hedge budget has a token gets the same units sent to other replicas; the
  first complete answer wins and the loser is cancelled.
- Stalls: a node still silent after ``stall_factor`` x its p95 (at least ``stall_min_s``) gets
  one retry on other replicas even with the hedge budget empty (``lookup_stall_retries``), so a
  paused or silently dead node never holds a batch until its deadline.

Runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.core.errors import ShardrecError, UnavailableError
from services.frontend.lookup import LookupStats
from services.frontend.lookup.grpc.calls import Call, ShardCalls, cancel_pending, describe
from services.frontend.lookup.grpc.replicas import HedgeBudget, ReplicaBoard
from services.frontend.lookup.grpc.routing import Avoid, Router, Unit
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)


class Hedger:
    """``node_call``: one node's units, hedged. ``enabled`` False: only stall retries."""

    def __init__(self, view: ClusterView, router: Router, calls: ShardCalls, board: ReplicaBoard, budget: HedgeBudget,
                 stats: LookupStats, *, enabled: bool) -> None:
        self._view = view
        self._router = router
        self._calls = calls
        self._board = board
        self._budget = budget
        self._stats = stats
        self._enabled = enabled

    async def node_call(self, node: str, units: list[Unit], call: Call, avoid: Avoid):
        """The answer for the units planned on ``node``: its own, or, once it is later than its
        hedge delay, the first complete one of it and a hedge to other replicas."""
        primary = self._calls.spawn(node, units, call, hedge=False)
        try:
            started = time.monotonic()
            delay = self._board.hedge_delay(node) if self._enabled else None
            if delay is not None and started + delay < call.deadline:
                await asyncio.wait([primary], timeout=delay)
                if not primary.done():
                    hedge_call, hedges = self._hedge(node, units, call, avoid)
                    if hedges:
                        return await self._race(node, units, primary, hedges, started, hedge_call, avoid)
            stall_at = started + self._board.stall_delay(node)
            if not primary.done() and stall_at < call.deadline:
                await asyncio.wait([primary], timeout=max(0.0, stall_at - time.monotonic()))
                if not primary.done():  # stalled: one retry elsewhere, whatever the budget
                    hedge_call, hedges = self._hedge(node, units, call, avoid, budget=False)
                    if hedges:
                        return await self._race(node, units, primary, hedges, started, hedge_call, avoid)
            return await primary
        finally:
            cancel_pending([primary])  # a cancelled batch cancels its RPC; a late failure counts as seen

    def _hedge(self, node: str, units: list[Unit], call: Call, avoid: Avoid, *, budget: bool = True) -> tuple[Call, dict[str, asyncio.Task]]:
        """Send ``units`` to replicas other than ``node`` when every unit has a usable one and
        (``budget``) the budget has a token per RPC; no tasks otherwise."""
        smap = self._view.shard_map
        hedge_call = Call(call.version, smap.version, call.deadline, call.request_id)
        plan = self._router.assign(units, avoid.nodes() | {node}, call.version, fallback=False,
                                   refused=avoid.refusals(smap.version))
        if plan is None or (budget and not self._budget.take(len(plan))):
            return hedge_call, {}
        return hedge_call, {alt: self._calls.spawn(alt, us, hedge_call, hedge=True, stall=not budget) for alt, us in plan.items()}

    async def _race(self, node: str, units: list[Unit], primary: asyncio.Task, hedges: dict[str, asyncio.Task], started: float,
                    hedge_call: Call, avoid: Avoid):
        """First complete answer of ``primary`` and ``hedges`` (all of them together); the loser
        is cancelled. A failed hedge leaves the primary alone in the race; a failed primary
        leaves the hedges (they are its failover, already under way)."""
        stats = self._stats
        try:
            while True:
                await asyncio.wait([t for t in (primary, *hedges.values()) if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                if primary.done() and not primary.cancelled() and primary.exception() is None:
                    stats.hedges_cancelled += cancel_pending(hedges.values())
                    return primary.result()
                failed = {alt: t for alt, t in hedges.items() if t.done() and (t.cancelled() or t.exception() is not None)}
                if failed:
                    for alt, t in failed.items():
                        exc = t.exception() if not t.cancelled() else UnavailableError("hedge cancelled")
                        try:
                            avoid.note(alt, exc, hedge_call.map_version, units)
                        except ShardrecError:
                            pass  # the primary's answer decides
                        log.info("hedge of %s on %s failed (%s)", node, alt, describe(exc))
                    stats.hedges_cancelled += cancel_pending(hedges.values())
                    hedges = {}
                    return await primary
                if all(t.done() for t in hedges.values()):
                    if not primary.done():
                        primary.cancel()
                        stats.hedges_cancelled += 1
                        if self._board.lost_hedge(node, time.monotonic() - started, time.monotonic()):
                            self._calls.ejected(node, "stalled: lost hedges in a row")
                    stats.hedge_wins += len(hedges)
                    return [r for t in hedges.values() for r in t.result()]
                # else the primary failed and the hedges are still out: wait for them
        finally:
            cancel_pending(hedges.values())
