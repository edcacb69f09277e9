"""The lookup step: pooled vectors for the bags of a micro-batch.

One interface, two implementations (same behaviour, so tests, the monolith baseline and
single-box development come for free):

- ``InprocLookupClient``: every table in this process (the monolith);
- ``GrpcLookupClient`` (``services.frontend.fanout``): one Lookup RPC per shard node, in parallel.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from services.core import pooling
from services.core.checkpoint.reader import CheckpointReader
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
    per_node_rpcs: dict[str, int] = field(default_factory=dict)
    # Embedding payload bytes on the wire (ids, lengths, weights out; pooled vectors, counts
    # back), by feature side: "user" / "item".
    wire_bytes_by_side: dict[str, int] = field(default_factory=dict)

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


class InprocLookupClient:
    """Every table of one version, memory-mapped in this process; pooling in a worker thread."""

    def __init__(self, reader: CheckpointReader, version: Version) -> None:
        self.version = version
        spec = reader.manifest(version).model
        self._tables = {t.name: torch.from_numpy(reader.open_table(version, t.name, verify=False)) for t in spec.tables}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inproc-lookup")
        self.stats = LookupStats()

    def _pool_all(self, features: list[FeatureLookup]) -> dict[str, np.ndarray]:
        return {
            f.feature: pooling.pool(self._tables[f.table], f.bags.rows, f.bags.lengths, f.pooling, f.bags.weights)
            for f in features
        }

    async def lookup(self, features, *, version, timeout_s, request_id) -> LookupResult:
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool_all, features)
        return LookupResult(pooled, self.version, 0)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
