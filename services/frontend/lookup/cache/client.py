"""``CachedLookupClient``: a ``RowCache`` in front of any remote ``LookupClient`` (the shards'
gRPC client, the redis-kv baseline), so both are compared with the same cache (docs/cache.md).

Per batch, at the cache's version (a batch at another version, e.g. one still running when the
frontend switched, goes straight to the remote lookup and leaves the cache alone):

1. per table, the unique rows of every feature over it (``np.unique``), counted into the
   frequency sketch; the rows held are copied out of the slab at once (before any await, so a
   concurrent batch's evictions cannot touch them);
2. the rows missing go to the remote lookup as one-id bags (SUM: a one-id bag pools to its row
   exactly, whatever the partitioning), one feature per table and side;
3. the fetched rows are offered to the cache (if its version did not move meanwhile);
4. each feature is pooled over the batch's gathered rows (``core.pooling``; a bag of one id is
   a row copy), on the loop for a small batch, else in a worker thread.

So every bag, multi-id ones included (histories, tags), is pooled here from exact rows at the
batch's version: a response equals ``core.reference`` at its version whether its rows came
from the cache or not. Event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.core import pooling
from services.core.errors import InvalidArgumentError, ShardrecError
from services.core.types import FeatureSide, PoolingType, Version
from services.frontend.batch import Bags
from services.frontend.lookup import FeatureLookup, LookupClient, LookupResult, LookupStats
from services.frontend.lookup.cache.store import RowCache

# Batches of at most this many ids are pooled on the event loop (~0.1 ms at 1,000 ids); larger
# ones in a worker thread (torch releases the GIL), as the monolith and redis-kv pool.
_INLINE_IDS = 4096


@dataclass
class _Gathered:
    """The rows one batch needs, every table at once (keys carry the table)."""

    starts: list[int]  # per feature: where its ids begin in ``inverse``
    inverse: np.ndarray  # int64 [n]: each id of every feature (concatenated) -> its unique key
    keys: np.ndarray  # int64 [u]: unique cache keys
    hashes: np.ndarray  # uint64 [u]: their hashes (``RowCache.hash``)
    matrix: np.ndarray  # float32 [u, dim]: their rows (hits filled at once, misses after the fetch)
    missing: np.ndarray  # int64: positions in ``keys`` not in the cache
    item_side: np.ndarray  # bool [u]: an item-side feature needs the row


class CachedLookupClient:
    """``inner`` behind ``cache``; ``stats`` are the inner client's (its RPCs, bytes and ids
    sent count only what the cache did not serve); ``map_version()`` is the shard map a batch
    served wholly from the cache reports."""

    def __init__(self, inner: LookupClient, cache: RowCache, *, map_version: Callable[[], int] = lambda: 0) -> None:
        self.inner = inner
        self.cache = cache
        self._map_version = map_version
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-pool")

    @property
    def stats(self) -> LookupStats:
        return self.inner.stats

    @property
    def board(self):
        """The inner client's replica board, if it has one (``observe.frontend_reading``)."""
        return getattr(self.inner, "board", None)

    async def lookup(self, features: list[FeatureLookup], *, version: Version, timeout_s: float, request_id: str) -> LookupResult:
        cache = self.cache
        if version != cache.version:
            cache.bypassed += sum(len(f.bags.rows) for f in features)
            return await self.inner.lookup(features, version=version, timeout_s=timeout_s, request_id=request_id)
        g = self._gather(features)
        map_version = None
        if len(g.missing):
            remote, where = _remote(self.cache, g)
            result = await self.inner.lookup(remote, version=version, timeout_s=timeout_s, request_id=request_id)
            if result.version != version:
                raise ShardrecError(f"lookup answered at version {result.version}, asked {version}")
            map_version = result.shard_map_version
            for f in remote:
                g.matrix[where[f.feature]] = result.pooled[f.feature]
            if cache.version == version:
                cache.offer(g.keys[g.missing], g.matrix[g.missing], g.hashes[g.missing])
        else:
            self.inner.stats.batches += 1
        if len(g.inverse) <= _INLINE_IDS:  # a thread hop costs more than pooling a small batch
            pooled = _pool_all(features, g, cache.dim)
        else:
            pooled = await asyncio.get_running_loop().run_in_executor(self._executor, _pool_all, features, g, cache.dim)
        return LookupResult(pooled, version, self._map_version() if map_version is None else map_version)

    def _gather(self, features: list[FeatureLookup]) -> _Gathered:
        cache = self.cache
        parts, starts, sides = [], [], []
        n = 0
        for f in features:
            rows = f.bags.rows
            starts.append(n)
            if len(rows):
                top = cache.rows_of[f.table]
                lo, hi = int(rows.min()), int(rows.max())
                if lo < 0 or hi >= top:
                    raise InvalidArgumentError(f"feature {f.feature!r}: row {lo if lo < 0 else hi} is outside [0, {top}) of table {f.table!r}")
                parts.append(cache.keys(f.table, rows))
                sides.append((n, n + len(rows), f.side is not FeatureSide.USER))
                n += len(rows)
        all_keys = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        keys, inverse, counts = np.unique(all_keys, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        h = cache.hash(keys)
        cache.record(keys, counts, h)
        slots = cache.find(keys, h)
        hit = slots >= 0
        if hit.all():
            matrix = cache.read(slots)
            missing = np.zeros(0, dtype=np.int64)
        else:
            matrix = np.empty((len(keys), cache.dim), dtype=np.float32)
            matrix[hit] = cache.read(slots[hit])
            missing = np.flatnonzero(~hit)
        item_side = np.zeros(len(keys), dtype=bool)
        for lo, hi, item in sides:
            if item:
                item_side[inverse[lo:hi]] = True
        hits = int(counts[hit].sum())
        cache.hits += hits
        cache.misses += n - hits
        return _Gathered(starts, inverse, keys, h, matrix, missing, item_side)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        await self.inner.close()


def _remote(cache: RowCache, g: _Gathered) -> tuple[list[FeatureLookup], dict[str, np.ndarray]]:
    """The missing rows as one-id SUM bags: per table, the rows any item-side feature needs
    (item side) and the others (user side), so the wire bytes keep their side; and where each
    such feature's rows go in the batch's matrix."""
    out, where = [], {}
    missing = g.missing  # ascending keys: grouped by table
    tables, ids = cache.split(g.keys[missing])
    bounds = np.flatnonzero(np.diff(tables)) + 1
    for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(missing)]))):
        table = cache.table_names[int(tables[lo])]
        at, rows = missing[lo:hi], ids[lo:hi]
        item = g.item_side[at]
        for side, sel in ((FeatureSide.USER, ~item), (FeatureSide.ITEM, item)):
            if sel.any():
                name = f"{table}/{side.value}"
                where[name] = at[sel]
                out.append(FeatureLookup(name, table, PoolingType.SUM, Bags(rows[sel], np.ones(int(sel.sum()), dtype=np.int32)), side))
    return out, where


def _pool_all(features: list[FeatureLookup], g: _Gathered, dim: int) -> dict[str, np.ndarray]:
    """Each feature pooled over the batch's gathered rows (worker thread; private arrays)."""
    pooled: dict[str, np.ndarray] = {}
    weight = None
    for f, start in zip(features, g.starts, strict=True):
        lengths = f.bags.lengths
        if not len(f.bags.rows):  # no ids at all: every bag is empty and pools to zeros
            pooled[f.feature] = np.zeros((len(lengths), dim), dtype=np.float32)
            continue
        local = g.inverse[start : start + len(f.bags.rows)]
        if f.bags.weights is None and len(lengths) == len(local) and (lengths == 1).all():
            pooled[f.feature] = g.matrix[local]  # one id a bag: the row itself
            continue
        if weight is None:
            weight = pooling.as_weight(g.matrix)
        pooled[f.feature] = pooling.pool(weight, local, lengths, f.pooling, f.bags.weights)
    return pooled
