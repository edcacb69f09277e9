"""What one shard node serves at one instant: an immutable ``Snapshot`` of the partitions it
holds at each version, and the Lookup of one request against it (docs/checkpoint.md, "Shard
memory during a swap"; docs/overload.md, "Shard Lookup limits").

Each partition's rows live once, in a private tensor ``weight`` holding the node's primary
version; another version held on the same ``weight`` adds an ``Overlay`` of the rows where it
differs. ``TableStore`` (``store.py``) builds and publishes snapshots; a lookup takes one and
reads only it, so one response never mixes versions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from services.core import pooling, sharding
from services.core.errors import FailedPreconditionError, InvalidArgumentError
from services.core.types import PartitionId, PoolingType, TableSpec, Version
from services.embedding_shard.finite import all_finite, cannot_overflow, not_finite, rows_bound


@dataclass
class HeldPartition:
    """One partition this node holds, whatever the version: global row ``r`` is local row
    ``r // num_partitions``, and only rows with ``r % num_partitions == pid.partition`` belong
    to it. Its load counters (bag groups and ids served) are best-effort. ``max_abs`` bounds
    |value| over every row it has held at any version (``hold``: raised before rows are served,
    never lowered), so an answer that cannot overflow needs no finite check."""

    pid: PartitionId
    spec: TableSpec
    lookups: int = 0
    ids: int = 0
    bags: int = 0
    max_abs: float = 0.0

    def hold(self, rows: torch.Tensor) -> None:
        """Raise ``max_abs`` to cover ``rows`` (inf when one is not finite)."""
        self.max_abs = max(self.max_abs, rows_bound(rows))

    @property
    def num_partitions(self) -> int:
        return self.pid.num_partitions

    def covered(self, ids: np.ndarray) -> np.ndarray | None:
        """Local rows of GLOBAL ``ids`` (in range), or None when some id is not in this partition."""
        n = self.pid.num_partitions
        if n == 1 or len(ids) == 0:
            return ids
        if (ids % n != self.pid.partition).any():
            return None
        return ids // n

    def not_here(self, ids: np.ndarray) -> InvalidArgumentError:
        n, p = self.pid.num_partitions, self.pid.partition
        bad = int(ids[np.flatnonzero(ids % n != p)[0]])
        return InvalidArgumentError(
            f"table {self.spec.name!r}: id {bad} is not in partition {p} of {n} (it belongs to partition {bad % n})"
        )


def check_range(spec: TableSpec, ids: np.ndarray) -> None:
    """InvalidArgumentError naming the table and the first bad id outside ``[0, rows)``."""
    if len(ids) == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= spec.rows:
        bad = lo if lo < 0 else hi
        raise InvalidArgumentError(f"table {spec.name!r}: id {bad} out of range [0, {spec.rows})")


@dataclass(frozen=True)
class Overlay:
    """The rows one version has where the partition's ``weight`` differs: local ids sorted."""

    local_ids: np.ndarray  # int64 [m], strictly increasing
    rows: torch.Tensor  # float32 [m, dim]

    @property
    def size_bytes(self) -> int:
        return self.local_ids.nbytes + self.rows.numel() * self.rows.element_size()

    def extended(self, local_ids: np.ndarray, rows: torch.Tensor) -> "Overlay":
        """This overlay plus the entries of ``(local_ids, rows)`` it does not have yet (its own
        rows win: they are this version's values)."""
        mine = self.local_ids
        pos = np.minimum(np.searchsorted(mine, local_ids), max(len(mine) - 1, 0))
        new = np.flatnonzero(mine[pos] != local_ids) if len(mine) else np.arange(len(local_ids))
        if not len(new):
            return self
        ids = np.concatenate([mine, local_ids[new]])
        order = np.argsort(ids, kind="stable")  # two sorted runs: a linear merge
        stacked = torch.cat([self.rows, rows[torch.from_numpy(new)]])
        return Overlay(ids[order], stacked[torch.from_numpy(order)])


@dataclass(frozen=True)
class PartitionVersion:
    """One partition at one version: ``weight`` plus, unless this is the weight's own version,
    the overlay of rows that differ. ``mark`` flags every local row that any overlay on this
    ``weight`` replaces (a superset filter for the binary search)."""

    table: HeldPartition
    weight: torch.Tensor  # float32 [local_rows, dim]
    overlay: Overlay | None = None
    mark: np.ndarray | None = None  # bool [local_rows]

    def pool_local(
        self, local: np.ndarray, lengths: np.ndarray, pooling_type: PoolingType, weights: np.ndarray | None, *, groups: int = 1
    ) -> np.ndarray:
        """Pool bags of LOCAL rows (validated by the caller, ``Snapshot.resolve``): ``groups``
        bag groups of one request, concatenated. At an overlaid version: the ids the overlay
        replaces and the others are pooled apart and merged (sums add, means divide once, max
        is elementwise)."""
        self.table.lookups += groups
        self.table.ids += len(local)
        self.table.bags += len(lengths)
        ov = self.overlay
        if ov is None or len(ov.local_ids) == 0 or len(local) == 0:
            return pooling.pool(self.weight, local, lengths, pooling_type, weights)
        cand = np.flatnonzero(self.mark[local])
        pos = np.searchsorted(ov.local_ids, local[cand])
        np.minimum(pos, len(ov.local_ids) - 1, out=pos)
        found = ov.local_ids[pos] == local[cand]
        hit, pos = cand[found], pos[found]
        if len(hit) == 0:
            return pooling.pool(self.weight, local, lengths, pooling_type, weights)
        part = np.zeros(len(local), dtype=np.int64)
        part[hit] = 1
        rows = local.copy()
        rows[hit] = pos  # overlay ids index the overlay's rows
        base, over = sharding.split_bags_by(part, 2, rows, lengths, weights)
        mode = sharding.partial_pooling(pooling_type)
        partials = [
            (pooling.pool(self.weight, base.ids, base.lengths, mode, base.weights), base.lengths),
            (pooling.pool(ov.rows, over.ids, over.lengths, mode, over.weights), over.lengths),
        ]
        return sharding.merge_partials(partials, pooling_type)


@dataclass(frozen=True)
class BagGroup:
    """Bags over one partition of one table, pooled the same way (a Lookup's group, decoded):
    ``ids`` int64 [n] GLOBAL rows, ``lengths`` int32 [bags] with ``sum == n``, ``weights``
    float32 [n] or None (SUM only)."""

    table: str
    partition: int
    pooling: PoolingType
    ids: np.ndarray
    lengths: np.ndarray
    weights: np.ndarray | None = None

    def where(self, index: int) -> str:
        return f"groups[{index}] (table {self.table!r} partition {self.partition})"


@dataclass(frozen=True)
class Pooled:
    """A Lookup's answer: the version it was served at, and per group ``(pooled [bags, dim],
    counts int32 [bags])`` in the request's order."""

    version: Version
    results: list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Snapshot:
    """An immutable snapshot of what the node serves (``readers`` is the only mutable field:
    lookups in flight on this snapshot, guarded by the store's lock).

    ``layout`` is each table's P in the active shard map the node follows; ``known`` every P of
    each table in the shard maps the node has followed or seen as a target; ``by_table`` the
    partitions held per table, those of the layout first."""

    primary: Version
    versions: Mapping[Version, Mapping[PartitionId, PartitionVersion]]
    specs: Mapping[str, TableSpec]
    layout: Mapping[str, int] = field(default_factory=dict)
    known: Mapping[str, frozenset[int]] = field(default_factory=dict)
    readers: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        by_table: dict[str, list[PartitionId]] = {}
        for pid in self.versions.get(self.primary, {}):
            by_table.setdefault(pid.table, []).append(pid)
        for table, pids in by_table.items():
            pids.sort(key=lambda pid: (pid.num_partitions != self.layout.get(table), pid.num_partitions, pid.partition))
        self.by_table: dict[str, tuple[PartitionId, ...]] = {t: tuple(p) for t, p in by_table.items()}
        # The most partitions any layout known here gives each table: a partition index at or
        # beyond it exists in no shard map this node knows.
        self._most: dict[str, int] = {
            t: max({self.layout.get(t, 1), *self.known.get(t, ()), *(p.num_partitions for p in self.by_table.get(t, ()))})
            for t in self.specs
        }

    @property
    def versions_ready(self) -> list[Version]:
        return sorted(self.versions)

    def _version(self, version: Version) -> Mapping[PartitionId, PartitionVersion]:
        if version < 0:
            raise InvalidArgumentError(f"version must be >= 0 (0 = the version this node serves), got {version}")
        parts = self.versions.get(self.primary if version == 0 else version)
        if parts is None:
            raise FailedPreconditionError(f"version {version} is not ready on this node (ready: {self.versions_ready})")
        return parts

    def _spec(self, table: str) -> TableSpec:
        spec = self.specs.get(table)
        if spec is None:
            raise InvalidArgumentError(f"unknown table {table!r}")
        return spec

    def _check_partition(self, table: str, partition: int, *, strict: bool) -> None:
        """With ``strict`` the index must exist in the node's layout; otherwise in some layout
        the node knows (the map the caller routed with may be the previous or the next one)."""
        n = self.layout.get(table, 1) if strict else self._most.get(table, 1)
        if not 0 <= partition < n:
            known = "" if strict else " in every shard map this node knows"
            raise InvalidArgumentError(f"table {table!r}: partition {partition} out of range [0, {n}){known}")

    def resolve(self, version: Version, table: str, partition: int, ids: np.ndarray, *, strict: bool) -> tuple[PartitionVersion, np.ndarray]:
        """The held partition whose rows contain every GLOBAL id, and their local rows.

        Any partition of ``table`` held here may serve: the one named by the node's layout
        first, then others with that index or a whole table (P = 1), which is how requests
        routed with the previous or the next shard map are served during a rebalance. With
        ``strict`` (the caller routes by this node's layout: it sent shard map version 0) a
        partition outside the layout or an id of another partition is INVALID_ARGUMENT;
        otherwise a partition outside every layout the node knows is INVALID_ARGUMENT and one
        that exists but whose rows are not held here is FAILED_PRECONDITION (re-route).
        """
        spec = self._spec(table)
        self._check_partition(table, partition, strict=strict)
        check_range(spec, ids)
        parts = self._version(version)
        for pid in self.by_table.get(table, ()):
            if pid.partition != partition and pid.num_partitions != 1:
                continue
            pv = parts.get(pid)
            local = None if pv is None else pv.table.covered(ids)
            if local is not None:
                return pv, local
        own = parts.get(PartitionId(table, partition, self.layout.get(table, 1)))
        if strict and own is not None:
            raise own.table.not_here(ids)
        raise FailedPreconditionError(f"table {table!r} partition {partition} is not held by this node")

    def lookup(self, groups: Sequence[BagGroup], *, version: Version, map_version: int, out_dtype: type = np.float32) -> Pooled:
        """Pool every group at ``version`` (0: the primary): every group is resolved before any
        is pooled, the groups of one partition are pooled together (``batches``), and every
        answer is checked finite (``out_dtype`` float32 or float16)."""
        if version < 0:
            raise InvalidArgumentError(f"version must be >= 0 (0 = the version this node serves), got {version}")
        served = self.primary if version == 0 else version
        results: list = [None] * len(groups)
        finite = True
        for batch in self.batches(groups, version, strict=map_version == 0):
            pooled = batch.part.pool_local(batch.local, batch.lengths, batch.pooling, batch.weights, groups=len(batch.indices))
            with np.errstate(over="ignore"):  # a float16 overflow is checked just below
                out = pooled.astype(out_dtype, copy=False)
            finite = finite and (cannot_overflow(batch.part.table.max_abs, batch.lengths, batch.weights, out_dtype) or all_finite(out))
            for i, rows, mine in zip(batch.indices, batch.split(pooled), batch.split(out)):
                results[i] = (mine, groups[i].lengths, rows)
        if not finite:  # the first group, in the request's order, whose answer is not finite
            for i, (out, _, pooled) in enumerate(results):
                if not all_finite(out):
                    raise not_finite(groups[i].where(i), groups[i].weights, pooled)
        return Pooled(served, [(out, counts) for out, counts, _ in results])

    def batches(self, groups: Sequence[BagGroup], version: Version, *, strict: bool) -> list[Batch]:
        """The groups resolved (``resolve``) and gathered into one ``Batch`` per held partition,
        pooling and weighting, so each is one ``embedding_bag``. Each batch's ids are checked
        at once; when a check fails, every group is resolved in turn, so the error raised is the
        one the first bad group gets alone."""
        if not groups:
            return []
        keyed: dict[tuple, list[int]] = {}
        for i, g in enumerate(groups):
            keyed.setdefault((g.table, g.partition, g.pooling, g.weights is not None), []).append(i)
        parts = self.versions.get(self.primary if version == 0 else version)
        batches = []
        for (table, partition, pooling_type, _), indices in keyed.items():
            batch = None if parts is None else self._batch(parts, table, partition, pooling_type, [groups[i] for i in indices], indices, strict)
            if batch is None:
                return self._batches_in_turn(groups, version, strict)
            batches.append(batch)
        return batches

    def _batch(self, parts, table, partition, pooling_type, members, indices, strict) -> Batch | None:  # noqa: ANN001
        """One batch when every id is in range and the first partition that may serve them
        holds them all (then each group alone resolves to it too); None otherwise."""
        spec = self.specs.get(table)
        n = (self.layout.get(table, 1) if strict else self._most.get(table, 1)) if spec is not None else 0
        if not 0 <= partition < n:
            return None
        ids, lengths, weights = pooling.concat_bags([(g.ids, g.lengths, g.weights) for g in members])
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= spec.rows):
            return None
        for pid in self.by_table.get(table, ()):
            if pid.partition != partition and pid.num_partitions != 1:
                continue
            pv = parts.get(pid)
            if pv is None:
                continue
            local = pv.table.covered(ids)
            return None if local is None else Batch(pv, pooling_type, tuple(indices), tuple(len(g.lengths) for g in members), local, lengths, weights)
        return None

    def _batches_in_turn(self, groups: Sequence[BagGroup], version: Version, strict: bool) -> list[Batch]:
        resolved = [self.resolve(version, g.table, g.partition, g.ids, strict=strict) for g in groups]
        keyed: dict[tuple, list[int]] = {}
        for i, (g, (pv, _)) in enumerate(zip(groups, resolved)):
            keyed.setdefault((id(pv), g.pooling, g.weights is not None), []).append(i)
        batches = []
        for indices in keyed.values():
            local, lengths, weights = pooling.concat_bags([(resolved[i][1], groups[i].lengths, groups[i].weights) for i in indices])
            bags = tuple(len(groups[i].lengths) for i in indices)
            batches.append(Batch(resolved[indices[0]][0], groups[indices[0]].pooling, tuple(indices), bags, local, lengths, weights))
        return batches


@dataclass(frozen=True)
class Batch:
    """Groups of one request pooled with one ``embedding_bag``: their bags over one held
    partition, concatenated in the request's order (``indices``), pooled the same way."""

    part: PartitionVersion
    pooling: PoolingType
    indices: tuple[int, ...]
    bags: tuple[int, ...]  # per group
    local: np.ndarray  # int64 [n] LOCAL rows
    lengths: np.ndarray  # int32 [sum(bags)], every group's bags in turn
    weights: np.ndarray | None

    def split(self, pooled: np.ndarray) -> list[np.ndarray]:
        """``pooled [sum(bags), dim]`` cut into each group's rows (views)."""
        if len(self.bags) == 1:
            return [pooled]
        ends = np.cumsum(self.bags).tolist()
        return [pooled[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def with_marks(versions: Mapping[Version, Mapping[PartitionId, PartitionVersion]]) -> dict[Version, dict[PartitionId, PartitionVersion]]:
    """``versions`` with one row mask per ``weight`` tensor: the union of the overlays on it
    (fresh arrays, so a reader of an older snapshot keeps the mask that matches its overlays)."""
    marks: dict[int, np.ndarray] = {}
    for parts in versions.values():
        for pv in parts.values():
            if pv.overlay is not None and len(pv.overlay.local_ids):
                m = marks.get(id(pv.weight))
                if m is None:
                    m = marks[id(pv.weight)] = np.zeros(pv.weight.shape[0], dtype=bool)
                m[pv.overlay.local_ids] = True
    return {
        v: {k: replace(pv, mark=marks.get(id(pv.weight)) if pv.overlay is not None else None) for k, pv in parts.items()}
        for v, parts in versions.items()
    }
