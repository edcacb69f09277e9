"""Feature prep: a micro-batch of validated requests (``validate.py``) turned into the bags and
dense matrix of a ``PreparedBatch`` (see ``services/frontend/batch.py`` and docs/features.md).

``await FeaturePrep.prepare(requests)`` reads the stored user and item records of the whole
batch in ONE Redis round trip (one MGET of the store's marker, the unique user keys and the
unique candidate item keys: ``feature_store.FeatureStoreClient``), applies request overrides,
maps raw values to table rows and deduplicates: items are unique per batch; user-side bags are built once per user context (a user id without
request-time sparse overrides, shared by the batch, or one request's own overridden features),
never once per candidate; a candidate repeated within a request, or named by two requests of
one user context without dense overrides, is scored once (``DistinctCandidates``).

Everything over ids is vectorized (``np.unique``, ``np.repeat``, CSR gathers); only the R
requests of a batch are looped over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from services._proto.shardrec.v1 import recommend_pb2
from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import ShardrecError
from services.core.feature_store import StoreKeys
from services.core.features import FeatureLayout, RawBags, map_to_rows, unmappable
from services.core.types import FeatureSide, FeatureSource, MappingKind, SparseFeatureSpec
from services.frontend.batch import Bags, DistinctCandidates, PreparedBatch, RecRequest, ragged_take, scoring_contexts
from services.frontend.feature_store import FeatureStoreClient, FeatureStoreConfig
from services.frontend.validate import FeatureLimits, RequestValidator

if TYPE_CHECKING:
    import redis.asyncio


class FeaturePrep:
    """Prepares batches for one model.

    Owns the two record layouts (user, item) derived from ``spec``, the feature store client
    (``store``) and the batch counters. ``redis`` is a ``redis.asyncio.Redis`` speaking bytes (or
    None: every entity is missing and gets defaults, handy in tests). ``key_prefix`` must equal
    the ``--prefix`` the features were loaded with (``shardrec features load``); ``store_config``
    sets the store's timeout, breaker and loss policy. ``validator`` checks requests against the
    same model and ``limits`` (``validate`` is its check, for callers that hold a prep).

    ``prepare`` and the counters belong to the event loop of ``redis``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        redis: "redis.asyncio.Redis | None",
        key_prefix: str,
        limits: FeatureLimits,
        store_config: FeatureStoreConfig = FeatureStoreConfig(),
    ) -> None:
        self.spec = spec
        self.key_prefix = key_prefix
        self.validator = RequestValidator(spec, limits)
        self.user_layout = FeatureLayout(spec, FeatureSide.USER)
        self.item_layout = FeatureLayout(spec, FeatureSide.ITEM)
        keys = StoreKeys.of(key_prefix, self.user_layout, self.item_layout)
        self.store = FeatureStoreClient(redis, keys, self.user_layout, self.item_layout, store_config)
        self._rows = {f.name: spec.table(f.table).rows for f in spec.sparse_features}
        # Counters (event loop only).
        self.batches = 0
        self.requests = 0
        self.item_ids_requested = 0
        self.item_ids_unique = 0
        self.user_contexts = 0

    @property
    def redis_round_trips(self) -> int:
        """Batch MGETs answered (a generation switch re-reads once: two for that batch)."""
        return self.store.round_trips

    @property
    def redis_keys(self) -> int:
        """Record keys read (the marker in each MGET not counted)."""
        return self.store.keys_read

    def validate(self, req: recommend_pb2.RecommendRequest) -> RecRequest:
        """``RequestValidator.validate`` of this prep's model and limits (any thread)."""
        return self.validator.validate(req)

    # -- batch prep (one Redis round trip) -------------------------------------------------

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

    async def prepare(self, requests: Sequence[RecRequest], deadline: float | None = None) -> PreparedBatch:
        """The PreparedBatch of validated requests (see ``services/frontend/batch.py``), its
        Redis read bounded by ``deadline`` (time.monotonic(); the latest of the batch's).

        One MGET for the batch; missing users / items get empty bags and the manifest's dense
        defaults. Request overrides win over stored values: a sparse override replaces that
        user context's bag, a dense override sets the value for every sample of its request
        (item-side dense included). Raises UnavailableError naming the feature store when Redis
        cannot be reached, does not answer in time or has lost the store (unless the operator
        chose defaults: then ``feature_defaults`` is set on the batch).
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

        # One round trip: the marker, every unique user key, then every unique item key.
        got = await self.store.read(users, items, deadline)
        stored_users = self.user_layout.decode(got.users or [None] * len(users), got.user_keys or None)
        stored_items = self.item_layout.decode(got.items or [None] * len(items), got.item_keys or None)

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

        user_of_sample = np.repeat(ctx_of_request, counts)
        contexts = scoring_contexts(requests, user_of_sample, sample_offsets)
        self.batches += 1
        self.requests += nreq
        self.item_ids_requested += num_samples
        self.item_ids_unique += len(items)
        self.user_contexts += len(ctx_users)
        return PreparedBatch(
            requests=tuple(requests),
            sample_offsets=sample_offsets,
            user_of_sample=user_of_sample,
            item_of_sample=item_of_sample,
            user_bags=user_bags,
            item_bags=item_bags,
            dense=dense,
            scored=DistinctCandidates.of(sample_offsets, item_of_sample, contexts),
            feature_defaults=got.defaults,
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
            values, lengths, _ = ragged_take(stored.values, stored.lengths, user_of_ctx)
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
        values, lengths, weights = ragged_take(src_values, src_lengths, index, src_weights)
        return Bags(self._to_rows(values, f), lengths, weights)
