"""Feature prep: validate Recommend requests, then turn a micro-batch of them into the bags and
dense matrix of a ``PreparedBatch`` (see ``services/frontend/batch.py`` and docs/features.md).

Two stages, on purpose:

- ``FeaturePrep.validate(req)`` is pure and synchronous. It runs BEFORE batching, so a bad
  request is refused on its own (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field and
  value) and never joins a batch nor reaches a shard.
- ``await FeaturePrep.prepare(requests)`` reads the stored user and item records of the whole
  batch in ONE Redis round trip (one MGET of the unique user keys and the unique candidate
  item keys), applies request overrides, maps raw values to table rows and deduplicates:
  items are unique per batch; user-side bags are built once per user context (a user id
  without request-time sparse overrides, shared by the batch, or one request's own
  overridden features), never once per candidate.

Everything over ids is vectorized (``np.unique``, ``np.repeat``, CSR gathers); only the R
requests of a batch are looped over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from redis import exceptions as redis_errors

from services._proto.shardrec.v1 import recommend_pb2
from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import InvalidArgumentError, ResourceExhaustedError, ShardrecError, UnavailableError
from services.core.features import FeatureLayout, RawBags, map_to_rows, unmappable
from services.core.types import FeatureSide, FeatureSource, MappingKind, PoolingType, SparseFeatureSpec
from services.frontend.batch import Bags, PreparedBatch, RecRequest

if TYPE_CHECKING:
    import redis.asyncio


@dataclass(frozen=True)
class FeatureLimits:
    """Caps applied by ``FeaturePrep.validate``.

    - ``max_candidates``: more candidates in one request is RESOURCE_EXHAUSTED (split it).
    - ``default_top_k``: the top_k of a request that leaves it unset (0). 0 (the default)
      means there is none and such a request is INVALID_ARGUMENT; N > 0 means
      ``min(N, number of candidates)``.
    """

    max_candidates: int = 1000
    default_top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.default_top_k < 0:
            raise ValueError(f"default_top_k must be >= 0, got {self.default_top_k}")


def _ragged_take(
    values: np.ndarray, lengths: np.ndarray, index: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Bags ``index`` of a CSR (``values``, ``lengths``), in that order, as a new CSR.

    >>> _ragged_take(np.array([5, 6, 7]), np.array([2, 1]), np.array([1, 0, 1]))[:2]
    (array([7, 5, 6, 7]), array([1, 2, 1], dtype=int32))
    """
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    out_lengths = lengths[index].astype(np.int32)
    total = int(out_lengths.sum())
    out_starts = np.cumsum(out_lengths, dtype=np.int64) - out_lengths
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts[index] - out_starts, out_lengths)
    return values[pos], out_lengths, (None if weights is None else weights[pos])


class FeaturePrep:
    """Validates requests and prepares batches for one model.

    Owns the two record layouts (user, item) derived from ``spec`` and the batch counters.
    ``redis`` is a ``redis.asyncio.Redis`` speaking bytes (or None: every entity is missing and
    gets defaults, handy in tests). ``key_prefix`` must equal the ``--prefix`` the features were
    loaded with (``shardrec features load``).

    ``validate`` may be called from any thread; ``prepare`` and the counters belong to the
    event loop of ``redis``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        redis: "redis.asyncio.Redis | None",
        key_prefix: str,
        limits: FeatureLimits,
    ) -> None:
        self.spec = spec
        self.limits = limits
        self.key_prefix = key_prefix
        self._redis = redis
        self.user_layout = FeatureLayout(spec, FeatureSide.USER)
        self.item_layout = FeatureLayout(spec, FeatureSide.ITEM)
        self._sparse = {f.name: f for f in spec.sparse_features}
        self._dense = {d.name: d for d in spec.dense_features}
        self._rows = {f.name: spec.table(f.table).rows for f in spec.sparse_features}
        self._user_entity = self._entity_feature(FeatureSide.USER)
        self._item_entity = self._entity_feature(FeatureSide.ITEM)
        self._overridable = tuple(f.name for f in self.user_layout.sparse)
        # Counters (event loop only).
        self.batches = 0
        self.requests = 0
        self.item_ids_requested = 0
        self.item_ids_unique = 0
        self.user_contexts = 0
        self.redis_round_trips = 0
        self.redis_keys = 0

    def _entity_feature(self, side: FeatureSide) -> SparseFeatureSpec | None:
        for f in self.spec.features(side):
            if f.source is FeatureSource.ENTITY_ID:
                return f
        return None

    # -- validation (pure, before batching) ------------------------------------------------

    def _check_rows(self, values: np.ndarray, f: SparseFeatureSpec, field: str, indexed: bool = True) -> None:
        rows = self._rows[f.name]
        bad = unmappable(values, f.mapping, rows)
        if bad.size:
            i = int(bad[0])
            where = f"{field}[{i}]" if indexed else field
            raise InvalidArgumentError(
                f"{where} = {int(values[i])} is not a row of table {f.table!r}: feature {f.name!r} maps ids "
                f"by identity, so they must be in [0, {rows})"
            )

    def validate(self, req: recommend_pb2.RecommendRequest) -> RecRequest:
        """Check one request against the model and the limits; return it as a RecRequest.

        Raises InvalidArgumentError (or ResourceExhaustedError for too many candidates)
        naming the field and the value. Raw ids are kept; rows are mapped in ``prepare``.
        """
        spec = self.spec
        if req.model and req.model != spec.name:
            raise InvalidArgumentError(f"unknown model {req.model!r} (serving {spec.name!r})")
        n = len(req.candidate_item_ids)
        if n == 0:
            raise InvalidArgumentError("candidate_item_ids is empty: give at least one candidate item id")
        if n > self.limits.max_candidates:
            raise ResourceExhaustedError(
                f"candidate_item_ids has {n} ids, more than max_candidates {self.limits.max_candidates}; "
                f"split the request"
            )
        top_k = req.top_k
        if top_k == 0 and self.limits.default_top_k > 0:
            top_k = min(self.limits.default_top_k, n)
        if top_k <= 0 or top_k > n:
            raise InvalidArgumentError(f"top_k = {req.top_k} must be between 1 and the number of candidates ({n})")
        candidates = np.fromiter(req.candidate_item_ids, dtype=np.int64, count=n)
        if self._item_entity is not None:
            self._check_rows(candidates, self._item_entity, "candidate_item_ids")
        if self._user_entity is not None:
            self._check_rows(np.array([req.user_id], dtype=np.int64), self._user_entity, "user_id", indexed=False)

        dense: dict[str, float] = {}
        for name, value in req.dense_features.items():
            d = self._dense.get(name)
            if d is None:
                raise InvalidArgumentError(
                    f"dense_features[{name!r}]: unknown dense feature of model {spec.name!r} "
                    f"(known: {', '.join(self._dense)})"
                )
            if not math.isfinite(value):
                raise InvalidArgumentError(f"dense_features[{name!r}] = {value}: must be a finite number")
            dense[name] = float(value)

        sparse: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for name, sf in req.sparse_features.items():
            field = f"sparse_features[{name!r}]"
            f = self._sparse.get(name)
            if f is None or f.side is not FeatureSide.USER or f.source is not FeatureSource.STORED:
                what = (
                    "unknown sparse feature"
                    if f is None
                    else "an item-side feature"
                    if f.side is FeatureSide.ITEM
                    else "the entity id feature (set user_id instead)"
                )
                raise InvalidArgumentError(
                    f"{field}: {what} of model {spec.name!r}; only stored user-side features can be given "
                    f"in a request ({', '.join(self._overridable) or 'none'})"
                )
            m = len(sf.values)
            if m > f.max_bag_len:
                raise InvalidArgumentError(f"{field}.values has {m} values, more than max_bag_len {f.max_bag_len}")
            values = np.fromiter(sf.values, dtype=np.int64, count=m)
            weights: np.ndarray | None = None
            if len(sf.weights):
                if len(sf.weights) != m:
                    raise InvalidArgumentError(
                        f"{field}.weights has {len(sf.weights)} weights for {m} values; give one weight per value or none"
                    )
                if f.pooling is not PoolingType.SUM:
                    raise InvalidArgumentError(
                        f"{field}.weights: feature {name!r} pools by {f.pooling.value}; per-value weights need sum pooling"
                    )
                weights = np.fromiter(sf.weights, dtype=np.float32, count=m)
                bad = np.flatnonzero(~np.isfinite(weights))
                if bad.size:
                    i = int(bad[0])
                    raise InvalidArgumentError(f"{field}.weights[{i}] = {weights[i]}: weights must be finite")
            self._check_rows(values, f, f"{field}.values")
            sparse[name] = (values, weights)

        return RecRequest(
            request_id=req.request_id,
            user_id=int(req.user_id),
            candidates=candidates,
            top_k=top_k,
            dense_overrides=dense,
            sparse_overrides=sparse,
        )

    # -- batch prep (one Redis round trip) -------------------------------------------------

    async def _fetch(self, keys: list[bytes]) -> list[bytes | None]:
        if self._redis is None or not keys:
            return [None] * len(keys)
        try:
            blobs = await self._redis.mget(keys)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise UnavailableError(f"feature store (Redis) unavailable: {e}") from e
        except redis_errors.RedisError as e:
            raise ShardrecError(f"feature store (Redis) MGET of {len(keys)} keys failed: {e}") from e
        self.redis_round_trips += 1
        self.redis_keys += len(keys)
        return blobs

    def _to_rows(self, values: np.ndarray, f: SparseFeatureSpec) -> np.ndarray:
        rows = self._rows[f.name]
        if f.mapping is MappingKind.IDENTITY:
            # validate() checked request values and the loader stored values: a value out of
            # range here is a request that skipped validate() or a record written behind the
            # loader's back. Never let it reach a shard as a silently wrong row.
            bad = unmappable(values, f.mapping, rows)
            if bad.size:
                raise ShardrecError(
                    f"feature {f.name!r}: value {int(values[bad[0]])} is outside [0, {rows}) of table {f.table!r} "
                    f"(stored records must be written by 'shardrec features load'; requests must pass validate())"
                )
        return map_to_rows(values, f.mapping, rows)

    async def prepare(self, requests: Sequence[RecRequest]) -> PreparedBatch:
        """The PreparedBatch of validated requests (see ``services/frontend/batch.py``).

        One MGET for the batch; missing users / items get empty bags and the manifest's dense
        defaults. Request overrides win over stored values: a sparse override replaces that
        user context's bag, a dense override sets the value for every sample of its request
        (item-side dense included). Raises UnavailableError when Redis cannot be reached.
        """
        nreq = len(requests)
        if nreq == 0:
            raise ValueError("prepare() needs at least one request")
        counts = np.fromiter((len(r.candidates) for r in requests), dtype=np.int64, count=nreq)
        sample_offsets = np.zeros(nreq + 1, dtype=np.int64)
        np.cumsum(counts, out=sample_offsets[1:])
        num_samples = int(sample_offsets[-1])
        all_candidates = np.concatenate([r.candidates for r in requests]).astype(np.int64, copy=False)
        items, item_of_sample = np.unique(all_candidates, return_inverse=True)
        item_of_sample = item_of_sample.reshape(-1).astype(np.int32)

        # User contexts: one per user id without sparse overrides, one per overriding request.
        ctx_of_request = np.empty(nreq, dtype=np.int32)
        ctx_user: list[int] = []
        ctx_request: list[int] = []  # the overriding request of a context, or -1 (shared)
        shared: dict[int, int] = {}
        for i, r in enumerate(requests):
            if r.sparse_overrides:
                ctx_of_request[i] = len(ctx_user)
                ctx_user.append(r.user_id)
                ctx_request.append(i)
            else:
                c = shared.get(r.user_id)
                if c is None:
                    c = shared[r.user_id] = len(ctx_user)
                    ctx_user.append(r.user_id)
                    ctx_request.append(-1)
                ctx_of_request[i] = c
        ctx_users = np.array(ctx_user, dtype=np.int64)
        users, user_of_ctx = np.unique(ctx_users, return_inverse=True)
        user_of_ctx = user_of_ctx.reshape(-1)

        # One round trip: every unique user key, then every unique item key.
        user_keys = self.user_layout.keys(self.key_prefix, users) if self.user_layout.record_bytes else []
        item_keys = self.item_layout.keys(self.key_prefix, items) if self.item_layout.record_bytes else []
        blobs = await self._fetch(user_keys + item_keys)
        nu = len(user_keys)
        stored_users = self.user_layout.decode(blobs[:nu] if nu else [None] * len(users), user_keys or None)
        stored_items = self.item_layout.decode(blobs[nu:] if item_keys else [None] * len(items), item_keys or None)

        user_bags: dict[str, Bags] = {}
        for f in self.spec.features(FeatureSide.USER):
            if f.source is FeatureSource.ENTITY_ID:
                user_bags[f.name] = Bags(self._to_rows(ctx_users, f), np.ones(len(ctx_users), dtype=np.int32))
                continue
            user_bags[f.name] = self._user_bags(f, requests, stored_users.sparse[f.name], user_of_ctx, ctx_request)

        item_bags: dict[str, Bags] = {}
        for f in self.spec.features(FeatureSide.ITEM):
            if f.source is FeatureSource.ENTITY_ID:
                item_bags[f.name] = Bags(self._to_rows(items, f), np.ones(len(items), dtype=np.int32))
            else:
                raw = stored_items.sparse[f.name]
                item_bags[f.name] = Bags(self._to_rows(raw.values, f), raw.lengths)

        dense = np.empty((num_samples, len(self.spec.dense_features)), dtype=np.float32)
        user_of_request = user_of_ctx[ctx_of_request]
        overriding = [i for i, r in enumerate(requests) if r.dense_overrides]
        for j, d in enumerate(self.spec.dense_features):
            if d.side is FeatureSide.USER:
                per_request = stored_users.dense[d.name][user_of_request]
                for i in overriding:
                    if d.name in requests[i].dense_overrides:
                        per_request[i] = requests[i].dense_overrides[d.name]
                dense[:, j] = np.repeat(per_request, counts)
            else:
                dense[:, j] = stored_items.dense[d.name][item_of_sample]
                for i in overriding:
                    if d.name in requests[i].dense_overrides:
                        dense[sample_offsets[i] : sample_offsets[i + 1], j] = requests[i].dense_overrides[d.name]

        self.batches += 1
        self.requests += nreq
        self.item_ids_requested += num_samples
        self.item_ids_unique += len(items)
        self.user_contexts += len(ctx_users)
        return PreparedBatch(
            requests=tuple(requests),
            sample_offsets=sample_offsets,
            user_of_sample=np.repeat(ctx_of_request, counts),
            item_of_sample=item_of_sample,
            user_bags=user_bags,
            item_bags=item_bags,
            dense=dense,
        )

    def _user_bags(
        self,
        f: SparseFeatureSpec,
        requests: Sequence[RecRequest],
        stored: RawBags,
        user_of_ctx: np.ndarray,
        ctx_request: list[int],
    ) -> Bags:
        """One bag per user context of a stored user-side feature: the stored bag of the
        context's user, or the request's own bag where it overrides ``f``."""
        overrides = [
            (c, requests[i].sparse_overrides[f.name])
            for c, i in enumerate(ctx_request)
            if i >= 0 and f.name in requests[i].sparse_overrides
        ]
        if not overrides:
            values, lengths, _ = _ragged_take(stored.values, stored.lengths, user_of_ctx)
            return Bags(self._to_rows(values, f), lengths)
        # Append the override bags after the stored ones and point their contexts at them.
        index = user_of_ctx.copy()
        num_stored = len(stored.lengths)
        for k, (c, _) in enumerate(overrides):
            index[c] = num_stored + k
        src_values = np.concatenate([stored.values] + [v for _, (v, _w) in overrides])
        src_lengths = np.concatenate(
            [stored.lengths, np.array([len(v) for _, (v, _w) in overrides], dtype=np.int32)]
        )
        src_weights = None
        if any(w is not None for _, (_v, w) in overrides):
            src_weights = np.concatenate(
                [np.ones(len(stored.values), dtype=np.float32)]
                + [np.ones(len(v), dtype=np.float32) if w is None else w for _, (v, w) in overrides]
            )
        values, lengths, weights = _ragged_take(src_values, src_lengths, index, src_weights)
        return Bags(self._to_rows(values, f), lengths, weights)
