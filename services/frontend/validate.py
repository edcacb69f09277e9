"""Request validation: pure and synchronous, BEFORE batching, so a bad request is refused on its
own (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field and value) and never joins a batch
nor reaches a shard. The rules are in docs/features.md ("Validation").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services._proto.shardrec.v1 import recommend_pb2
from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import InvalidArgumentError, ResourceExhaustedError
from services.core.features import FeatureLayout, unmappable
from services.core.types import FeatureSide, FeatureSource, PoolingType, SparseFeatureSpec
from services.frontend.batch import RecRequest


@dataclass(frozen=True)
class FeatureLimits:
    """Caps applied by ``RequestValidator.validate``.

    - ``max_candidates``: more candidates in one request is RESOURCE_EXHAUSTED (split it).
    - ``default_top_k``: the top_k of a request that leaves it unset (0). 0 (the default)
      means there is none and such a request is INVALID_ARGUMENT; N > 0 means
      ``min(N, number of candidates)``.
    - ``max_abs_dense`` / ``max_abs_weight``: request-time dense values and per-value weights
      must be finite and at most this in magnitude (a finite but huge value overflows the
      model into NaN scores).
    """

    max_candidates: int = 1000
    default_top_k: int = 0
    max_abs_dense: float = 1e6
    max_abs_weight: float = 1e6

    def __post_init__(self) -> None:
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.default_top_k < 0:
            raise ValueError(f"default_top_k must be >= 0, got {self.default_top_k}")
        if not (self.max_abs_dense > 0 and self.max_abs_weight > 0):
            raise ValueError(f"max_abs_dense and max_abs_weight must be > 0, got {self.max_abs_dense}, {self.max_abs_weight}")


# A caller's request id is used in logs and answers: printable ASCII, at most this long.
MAX_REQUEST_ID_CHARS = 128
_PRINTABLE = frozenset(range(0x20, 0x7F))


def clean_request_id(raw: str) -> str | None:
    """``raw`` when it is a usable request id (1..128 printable ASCII characters), else None
    (the caller's id is then replaced by a generated one)."""
    if not 0 < len(raw) <= MAX_REQUEST_ID_CHARS:
        return None
    return raw if all(ord(c) in _PRINTABLE for c in raw) else None


class RequestValidator:
    """Checks Recommend requests against one model and the limits. Stateless after
    construction: ``validate`` may be called from any thread."""

    def __init__(self, spec: ModelSpec, limits: FeatureLimits) -> None:
        self.spec = spec
        self.limits = limits
        self._sparse = {f.name: f for f in spec.sparse_features}
        self._dense = {d.name: d for d in spec.dense_features}
        self._rows = {f.name: spec.table(f.table).rows for f in spec.sparse_features}
        self._user_entity = _entity_feature(spec, FeatureSide.USER)
        self._item_entity = _entity_feature(spec, FeatureSide.ITEM)
        self._overridable = tuple(f.name for f in FeatureLayout(spec, FeatureSide.USER).sparse)

    def _check_rows(self, values: np.ndarray, f: SparseFeatureSpec, field: str, indexed: bool = True) -> None:
        rows = self._rows[f.name]
        bad = unmappable(values, f.mapping, rows)
        if bad.size:
            i = int(bad[0])
            where = f"{field}[{i}]" if indexed else field
            raise InvalidArgumentError(
                f"{where} = {int(values[i])} is not a row of table {f.table!r}: feature {f.name!r} maps ids "
                f"by identity, so they must be in [0, {rows})",
                field=where,
            )

    def validate(self, req: recommend_pb2.RecommendRequest) -> RecRequest:
        """Check one request against the model and the limits; return it as a RecRequest.

        Raises InvalidArgumentError (or ResourceExhaustedError for too many candidates)
        naming the field and the value. Raw ids are kept; rows are mapped in ``FeaturePrep.prepare``.
        """
        spec = self.spec
        if req.model and req.model != spec.name:
            raise InvalidArgumentError(f"unknown model {req.model!r} (serving {spec.name!r})", field="model")
        n = len(req.candidate_item_ids)
        if n == 0:
            raise InvalidArgumentError("candidate_item_ids is empty: give at least one candidate item id", field="candidate_item_ids")
        if n > self.limits.max_candidates:
            raise ResourceExhaustedError(
                f"candidate_item_ids has {n} ids, more than max_candidates {self.limits.max_candidates}; "
                f"split the request",
                field="candidate_item_ids",
            )
        top_k = req.top_k
        if top_k == 0 and self.limits.default_top_k > 0:
            top_k = min(self.limits.default_top_k, n)
        if top_k <= 0 or top_k > n:
            raise InvalidArgumentError(f"top_k = {req.top_k} must be between 1 and the number of candidates ({n})", field="top_k")
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
                    f"(known: {', '.join(self._dense)})",
                    field=f"dense_features[{name!r}]",
                )
            if not math.isfinite(value) or abs(value) > self.limits.max_abs_dense:
                raise InvalidArgumentError(
                    f"dense_features[{name!r}] = {value}: must be a finite number of magnitude at most {self.limits.max_abs_dense:g}",
                    field=f"dense_features[{name!r}]",
                )
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
                    f"in a request ({', '.join(self._overridable) or 'none'})",
                    field=field,
                )
            m = len(sf.values)
            if m > f.max_bag_len:
                raise InvalidArgumentError(f"{field}.values has {m} values, more than max_bag_len {f.max_bag_len}", field=f"{field}.values")
            values = np.fromiter(sf.values, dtype=np.int64, count=m)
            weights: np.ndarray | None = None
            if len(sf.weights):
                if len(sf.weights) != m:
                    raise InvalidArgumentError(
                        f"{field}.weights has {len(sf.weights)} weights for {m} values; give one weight per value or none",
                        field=f"{field}.weights",
                    )
                if f.pooling is not PoolingType.SUM:
                    raise InvalidArgumentError(
                        f"{field}.weights: feature {name!r} pools by {f.pooling.value}; per-value weights need sum pooling",
                        field=f"{field}.weights",
                    )
                weights = np.fromiter(sf.weights, dtype=np.float32, count=m)
                bad = np.flatnonzero(~(np.abs(weights) <= self.limits.max_abs_weight))  # NaN fails too
                if bad.size:
                    i = int(bad[0])
                    raise InvalidArgumentError(
                        f"{field}.weights[{i}] = {weights[i]}: weights must be finite, of magnitude at most {self.limits.max_abs_weight:g}",
                        field=f"{field}.weights[{i}]",
                    )
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


def _entity_feature(spec: ModelSpec, side: FeatureSide) -> SparseFeatureSpec | None:
    for f in spec.features(side):
        if f.source is FeatureSource.ENTITY_ID:
            return f
    return None
