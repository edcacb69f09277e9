"""``GrpcLookupClient``: the bags of a micro-batch as ONE Lookup RPC per shard node, in parallel.

Per batch: each feature's bags are split by partition (``core.sharding``); every partition
gets one replica, preferring nodes already chosen for this batch (fewest RPCs), then the
replica with the fewest outstanding calls; the groups of each node form one LookupRequest sent
under the remaining deadline. A node that fails (unavailable, late, or no longer holding the
rows) has its groups re-planned onto other replicas while time remains; a partition with no
live replica left is UNAVAILABLE naming table and partition, never zeros passed off as an
answer. Partial pools merge in ``core.sharding.merge_partials``.

All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import grpc
import numpy as np

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc
from services.core import sharding, wire
from services.core.errors import DeadlineExceededError, ShardrecError, UnavailableError
from services.core.rpc.server import channel_options
from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats
from services.frontend.view import ClusterView

log = logging.getLogger(__name__)

_POOLING = {PoolingType.SUM: embedding_pb2.POOLING_SUM, PoolingType.MEAN: embedding_pb2.POOLING_MEAN, PoolingType.MAX: embedding_pb2.POOLING_MAX}
# Statuses after which another replica may succeed.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
}


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
        self._options = channel_options(max_message_bytes)
        self._stubs: dict[str, embedding_pb2_grpc.EmbeddingShardStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> embedding_pb2_grpc.EmbeddingShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
            stub = self._stubs[address] = embedding_pb2_grpc.EmbeddingShardStub(channel)
        return stub

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)


class GrpcLookupClient:
    def __init__(self, view: ClusterView, channels: ChannelPool, *, dim: int, eject_s: float = 1.0) -> None:
        self._view = view
        self._channels = channels
        self._dim = dim
        self._eject_s = eject_s
        self._outstanding: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}
        self.stats = LookupStats()

    # -- planning -----------------------------------------------------------------------------
    def _alive(self, node: str, excluded: set[str]) -> bool:
        return node in self._view.nodes and node not in excluded and self._ejected_until.get(node, 0.0) <= time.monotonic()

    def _choose(self, replicas: tuple[str, ...], chosen: set[str], excluded: set[str], version: Version) -> str | None:
        live = [r for r in replicas if self._alive(r, excluded)]
        # Replicas that report the batch's version ready first (during a version swap some
        # may not hold it yet; one that does not answers FAILED_PRECONDITION and we fail over).
        live = [r for r in live if version in self._view.nodes[r].versions_ready] or live
        if not live:  # every replica ejected recently: an ejected one beats failing
            live = [r for r in replicas if r in self._view.nodes and r not in excluded]
        if not live:  # none registered right now: try where they last were before giving up
            live = [r for r in replicas if r in self._view.last_addresses and r not in excluded]
        if not live:
            return None
        reuse = [r for r in live if r in chosen]
        pool = reuse or live
        least = min(self._outstanding.get(r, 0) for r in pool)
        return random.choice([r for r in pool if self._outstanding.get(r, 0) == least])

    def _assign(self, units: list[_Unit], excluded: set[str], version: Version) -> dict[str, list[_Unit]]:
        smap = self._view.shard_map
        if smap is None:
            raise UnavailableError("no shard map yet (ZooKeeper has not answered)")
        keys = sorted({(u.table, u.partition) for u in units}, key=lambda k: len(smap.tables[k[0]].partitions[k[1]]))
        chosen: set[str] = set()
        node_of: dict[tuple[str, int], str] = {}
        for table, p in keys:
            node = self._choose(smap.tables[table].partitions[p], chosen, excluded, version)
            if node is None:
                raise UnavailableError(
                    f"table {table!r} partition {p} has no live replica "
                    f"(replicas {list(smap.tables[table].partitions[p])}, tried {sorted(excluded)})"
                )
            chosen.add(node)
            node_of[(table, p)] = node
        by_node: dict[str, list[_Unit]] = {}
        for u in units:
            by_node.setdefault(node_of[(u.table, u.partition)], []).append(u)
        return by_node

    # -- one node -----------------------------------------------------------------------------
    def _request(self, units: list[_Unit], version: Version, request_id: str) -> embedding_pb2.LookupRequest:
        req = embedding_pb2.LookupRequest(request_id=request_id, version=version, shard_map_version=self._view.shard_map.version)
        for u in units:
            g = req.groups.add(table=u.table, partition=u.partition, pooling=_POOLING[u.pooling])
            wire.encode(u.sub.ids, g.ids)
            wire.encode(u.sub.lengths, g.lengths)
            if u.sub.weights is not None:
                wire.encode(u.sub.weights, g.weights)
        return req

    async def _call(self, node: str, units: list[_Unit], version: Version, deadline: float, request_id: str):
        address = self._view.last_addresses.get(node)
        if address is None:
            raise UnavailableError(f"node {node} has never registered")
        req = self._request(units, version, request_id)
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceededError("deadline passed before the shard lookups were sent")
        self._outstanding[node] = self._outstanding.get(node, 0) + 1
        self.stats.rpcs += 1
        self.stats.per_node_rpcs[node] = self.stats.per_node_rpcs.get(node, 0) + 1
        self.stats.request_bytes += req.ByteSize()
        try:
            resp = await self._channels.stub(address).Lookup(req, timeout=timeout, metadata=(("x-request-id", request_id),))
        finally:
            self._outstanding[node] -= 1
        out = []
        for u, r in zip(units, resp.results, strict=True):
            pooled = wire.decode(r.pooled, "pooled", dtype="float32", ndim=2)
            counts = wire.decode(r.counts, "counts", dtype="int32", ndim=1)
            self.stats.response_bytes += pooled.nbytes + counts.nbytes
            self.stats.add_wire_bytes(u.side, u.request_bytes + pooled.nbytes + counts.nbytes)
            out.append((u, pooled, counts))
        return out

    # -- the batch ----------------------------------------------------------------------------
    async def lookup(self, features: list[FeatureLookup], *, version: Version, timeout_s: float, request_id: str) -> LookupResult:
        smap = self._view.shard_map
        if smap is None:
            raise UnavailableError("no shard map yet (ZooKeeper has not answered)")
        deadline = time.monotonic() + timeout_s
        self.stats.batches += 1
        units: list[_Unit] = []
        for fi, f in enumerate(features):
            n = smap.num_partitions(f.table)
            for sub in sharding.split_bags(f.bags.rows, f.bags.lengths, n, f.bags.weights):
                if len(sub.ids):  # an all-empty share pools to zeros with count 0: nothing to ask
                    mode = f.pooling if n == 1 else sharding.partial_pooling(f.pooling)
                    units.append(_Unit(fi, f.table, sub.partition, sub, mode, f.side))
        self.stats.ids_sent += sum(len(u.sub.ids) for u in units)
        partials: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in range(len(features))}
        pending, excluded = units, set()
        while pending:
            by_node = self._assign(pending, excluded, version)
            calls = {node: asyncio.ensure_future(self._call(node, us, version, deadline, request_id)) for node, us in by_node.items()}
            try:
                await asyncio.wait(calls.values())
            except asyncio.CancelledError:
                for c in calls.values():
                    c.cancel()
                raise
            pending = []
            for node, call in calls.items():
                exc = call.exception()
                if exc is None:
                    for u, pooled, counts in call.result():
                        partials[u.feature].append((pooled, counts))
                    continue
                self._on_failure(node, exc)
                if time.monotonic() >= deadline:
                    raise DeadlineExceededError(f"shard lookups did not finish within the deadline (node {node}: {_describe(exc)})")
                excluded.add(node)
                self.stats.failovers += 1
                pending.extend(by_node[node])
        pooled = {}
        for fi, f in enumerate(features):
            parts = partials[fi]
            bags = len(f.bags.lengths)
            if not parts:
                pooled[f.feature] = np.zeros((bags, self._dim), dtype=np.float32)
            elif smap.num_partitions(f.table) == 1:
                pooled[f.feature] = parts[0][0]
            else:
                pooled[f.feature] = sharding.merge_partials(parts, f.pooling)
        return LookupResult(pooled, version, smap.version)

    def _on_failure(self, node: str, exc: BaseException) -> None:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        if isinstance(exc, ShardrecError) and not exc.retryable:
            raise exc
        if code is not None and code not in _RETRYABLE:
            raise UnavailableError(f"shard {node} refused a lookup: {code.name}: {exc.details()}") from exc
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._ejected_until[node] = time.monotonic() + self._eject_s
        log.warning("lookup on %s failed (%s); trying another replica", node, _describe(exc))

    async def close(self) -> None:
        await self._channels.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
