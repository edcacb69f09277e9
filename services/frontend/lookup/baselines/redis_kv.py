"""The ``redis-kv`` baseline: embedding rows stored in Redis, fetched with pipelined MGET, pooled
in the frontend — the design many teams pick instead of embedding shards. The layout in Redis
and the loader are in ``redis_kv_store``; docs/benchmarks.md compares it with the shards.

``RedisKvLookupClient`` implements ``services.frontend.lookup.LookupClient``: per batch, the
rows of every feature are deduplicated per table (``np.unique`` + ``return_inverse``), ALL the
unique rows of the batch go out in ONE round trip (one MGET, packed vectorized; split into
several pipelined MGETs of ``max_keys_per_command`` keys, written together, only for huge
batches), and each feature is pooled with ``services.core.pooling.pool`` over the small gathered
matrix of its table's unique rows. A row that is not in Redis is UNAVAILABLE naming the table
and the row, never zeros; a row out of the table's range is INVALID_ARGUMENT.

Bytes on the wire (``LookupStats.add_wire_bytes``): every unique (table, row) fetched costs its
key bytes out and its value bytes back, counted ONCE, on exactly one side: the user side when
only user-side features of the batch need the row, else the item side (a row that both sides
need, e.g. an item in a user's history that is also a candidate, counts as item side). So the
sides add up to exactly the key and row bytes that crossed the wire, and the user side is what
the user contexts alone added (a lower bound on what a user-side-first order would give).

Threads: ``lookup`` runs on the event loop of the ``redis.asyncio`` client; pooling runs in a
one-thread executor (torch ``embedding_bag`` releases the GIL), as ``InprocLookupClient`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from services.core import pooling
from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import (
    ConfigError,
    DeadlineExceededError,
    InvalidArgumentError,
    ShardrecError,
    UnavailableError,
)
from services.core.types import FeatureSide, Version
from services.frontend.lookup import FeatureLookup, LookupResult, LookupStats
from services.frontend.lookup.baselines.redis_kv_store import ROW_DTYPE, bulk_args, meta_key, read_meta, row_key_matrix, row_keys

if TYPE_CHECKING:
    import redis.asyncio


@dataclass(frozen=True)
class _TablePlan:
    """The unique rows one batch needs from one table, and where their keys sit."""

    table: str
    unique_rows: np.ndarray  # int64 [u], ascending
    first_key: int  # index of this table's first key among the batch's keys
    key_bytes: int  # bytes of each of its keys
    user_only: int  # how many of the unique rows only user-side features need


@dataclass(frozen=True)
class _Plan:
    tables: dict[str, _TablePlan]
    local_ids: list[np.ndarray | None]  # per feature: positions in its table's unique rows
    args: bytes  # every key as a RESP bulk string, table after table
    arg_ends: np.ndarray  # int64 [keys]: end offset in ``args`` of each key's bulk string

    @property
    def num_keys(self) -> int:
        return len(self.arg_ends)


REDIS_KV_NODE = "redis-kv"  # the node label of the store's round trips in the lookup metrics


class RedisKvLookupClient:
    """The redis-kv baseline's lookup step (see the module docstring).

    ``redis`` is a ``redis.asyncio.Redis`` speaking bytes; this client borrows connections from
    its pool and does not own it (the caller closes it). ``spec`` gives the tables' rows and
    dim. ``lookup`` runs on the client's event loop; the result's version is the version asked
    for (``verify_loaded`` checks at startup that Redis holds that version's rows).

    The MGET is packed here, vectorized (fixed-width keys: a few numpy passes build the whole
    command), and written on a pooled connection with ``send_packed_command``; redis-py's own
    packing is a per-argument Python loop that cost ~1.4 ms of CPU for 2,200 keys (numpy: 55 us),
    which would have made the baseline look worse than a careful team's.
    """

    def __init__(
        self,
        redis: "redis.asyncio.Redis",
        prefix: str,
        spec: ModelSpec,
        *,
        max_keys_per_command: int = 50_000,
    ) -> None:
        if max_keys_per_command < 1:
            raise ConfigError(f"max_keys_per_command must be >= 1, got {max_keys_per_command}")
        self._redis = redis
        self._prefix = prefix
        self._spec = spec
        self._dim = spec.dense_arch.embedding_dim
        self._row_bytes = self._dim * ROW_DTYPE.itemsize
        self._max_keys = max_keys_per_command
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="redis-kv-pool")
        self.stats = LookupStats()
        # Redis round trips; one per batch that needs any row (``stats.rpcs`` counts them too).
        self.round_trips = 0

    async def verify_loaded(self, version: Version) -> dict:
        """Check the meta key: loaded for this model, ``version`` and dim, with every table the
        features use at its row count. Returns the meta; ConfigError telling how to load
        otherwise, UnavailableError when Redis does not answer."""
        from redis import exceptions as redis_errors

        try:
            raw = await self._redis.get(meta_key(self._prefix))
        except redis_errors.RedisError as e:
            raise UnavailableError(f"redis-kv store unavailable: {e}") from e
        hint = f"load the rows with 'shardrec bench load-kv --checkpoint URI --redis URL --prefix {self._prefix}'"
        meta = read_meta(raw)
        if meta is None:
            raise ConfigError(f"redis-kv: no {meta_key(self._prefix).decode()!r} in Redis (rows never loaded, or a load is unfinished); {hint}")
        want = (self._spec.name, version, self._dim)
        got = (meta.get("model"), meta.get("version"), meta.get("dim"))
        if got != want:
            raise ConfigError(f"redis-kv: Redis holds model/version/dim {got}, this frontend serves {want}; {hint}")
        tables = meta.get("tables", {})
        for name in sorted({f.table for f in self._spec.sparse_features}):
            if tables.get(name) != self._spec.table(name).rows:
                raise ConfigError(
                    f"redis-kv: table {name!r} is not loaded ({tables.get(name)} rows in meta, model has "
                    f"{self._spec.table(name).rows}); {hint}"
                )
        return meta

    # -- planning (event loop; a few vectorized passes) ----------------------------------------
    def _plan(self, features: Sequence[FeatureLookup]) -> _Plan:
        by_table: dict[str, list[int]] = {}
        for i, f in enumerate(features):
            rows = f.bags.rows
            if len(rows):
                n = self._spec.table(f.table).rows
                lo, hi = int(rows.min()), int(rows.max())
                if lo < 0 or hi >= n:
                    bad = lo if lo < 0 else hi
                    raise InvalidArgumentError(f"feature {f.feature!r}: row {bad} is outside [0, {n}) of table {f.table!r}")
                by_table.setdefault(f.table, []).append(i)
        plans: dict[str, _TablePlan] = {}
        local_ids: list[np.ndarray | None] = [None] * len(features)
        args: list[bytes] = []
        ends: list[np.ndarray] = []
        first, offset = 0, 0
        for table, members in by_table.items():
            parts = [features[i].bags.rows for i in members]
            unique, inverse = np.unique(np.concatenate(parts), return_inverse=True)
            item_needs = np.zeros(len(unique), dtype=bool)
            start = 0
            for i, part in zip(members, parts, strict=True):
                local = inverse[start : start + len(part)]
                local_ids[i] = local
                if features[i].side is not FeatureSide.USER:
                    item_needs[local] = True
                start += len(part)
            keys = row_key_matrix(self._prefix, table, unique, self._spec.table(table).rows)
            arg = bulk_args(keys)
            args.append(arg.tobytes())
            ends.append(offset + arg.shape[1] * np.arange(1, len(unique) + 1, dtype=np.int64))
            offset += arg.size
            plans[table] = _TablePlan(table, unique, first, keys.shape[1], int(len(unique) - item_needs.sum()))
            first += len(unique)
        arg_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        return _Plan(plans, local_ids, b"".join(args), arg_ends)

    def _packed_mgets(self, plan: _Plan) -> tuple[list[bytes], int]:
        """The batch's keys as ``MGET`` commands of at most ``max_keys_per_command`` keys, in RESP,
        ready to write in one go (a pipeline); and how many commands that is."""
        chunks: list[bytes] = []
        n = plan.num_keys
        for s in range(0, n, self._max_keys):
            e = min(n, s + self._max_keys)
            lo = int(plan.arg_ends[s - 1]) if s else 0
            chunks.append(b"*%d\r\n$4\r\nMGET\r\n" % (e - s + 1))
            chunks.append(plan.args[lo : int(plan.arg_ends[e - 1])])
        return chunks, (n + self._max_keys - 1) // self._max_keys

    async def _round_trip(self, packed: list[bytes], commands: int) -> list[bytes | None]:
        """Write the packed MGETs on one pooled connection and read their replies: one round
        trip. A connection left mid-reply (an error, the deadline) is dropped, never reused."""
        pool = self._redis.connection_pool
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = await pool.get_connection("MGET")
        try:
            await conn.send_packed_command(packed)
            replies = [await conn.read_response() for _ in range(commands)]
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return replies[0] if commands == 1 else [b for r in replies for b in r]

    async def _fetch(self, plan: _Plan, timeout_s: float) -> list[bytes | None]:
        from redis import exceptions as redis_errors

        if timeout_s <= 0:
            raise DeadlineExceededError("deadline passed before the redis-kv MGET was sent")
        packed, commands = self._packed_mgets(plan)
        try:
            blobs = await asyncio.wait_for(self._round_trip(packed, commands), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"redis-kv MGET of {plan.num_keys} rows did not answer within {timeout_s * 1000:.0f} ms") from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as e:
            raise UnavailableError(f"redis-kv store unavailable: {e}") from e
        except redis_errors.RedisError as e:
            raise ShardrecError(f"redis-kv MGET of {plan.num_keys} rows failed: {e}") from e
        self.round_trips += 1
        self.stats.rpcs += 1
        # exported as shardrec_lookup_rpcs{node="redis-kv"}, as a shard node's calls are
        self.stats.count(self.stats.per_node_calls, (REDIS_KV_NODE, "primary"))
        return blobs

    # -- gathering and pooling (worker thread) -------------------------------------------------
    def _key(self, tp: _TablePlan, j: int) -> bytes:
        return row_keys(self._prefix, tp.table, tp.unique_rows[j : j + 1], self._spec.table(tp.table).rows)[0]

    def _gather(self, plan: _Plan, blobs: Sequence[bytes | None]) -> dict[str, np.ndarray]:
        """table -> float32 [unique rows, dim] from the MGET replies (read-only views)."""
        out = {}
        for table, tp in plan.tables.items():
            part = blobs[tp.first_key : tp.first_key + len(tp.unique_rows)]
            try:
                data = b"".join(part)
            except TypeError:  # a None: the row is not in Redis
                j = next(k for k, b in enumerate(part) if b is None)
                raise UnavailableError(
                    f"redis-kv: table {table!r} row {int(tp.unique_rows[j])} is not in Redis "
                    f"(key {self._key(tp, j)!r}); load the rows with 'shardrec bench load-kv'"
                ) from None
            if len(data) != len(part) * self._row_bytes:
                j = next(k for k, b in enumerate(part) if len(b) != self._row_bytes)
                raise ShardrecError(
                    f"redis-kv: table {table!r} row {int(tp.unique_rows[j])} holds {len(part[j])} bytes, "
                    f"expected {self._row_bytes} (float32 x {self._dim}); reload with 'shardrec bench load-kv'"
                )
            out[table] = np.frombuffer(data, dtype=ROW_DTYPE).reshape(len(part), self._dim)
        return out

    def _pool_all(self, features: Sequence[FeatureLookup], plan: _Plan, blobs: Sequence[bytes | None]) -> dict[str, np.ndarray]:
        matrices = {t: pooling.as_weight(m) for t, m in self._gather(plan, blobs).items()}
        pooled = {}
        for f, local in zip(features, plan.local_ids, strict=True):
            if local is None:  # no ids at all: every bag is empty and pools to zeros
                pooled[f.feature] = np.zeros((len(f.bags.lengths), self._dim), dtype=np.float32)
            else:
                pooled[f.feature] = pooling.pool(matrices[f.table], local, f.bags.lengths, f.pooling, f.bags.weights)
        return pooled

    # -- the batch -----------------------------------------------------------------------------
    async def lookup(
        self, features: list[FeatureLookup], *, version: Version, timeout_s: float, request_id: str
    ) -> LookupResult:
        self.stats.batches += 1
        self.stats.ids_sent += sum(len(f.bags.rows) for f in features)
        plan = self._plan(features)
        blobs: list[bytes | None] = []
        if plan.num_keys:
            blobs = await self._fetch(plan, timeout_s)
            self._count_bytes(plan)
        pooled = await asyncio.get_running_loop().run_in_executor(self._executor, self._pool_all, features, plan, blobs)
        return LookupResult(pooled, version, 0)

    def _count_bytes(self, plan: _Plan) -> None:
        for tp in plan.tables.values():
            n = len(tp.unique_rows)
            per_row = tp.key_bytes + self._row_bytes
            self.stats.request_bytes += n * tp.key_bytes
            self.stats.response_bytes += n * self._row_bytes
            if tp.user_only:
                self.stats.add_wire_bytes(FeatureSide.USER, tp.user_only * per_row)
            if n - tp.user_only:
                self.stats.add_wire_bytes(FeatureSide.ITEM, (n - tp.user_only) * per_row)

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
