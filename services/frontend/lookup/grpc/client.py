"""``GrpcLookupClient``: the bags of a micro-batch as ONE Lookup RPC per shard node, in parallel
(docs/fanout.md).

Per batch: each feature's bags are split by partition (``core.sharding``) and every partition
gets one replica (``routing``); the units of each node form one LookupRequest sent under the
remaining deadline (``calls``), hedged when late (``hedging``).

- Failover: a node that fails (unavailable, late) is ejected for a while and its units are
  re-planned onto other replicas while time remains; a node that no longer holds the rows or
  the version (FAILED_PRECONDITION) is a re-route: re-planned with the view as it is now, which
  may carry a newer shard map. Which failures another replica may fix is decided in
  ``services.core.errors``.
- A partition with no live replica left is UNAVAILABLE naming table and partition, never zeros
  passed off as an answer. Partial pools merge in ``core.sharding.merge_partials``.

All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np

from services.core import sharding
from services.core.errors import DeadlineExceededError, UnavailableError
from services.core.types import Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats
from services.frontend.lookup.grpc.calls import Call, ChannelPool, ShardCalls, cancel_pending, describe
from services.frontend.lookup.grpc.hedging import Hedger
from services.frontend.lookup.grpc.replicas import HedgeBudget, ReplicaBoard, ReplicaPolicy
from services.frontend.lookup.grpc.routing import Avoid, Resplit, Router, Unit, split_units
from services.frontend.observe import Observer
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)
# Retrying replicas that all refused (FAILED_PRECONDITION) while the view does not change.
_REFUSED_RETRY_S, _REFUSED_RETRY_MAX_S = 0.005, 0.1


class GrpcLookupClient:
    """The ``LookupClient`` over the shards of ``view``'s cluster; ``board``, ``budget`` and
    ``stats`` are its replica state, hedge budget and counters. ``float16``: pooled vectors
    come back as float16 (``ShardCalls``)."""

    def __init__(self, view: ClusterView, channels: ChannelPool, *, dim: int, policy: ReplicaPolicy | None = None,
                 rng: random.Random | None = None, observer: Observer | None = None, float16: bool = False) -> None:
        self._view = view
        self._dim = dim
        policy = policy or ReplicaPolicy()
        self.board = ReplicaBoard(policy, rng or random.Random())
        self.budget = HedgeBudget(policy.hedge_budget, policy.hedge_burst)
        self.stats = LookupStats()
        self._router = Router(view, self.board)
        self._channels = channels
        view.on_new_instance.append(self._renewed)
        self._calls = ShardCalls(view, channels, self.board, self.budget, self.stats, observer, float16=float16)
        hedging = policy.hedge_budget > 0 and policy.hedge_delay_s != 0
        self._hedger = Hedger(view, self._router, self._calls, self.board, self.budget, self.stats, enabled=hedging)

    def _units(self, features: list[FeatureLookup], smap) -> list[Unit]:
        units = split_units(features, smap)
        self.stats.ids_sent += sum(len(u.sub.ids) for u in units)
        return units

    async def lookup(self, features: list[FeatureLookup], *, version: Version, timeout_s: float, request_id: str) -> LookupResult:
        deadline = time.monotonic() + timeout_s
        self.stats.batches += 1
        while True:
            smap = self._view.shard_map
            if smap is None:
                raise UnavailableError("no shard map yet (ZooKeeper has not answered)")
            try:
                partials = await self._fan_out(smap, self._units(features, smap), version, deadline, request_id)
                break
            except Resplit:
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError("shard lookups did not finish within the deadline (the shard map changed)") from None
                log.info("shard map %d changed a partition count during a batch: splitting it again", smap.version)
        pooled = {}
        for fi, f in enumerate(features):
            parts = partials.get(fi, [])
            bags = len(f.bags.lengths)
            if not parts:
                pooled[f.feature] = np.zeros((bags, self._dim), dtype=np.float32)
            elif smap.num_partitions(f.table) == 1:
                pooled[f.feature] = parts[0][0]
            else:
                pooled[f.feature] = sharding.merge_partials(parts, f.pooling)
        return LookupResult(pooled, version, smap.version)

    async def _fan_out(self, smap, units: list[Unit], version: Version, deadline: float, request_id: str):
        """feature index -> its partial pools. Failed nodes' units are re-planned as soon as
        they fail, while the other nodes' calls go on."""
        partials: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        avoid = Avoid()
        running: dict[asyncio.Task, tuple[str, list[Unit], Call]] = {}
        try:
            await self._launch(smap, units, version, deadline, request_id, avoid, running)
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    node, us, call = running.pop(task)
                    exc = UnavailableError(f"lookup on {node} was cancelled") if task.cancelled() else task.exception()
                    if exc is None:
                        for u, pooled, counts in task.result():
                            partials.setdefault(u.feature, []).append((pooled, counts))
                        continue
                    if avoid.note(node, exc, call.map_version, us):
                        self.stats.reroutes += 1
                        self.stats.count(self.stats.per_node_reroutes, node)
                        log.info("shard %s refused a lookup at shard map %d (%s); re-routing", node, call.map_version, describe(exc))
                    else:
                        self.stats.failovers += 1
                        self.stats.count(self.stats.per_node_failovers, node)
                        log.warning("lookup on %s failed (%s); trying another replica", node, describe(exc))
                    if time.monotonic() >= deadline:
                        raise DeadlineExceededError(f"shard lookups did not finish within the deadline (node {node}: {describe(exc)})")
                    await self._launch(smap, us, version, deadline, request_id, avoid, running)
        finally:
            cancel_pending(running)
        return partials

    async def _launch(self, smap, units: list[Unit], version: Version, deadline: float, request_id: str, avoid: Avoid,
                      running: dict) -> None:
        """Plan ``units`` on the view's current map and start one call per node.

        When the only replicas left refused (FAILED_PRECONDITION), the shard map is changing
        under this batch: the view or the shards are behind. Wait for the view to change, or a
        moment (5 ms, doubling to 100 ms) for the shards to catch up and ask them again, until
        the deadline."""
        backoff_s = _REFUSED_RETRY_S
        while True:
            current = self._view.shard_map
            if any(current.num_partitions(t) != smap.num_partitions(t) for t in {u.table for u in units}):
                raise Resplit()
            try:
                plan = self._router.assign(units, avoid.nodes(), version, refused=avoid.refusals(current.version))
                break
            except UnavailableError as e:
                remaining = deadline - time.monotonic()
                if not avoid.refused:
                    raise
                if remaining <= 0:
                    raise DeadlineExceededError(
                        f"shard lookups did not finish within the deadline: {e}; refusals ((node, table, partition), shard map): "
                        f"{sorted(avoid.refused.items())}"
                    ) from None
                try:
                    await asyncio.wait_for(self._view.changed(), min(remaining, backoff_s))
                except TimeoutError:
                    avoid.refused.clear()
                    backoff_s = min(2 * backoff_s, _REFUSED_RETRY_MAX_S)
        call = Call(version, current.version, deadline, request_id)
        for node, us in plan.items():
            running[asyncio.ensure_future(self._hedger.node_call(node, us, call, avoid))] = (node, us, call)

    def _renewed(self, node: str, previous_address: str) -> None:
        """``node`` registered as another process (a restart): it starts with a clean slate, and
        the channel to its previous address (the same one, or one nobody serves now) goes."""
        self.board.renewed(node)
        self._channels.renew(previous_address)

    async def close(self) -> None:
        await self._calls.close()
