"""Routing of one micro-batch: its bags split into per-partition ``Unit``s, each partition given
one replica (``Router.assign``), and what the batch stops asking after a failure (``Avoid``).

Every partition gets one replica: a node already chosen for this batch if one holds it (fewest
RPCs), else among the usable replicas ready at the batch's version, power of two choices scored
by latency EWMA x (outstanding + 1) (``replicas``). Runs on the event loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from services.core import sharding
from services.core.errors import FailedPreconditionError, ShardrecError, UnavailableError, retryable_status
from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.lookup import FeatureLookup
from services.frontend.lookup.grpc.replicas import ReplicaBoard, choose_replica
from services.frontend.view import ClusterView


@dataclass(frozen=True)
class Unit:
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


def split_units(features: list[FeatureLookup], smap) -> list[Unit]:
    """Each feature's bags split by partition of ``smap`` (``core.sharding``); a share with no
    ids pools to zeros with count 0, so it is not asked for."""
    units: list[Unit] = []
    for fi, f in enumerate(features):
        n = smap.num_partitions(f.table)
        for sub in sharding.split_bags(f.bags.rows, f.bags.lengths, n, f.bags.weights):
            if len(sub.ids):
                mode = f.pooling if n == 1 else sharding.partial_pooling(f.pooling)
                units.append(Unit(fi, f.table, sub.partition, sub, mode, f.side))
    return units


class Resplit(Exception):
    """The active shard map changed a table's partition count: split the batch again."""


@dataclass
class Avoid:
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

    def note(self, node: str, exc: BaseException, map_version: int, units: list[Unit]) -> bool:
        """Record a retryable failure (``services.core.errors`` decides which are); True when it
        is a re-route (FAILED_PRECONDITION). Raises ``exc`` (or UNAVAILABLE naming the node)
        when no other replica can help."""
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


class Router:
    """Plans units on the view's live replicas, with the board's scores."""

    def __init__(self, view: ClusterView, board: ReplicaBoard) -> None:
        self._view = view
        self._board = board

    def _choose(self, replicas: tuple[str, ...], chosen: set[str], avoid: set[str], version: Version, now: float,
                *, fallback: bool) -> str | None:
        nodes = self._view.nodes
        present = [r for r in replicas if r in nodes and r not in avoid]
        live = [r for r in present if self._board.usable(r, now)]
        # Replicas that report the batch's version ready first (during a version swap some
        # may not hold it yet; one that does not answers FAILED_PRECONDITION and we re-route).
        ready = [r for r in live if version in nodes[r].versions_ready] or live
        if ready:
            return choose_replica(self._board, ready, chosen, now)
        if not fallback:
            return None
        # Every replica ejected (or being probed): an ejected one beats failing. None registered
        # right now: try where they last were before giving up.
        pool = present or [r for r in replicas if r in self._view.last_addresses and r not in avoid]
        return choose_replica(self._board, pool, chosen, now) if pool else None

    def assign(self, units: list[Unit], avoid: set[str], version: Version, *, fallback: bool = True,
               refused: set[tuple[str, str, int]] = frozenset()) -> dict[str, list[Unit]] | None:
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
        by_node: dict[str, list[Unit]] = {}
        for u in units:
            by_node.setdefault(node_of[(u.table, u.partition)], []).append(u)
        return by_node
