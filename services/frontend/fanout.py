"""``GrpcLookupClient``: the bags of a micro-batch as ONE Lookup RPC per shard node, in parallel.

Per batch: each feature's bags are split by partition (``core.sharding``); every partition
gets one replica: a node already chosen for this batch if one holds it (fewest RPCs), else among
the usable replicas ready at the batch's version, power of two choices scored by latency EWMA x
(outstanding + 1) (``services.frontend.replicas``). The groups of each node form one
LookupRequest sent under the remaining deadline.

- Hedging: a node that has not answered after its hedge delay (its recent p95, or a fixed
  delay) while the hedge budget has a token gets the same units sent to other replicas; the
  first complete answer wins and the loser is cancelled.
- Stalls: a node still silent after ``stall_factor`` x its p95 (at least ``stall_min_s``) gets
  one retry on other replicas even with the hedge budget empty (``lookup_stall_retries``), so a
  paused or silently dead node never holds a batch until its deadline.
- Failover: a node that fails (unavailable, late) is ejected for a while and its units are
  re-planned onto other replicas while time remains; a node that no longer holds the rows or
  the version (FAILED_PRECONDITION) is a re-route: re-planned with the view as it is now, which
  may carry a newer shard map.
- A partition with no live replica left is UNAVAILABLE naming table and partition, never zeros
  passed off as an answer. Partial pools merge in ``core.sharding.merge_partials``.

All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc
from services.core import sharding, wire
from services.core.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ShardrecError,
    UnavailableError,
    retryable_status,
)
from services.core.clients import make_channel
from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats
from services.frontend.replicas import HedgeBudget, ReplicaBoard, ReplicaPolicy, choose_replica
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)

_POOLING = {PoolingType.SUM: embedding_pb2.POOLING_SUM, PoolingType.MEAN: embedding_pb2.POOLING_MEAN, PoolingType.MAX: embedding_pb2.POOLING_MAX}
# Retrying replicas that all refused (FAILED_PRECONDITION) while the view does not change.
_REFUSED_RETRY_S, _REFUSED_RETRY_MAX_S = 0.005, 0.1
# Statuses that eject the node for a while (it is down, partitioned away or stalled). Routing
# policy, not retryability (which ``services.core.errors`` decides): which failures say that the
# node itself is unwell, so new calls should avoid it for a while.
_EJECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass(frozen=True)
class _Unit:
    """One partition's share of one feature's bags."""

    feature: int
    table: str
    partition: int
    sub: sharding.SubBags
    pooling: PoolingType
    side: FeatureSide

    @property
    def request_bytes(self) -> int:
        w = 0 if self.sub.weights is None else self.sub.weights.nbytes
        return self.sub.ids.nbytes + self.sub.lengths.nbytes + w


class ChannelPool:
    """One grpc.aio channel (and stub) per node address, reused for the process's life."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._stubs: dict[str, embedding_pb2_grpc.EmbeddingShardStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> embedding_pb2_grpc.EmbeddingShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = make_channel(address, max_message_bytes=self._max_message_bytes)
            self._channels[address] = channel
            stub = self._stubs[address] = embedding_pb2_grpc.EmbeddingShardStub(channel)
        return stub

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)


class _Resplit(Exception):
    """The active shard map changed a table's partition count: split the batch again."""


@dataclass
class _Avoid:
    """What one batch stops asking: ``failed`` nodes (unavailable, late) for the rest of the
    batch; ``refused`` (FAILED_PRECONDITION) (node, table, partition) only while the shard map
    they were refused under is the view's, since under a newer map the node may be the right
    place again. A refusal names the partitions of the refused call, not the whole node: during
    a move a node still serves the partitions it holds while it drops others."""

    failed: set[str] = field(default_factory=set)
    # (node, table, partition) -> shard map version the call was refused at
    refused: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def nodes(self) -> set[str]:
        return set(self.failed)

    def refusals(self, map_version: int) -> set[tuple[str, str, int]]:
        return {k for k, v in self.refused.items() if v == map_version}

    def note(self, node: str, exc: BaseException, map_version: int, units: "list[_Unit]") -> bool:
        """Record a retryable failure; True when it is a re-route (FAILED_PRECONDITION). Raises
        ``exc`` (or UNAVAILABLE naming the node) when no other replica can help."""
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        if isinstance(exc, ShardrecError) and not exc.retryable:
            raise exc
        if code is not None and not retryable_status(code.name):
            raise UnavailableError(f"shard {node} refused a lookup: {code.name}: {exc.details()}") from exc
        if code is grpc.StatusCode.FAILED_PRECONDITION or isinstance(exc, FailedPreconditionError):
            for u in units:
                self.refused[(node, u.table, u.partition)] = map_version
            return True
        self.failed.add(node)
        return False


class GrpcLookupClient:
    def __init__(self, view: ClusterView, channels: ChannelPool, *, dim: int, policy: ReplicaPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self._view = view
        self._channels = channels
        self._dim = dim
        policy = policy or ReplicaPolicy()
        self.board = ReplicaBoard(policy, rng or random.Random())
        self.budget = HedgeBudget(policy.hedge_budget, policy.hedge_burst)
        self._hedging = policy.hedge_budget > 0 and policy.hedge_delay_s != 0
        self.stats = LookupStats()

    # -- planning -----------------------------------------------------------------------------
    def _choose(self, replicas: tuple[str, ...], chosen: set[str], avoid: set[str], version: Version, now: float,
                *, fallback: bool) -> str | None:
        nodes = self._view.nodes
        present = [r for r in replicas if r in nodes and r not in avoid]
        live = [r for r in present if self.board.usable(r, now)]
        # Replicas that report the batch's version ready first (during a version swap some
        # may not hold it yet; one that does not answers FAILED_PRECONDITION and we re-route).
        ready = [r for r in live if version in nodes[r].versions_ready] or live
        if ready:
            return choose_replica(self.board, ready, chosen, now)
        if not fallback:
            return None
        # Every replica ejected (or being probed): an ejected one beats failing. None registered
        # right now: try where they last were before giving up.
        pool = present or [r for r in replicas if r in self._view.last_addresses and r not in avoid]
        return choose_replica(self.board, pool, chosen, now) if pool else None

    def _assign(self, units: list[_Unit], avoid: set[str], version: Version, *, fallback: bool = True,
                refused: set[tuple[str, str, int]] = frozenset()) -> dict[str, list[_Unit]] | None:
        """node -> its units, skipping the ``avoid`` nodes and, per partition, the nodes that
        ``refused`` it. Without ``fallback`` (a hedge) only usable replicas count, and a
        partition without one gives None; with it, no replica at all raises UNAVAILABLE."""
        smap = self._view.shard_map
        if smap is None:
            raise UnavailableError("no shard map yet (ZooKeeper has not answered)")
        now = time.monotonic()
        keys = sorted({(u.table, u.partition) for u in units}, key=lambda k: len(smap.tables[k[0]].partitions[k[1]]))
        chosen: set[str] = set()
        node_of: dict[tuple[str, int], str] = {}
        for table, p in keys:
            skip = avoid | {n for n, t, q in refused if t == table and q == p} if refused else avoid
            node = self._choose(smap.tables[table].partitions[p], chosen, skip, version, now, fallback=fallback)
            if node is None:
                if not fallback:
                    return None
                raise UnavailableError(
                    f"table {table!r} partition {p} has no live replica "
                    f"(replicas {list(smap.tables[table].partitions[p])}, tried {sorted(avoid)})"
                )
            chosen.add(node)
            node_of[(table, p)] = node
        by_node: dict[str, list[_Unit]] = {}
        for u in units:
            by_node.setdefault(node_of[(u.table, u.partition)], []).append(u)
        return by_node

    # -- one RPC ------------------------------------------------------------------------------
    def _request(self, units: list[_Unit], version: Version, map_version: int, request_id: str) -> embedding_pb2.LookupRequest:
        req = embedding_pb2.LookupRequest(request_id=request_id, version=version, shard_map_version=map_version)
        for u in units:
            g = req.groups.add(table=u.table, partition=u.partition, pooling=_POOLING[u.pooling])
            wire.encode(u.sub.ids, g.ids)
            wire.encode(u.sub.lengths, g.lengths)
            if u.sub.weights is not None:
                wire.encode(u.sub.weights, g.weights)
        return req

    def _spawn(self, node: str, units: list[_Unit], call: _Call, *, hedge: bool, stall: bool = False) -> asyncio.Task:
        """Start the Lookup of ``units`` on ``node`` as a task; the board counts it outstanding
        (and as the node's probe, when it is one) from now until the task is done, cancelled
        before it ran included."""
        probe = self.board.begin(node, time.monotonic())
        if not hedge:
            self.budget.earn()
        task = asyncio.ensure_future(self._call(node, units, call, hedge=hedge, stall=stall))
        task.add_done_callback(lambda _t: self.board.end(node, probe))
        return task

    async def _call(self, node: str, units: list[_Unit], call: _Call, *, hedge: bool, stall: bool = False):
        address = self._view.last_addresses.get(node)
        if address is None:
            raise UnavailableError(f"node {node} has never registered")
        req = self._request(units, call.version, call.map_version, call.request_id)
        start = time.monotonic()
        timeout = call.deadline - start
        if timeout <= 0:
            raise DeadlineExceededError("deadline passed before the shard lookups were sent")
        if stall:
            self.stats.stall_retries += 1
        elif hedge:
            self.stats.hedges += 1
        else:
            self.stats.rpcs += 1
        self.stats.per_node_rpcs[node] = self.stats.per_node_rpcs.get(node, 0) + 1
        self.stats.request_bytes += req.ByteSize()
        try:
            resp = await self._channels.stub(address).Lookup(req, timeout=timeout, metadata=(("x-request-id", call.request_id),))
        except grpc.aio.AioRpcError as e:
            if e.code() in _EJECT and self.board.failed(node, time.monotonic()):
                self._ejected(node, _describe(e))
            raise
        now = time.monotonic()
        self.board.succeeded(node, now - start, now)
        out = []
        for u, r in zip(units, resp.results, strict=True):
            pooled = wire.decode(r.pooled, "pooled", dtype="float32", ndim=2)
            counts = wire.decode(r.counts, "counts", dtype="int32", ndim=1)
            self.stats.response_bytes += pooled.nbytes + counts.nbytes
            self.stats.add_wire_bytes(u.side, u.request_bytes + pooled.nbytes + counts.nbytes)
            out.append((u, pooled, counts))
        return out

    def _ejected(self, node: str, why: str) -> None:
        self.stats.ejections += 1
        until = self.board.stats(node).ejected_until or 0.0
        log.warning("ejected shard %s for %.2fs (%s)", node, until - time.monotonic(), why)

    # -- one node, hedged ---------------------------------------------------------------------
    async def _node_call(self, node: str, units: list[_Unit], call: _Call, avoid: _Avoid):
        """The answer for the units planned on ``node``: its own, or, once it is later than its
        hedge delay, the first complete one of it and a hedge to other replicas."""
        primary = self._spawn(node, units, call, hedge=False)
        try:
            started = time.monotonic()
            delay = self.board.hedge_delay(node) if self._hedging else None
            if delay is not None and started + delay < call.deadline:
                await asyncio.wait([primary], timeout=delay)
                if not primary.done():
                    hedge_call, hedges = self._hedge(node, units, call, avoid)
                    if hedges:
                        return await self._race(node, units, primary, hedges, started, hedge_call, avoid)
            stall_at = started + self.board.stall_delay(node)
            if not primary.done() and stall_at < call.deadline:
                await asyncio.wait([primary], timeout=max(0.0, stall_at - time.monotonic()))
                if not primary.done():  # stalled: one retry elsewhere, whatever the budget
                    hedge_call, hedges = self._hedge(node, units, call, avoid, budget=False)
                    if hedges:
                        return await self._race(node, units, primary, hedges, started, hedge_call, avoid)
            return await primary
        finally:
            primary.cancel()  # no-op when done; a cancelled batch cancels its RPC

    def _hedge(self, node: str, units: list[_Unit], call: _Call, avoid: _Avoid, *, budget: bool = True) -> tuple[_Call, dict[str, asyncio.Task]]:
        """Send ``units`` to replicas other than ``node`` when every unit has a usable one and
        (``budget``) the budget has a token per RPC; no tasks otherwise."""
        smap = self._view.shard_map
        hedge_call = _Call(call.version, smap.version, call.deadline, call.request_id)
        plan = self._assign(units, avoid.nodes() | {node}, call.version, fallback=False,
                            refused=avoid.refusals(smap.version))
        if plan is None or (budget and not self.budget.take(len(plan))):
            return hedge_call, {}
        return hedge_call, {alt: self._spawn(alt, us, hedge_call, hedge=True, stall=not budget) for alt, us in plan.items()}

    async def _race(self, node: str, units: list[_Unit], primary: asyncio.Task, hedges: dict[str, asyncio.Task], started: float,
                    hedge_call: _Call, avoid: _Avoid):
        """First complete answer of ``primary`` and ``hedges`` (all of them together); the loser
        is cancelled. A failed hedge leaves the primary alone in the race; a failed primary
        leaves the hedges (they are its failover, already under way)."""
        try:
            while True:
                await asyncio.wait([t for t in (primary, *hedges.values()) if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                if primary.done() and not primary.cancelled() and primary.exception() is None:
                    self.stats.hedges_cancelled += _cancel(hedges.values())
                    return primary.result()
                failed = {alt: t for alt, t in hedges.items() if t.done() and (t.cancelled() or t.exception() is not None)}
                if failed:
                    for alt, t in failed.items():
                        exc = t.exception() if not t.cancelled() else UnavailableError("hedge cancelled")
                        try:
                            avoid.note(alt, exc, hedge_call.map_version, units)
                        except ShardrecError:
                            pass  # the primary's answer decides
                        log.info("hedge of %s on %s failed (%s)", node, alt, _describe(exc))
                    self.stats.hedges_cancelled += _cancel(hedges.values())
                    hedges = {}
                    return await primary
                if all(t.done() for t in hedges.values()):
                    if not primary.done():
                        primary.cancel()
                        self.stats.hedges_cancelled += 1
                        if self.board.lost_hedge(node, time.monotonic() - started, time.monotonic()):
                            self._ejected(node, "stalled: lost hedges in a row")
                    self.stats.hedge_wins += len(hedges)
                    return [r for t in hedges.values() for r in t.result()]
                # else the primary failed and the hedges are still out: wait for them
        finally:
            _cancel(hedges.values())

    # -- the batch ----------------------------------------------------------------------------
    def _split(self, features: list[FeatureLookup], smap) -> list[_Unit]:
        units: list[_Unit] = []
        for fi, f in enumerate(features):
            n = smap.num_partitions(f.table)
            for sub in sharding.split_bags(f.bags.rows, f.bags.lengths, n, f.bags.weights):
                if len(sub.ids):  # an all-empty share pools to zeros with count 0: nothing to ask
                    mode = f.pooling if n == 1 else sharding.partial_pooling(f.pooling)
                    units.append(_Unit(fi, f.table, sub.partition, sub, mode, f.side))
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
                partials = await self._fan_out(smap, self._split(features, smap), version, deadline, request_id)
                break
            except _Resplit:
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

    async def _fan_out(self, smap, units: list[_Unit], version: Version, deadline: float, request_id: str):
        """feature index -> its partial pools. Failed nodes' units are re-planned as soon as
        they fail, while the other nodes' calls go on."""
        partials: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        avoid = _Avoid()
        running: dict[asyncio.Task, tuple[str, list[_Unit], _Call]] = {}
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
                        log.info("shard %s refused a lookup at shard map %d (%s); re-routing", node, call.map_version, _describe(exc))
                    else:
                        self.stats.failovers += 1
                        log.warning("lookup on %s failed (%s); trying another replica", node, _describe(exc))
                    if time.monotonic() >= deadline:
                        raise DeadlineExceededError(f"shard lookups did not finish within the deadline (node {node}: {_describe(exc)})")
                    await self._launch(smap, us, version, deadline, request_id, avoid, running)
        finally:
            _cancel(running)
        return partials

    async def _launch(self, smap, units: list[_Unit], version: Version, deadline: float, request_id: str, avoid: _Avoid,
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
                raise _Resplit()
            try:
                plan = self._assign(units, avoid.nodes(), version, refused=avoid.refusals(current.version))
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
        call = _Call(version, current.version, deadline, request_id)
        for node, us in plan.items():
            running[asyncio.ensure_future(self._node_call(node, us, call, avoid))] = (node, us, call)

    async def close(self) -> None:
        await self._channels.close()


@dataclass(frozen=True)
class _Call:
    """What every RPC of one plan shares."""

    version: Version
    map_version: int
    deadline: float
    request_id: str


def _cancel(tasks) -> int:
    """Cancel the tasks not done yet; how many were."""
    n = 0
    for t in list(tasks):
        if not t.done():
            t.cancel()
            n += 1
    return n

def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
