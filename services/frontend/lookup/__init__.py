"""The lookup step: pooled vectors for the bags of a micro-batch. This module is its interface
(``LookupClient``, ``FeatureLookup``, ``LookupResult``, ``LookupStats``); the implementations
behave the same, so tests, the monolith baseline and single-box development come for free:

- ``inproc.InprocLookupClient``: every table in this process (the monolith);
- ``grpc.client.GrpcLookupClient``: one Lookup RPC per shard node, in parallel (docs/fanout.md);
- ``baselines/``: the comparison systems ``redis-kv`` and ``torchrec`` (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.batch import Bags


@dataclass(frozen=True)
class FeatureLookup:
    """The bags of one sparse feature, to pool over ``table``."""

    feature: str
    table: str
    pooling: PoolingType
    bags: Bags
    side: FeatureSide = FeatureSide.ITEM


@dataclass
class LookupStats:
    batches: int = 0
    rpcs: int = 0  # Lookup RPCs as planned, failovers and re-routes included; hedges apart
    failovers: int = 0  # calls re-planned after an error or timeout
    reroutes: int = 0  # calls re-planned after FAILED_PRECONDITION (rows or version not there)
    hedges: int = 0  # hedge RPCs sent (a late call's units to other replicas)
    hedge_wins: int = 0  # hedge RPCs whose answer was used (the late call was cancelled)
    hedges_cancelled: int = 0  # losers cancelled: late calls a hedge beat, or hedges not needed
    stall_retries: int = 0  # budget-free retries of calls unanswered after the stall delay
    ejections: int = 0  # a node taken out of choice for a while (errors, timeouts, stalls)
    request_bytes: int = 0
    response_bytes: int = 0
    ids_sent: int = 0
    per_node_rpcs: dict[str, int] = field(default_factory=dict)  # hedges and stall retries included
    per_node_calls: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, primary|hedge|stall_retry)
    per_node_errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, status code name)
    per_node_failovers: dict[str, int] = field(default_factory=dict)
    per_node_reroutes: dict[str, int] = field(default_factory=dict)
    per_node_ejections: dict[str, int] = field(default_factory=dict)
    # Embedding payload bytes on the wire (ids, lengths, weights out; pooled vectors, counts
    # back), by feature side: "user" / "item".
    wire_bytes_by_side: dict[str, int] = field(default_factory=dict)

    def count(self, per_node: dict, key) -> None:
        per_node[key] = per_node.get(key, 0) + 1

    def add_wire_bytes(self, side: FeatureSide, n: int) -> None:
        self.wire_bytes_by_side[side.value] = self.wire_bytes_by_side.get(side.value, 0) + n


@dataclass(frozen=True)
class LookupResult:
    pooled: dict[str, np.ndarray]  # feature -> float32 [bags, dim]
    version: Version
    shard_map_version: int


class LookupClient(Protocol):
    stats: LookupStats

    async def lookup(
        self, features: list[FeatureLookup], *, version: Version, timeout_s: float, request_id: str
    ) -> LookupResult: ...

    async def close(self) -> None: ...
