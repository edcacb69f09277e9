"""The request mix: deterministic ``RecommendRequest``s drawn from the model's own power law.

``RequestMix(model)`` turns a preset name, a ``Preset``, a ``ModelSpec`` or explicit
``MixSizes`` into a stream of requests; ``mix.request(i)`` is a pure function of ``(seed, i)``,
so every system of a comparison sees exactly the same requests in the same order:

- user: power-law (``services.core.synth.power_law_ids``, alpha 1.1) over the users that have
  stored features (ids ``0 .. users_with_features-1``, hot ids low); a share
  (``cold_user_share``, default 5%) are cold users drawn uniformly from ids without stored
  features (the frontend serves them from defaults);
- candidates: a fixed count (default 100) or uniform in ``(lo, hi)``; item ids power-law over
  the items with features, distinct within one request (a retrieval stage returns each item
  once; hot items still repeat *across* requests, which is what per-batch dedup sees);
- history override: a share of requests (``history_override_share``, default 0) carry a
  request-time ``user_history`` bag (item ids, power law), its length exponential with mean ~23
  capped at the feature's ``max_bag_len`` (the stored histories' distribution, see synth);
- ``top_k`` 10 (capped at the candidate count); ``request_id`` ``b<seed>-<i>``.

Requests are generated a block (``block_size`` requests; by default about 16k candidate ids, so
one block costs a few ms) at a time with numpy, from ``SeedSequence(seed, spawn_key=(block,))``;
the last few blocks are cached. The stream depends on ``(seed, block_size)`` and the
distribution parameters, all of which ``params()`` reports. Cost on the client: ~20 us per request
at 100 candidates (~6 us of it building the protobuf), ~0.3 ms at 1000 (the power law's head
repeats, so 1000 distinct ids take ~2-3x as many draws).

Not thread-safe (the block cache); one event loop owns a mix.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from services._proto.shardrec.v1 import recommend_pb2
from services.core.checkpoint.manifest import ModelSpec
from services.core.synth import PRESETS, SPARSE_FEATURES, Preset, power_law_ids
from services.core.types import FeatureSide, FeatureSource, MappingKind

DEFAULT_ALPHA = 1.1
# Mean of the exponential history length (synth draws stored histories the same way).
HISTORY_MEAN_LEN = 23.0
_BLOCKS_CACHED = 8
# Default block size: about this many candidate ids per block.
_CANDIDATES_PER_BLOCK = 16384


@dataclass(frozen=True)
class MixSizes:
    """Id ranges a mix draws from.

    ``users_with_features``: warm user ids ``0 .. n-1`` (power law). ``cold_users``: ``[lo, hi)``
    for cold user ids (uniform), or None when the model has no valid id without features.
    ``items``: candidate ids ``0 .. items-1`` (power law). ``history_feature``: the user-side
    bag of item ids a request may override (None: no overrides), ``history_max_len`` its cap.
    """

    users_with_features: int
    cold_users: tuple[int, int] | None
    items: int
    history_feature: str | None = "user_history"
    history_max_len: int = 50

    def __post_init__(self) -> None:
        if self.users_with_features < 1 or self.items < 1:
            raise ValueError(f"users_with_features and items must be >= 1: {self}")
        if self.cold_users is not None and not 0 <= self.cold_users[0] < self.cold_users[1]:
            raise ValueError(f"cold_users must be a non-empty [lo, hi) range, got {self.cold_users}")
        if self.history_max_len < 1:
            raise ValueError(f"history_max_len must be >= 1, got {self.history_max_len}")

    @classmethod
    def of(cls, model: str | Preset | ModelSpec | MixSizes) -> MixSizes:
        """Sizes of a demo preset (by name or ``Preset``), or of any ``ModelSpec``."""
        if isinstance(model, MixSizes):
            return model
        if isinstance(model, str):
            if model not in PRESETS:
                raise ValueError(f"unknown preset {model!r}; choose one of {sorted(PRESETS)}")
            model = PRESETS[model]
        if isinstance(model, Preset):
            user_rows = model.rows("users")
            warm = model.users_with_features
            # user_id maps by modulo in the demo model: any id is a valid user.
            cold = (warm, user_rows) if user_rows > warm else (warm, 2 * warm)
            hist = next(f for f in SPARSE_FEATURES if f.name == "user_history")
            return cls(warm, cold, model.items_with_features, hist.name, hist.max_bag_len)
        if isinstance(model, ModelSpec):
            return cls._of_spec(model)
        raise TypeError(f"expected a preset name, Preset, ModelSpec or MixSizes, got {type(model).__name__}")

    @classmethod
    def _of_spec(cls, spec: ModelSpec) -> MixSizes:
        def entity(side: FeatureSide):
            for f in spec.sparse_features:
                if f.side is side and f.source is FeatureSource.ENTITY_ID:
                    return f
            return None

        user, item = entity(FeatureSide.USER), entity(FeatureSide.ITEM)
        if item is None:
            raise ValueError(f"model {spec.name!r} has no item id feature; cannot draw candidates")
        items = spec.table(item.table).rows
        if user is None:
            users, cold = 1_000_000, (1_000_000, 2_000_000)  # the user id is not a feature: any id
        else:
            users = spec.table(user.table).rows
            cold = (users, 2 * users) if user.mapping is MappingKind.MODULO else None
        hist = next(
            (
                f
                for f in spec.sparse_features
                if f.side is FeatureSide.USER
                and f.source is FeatureSource.STORED
                and f.table == item.table
                and f.max_bag_len > 1
            ),
            None,
        )
        return cls(users, cold, items, hist.name if hist else None, hist.max_bag_len if hist else 1)


@dataclass
class _Block:
    users: np.ndarray  # int64 [B]
    cold: np.ndarray  # bool [B]
    cand_offsets: np.ndarray  # int64 [B+1] into cands
    cands: np.ndarray  # int64
    hist_offsets: np.ndarray  # int64 [B+1] into hist (length 0 = no override)
    hist: np.ndarray  # int64


class RequestMix:
    """Deterministic Recommend requests; see the module docstring for the distributions.

    >>> mix = RequestMix("small", candidates=20, seed=1)
    >>> r = mix.request(7)
    >>> len(r.candidate_item_ids), r.top_k, r == mix.request(7)
    (20, 10, True)
    """

    def __init__(
        self,
        model: str | Preset | ModelSpec | MixSizes = "demo",
        *,
        candidates: int | tuple[int, int] = 100,
        top_k: int = 10,
        seed: int = 0,
        cold_user_share: float = 0.05,
        history_override_share: float = 0.0,
        alpha: float = DEFAULT_ALPHA,
        unique_candidates: bool = True,
        model_name: str = "",
        block_size: int | None = None,
    ) -> None:
        self.sizes = MixSizes.of(model)
        self._preset = model if isinstance(model, str) else getattr(model, "name", None)
        if isinstance(candidates, int):
            lo = hi = candidates
        else:
            lo, hi = (int(x) for x in candidates)
        if not 1 <= lo <= hi:
            raise ValueError(f"candidates must be >= 1 (or a (lo, hi) range with 1 <= lo <= hi), got {candidates}")
        if unique_candidates and hi > self.sizes.items:
            raise ValueError(f"{hi} distinct candidates asked, but the model has only {self.sizes.items} items")
        for name, share in (("cold_user_share", cold_user_share), ("history_override_share", history_override_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if cold_user_share > 0 and self.sizes.cold_users is None:
            raise ValueError("this model has no user id without stored features; set cold_user_share=0")
        if history_override_share > 0 and self.sizes.history_feature is None:
            raise ValueError("this model has no user history feature to override; set history_override_share=0")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if block_size is None:  # a block costs ~a few ms of numpy, whatever the candidate count
            block_size = max(16, min(256, _CANDIDATES_PER_BLOCK // hi))
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.candidates = (lo, hi)
        self.top_k = top_k
        self.seed = seed
        self.cold_user_share = float(cold_user_share)
        self.history_override_share = float(history_override_share)
        self.alpha = float(alpha)
        self.unique_candidates = unique_candidates
        self.model_name = model_name
        self.block_size = block_size
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    # -- public ----------------------------------------------------------------------------

    def request(self, i: int) -> recommend_pb2.RecommendRequest:
        """Request number ``i`` (``i >= 0``): the same for the same seed and parameters."""
        if i < 0:
            raise IndexError(f"request index must be >= 0, got {i}")
        b, j = divmod(i, self.block_size)
        blk = self._block(b)
        c0, c1 = int(blk.cand_offsets[j]), int(blk.cand_offsets[j + 1])
        req = recommend_pb2.RecommendRequest(
            request_id=f"b{self.seed}-{i}",
            model=self.model_name,
            user_id=int(blk.users[j]),
            candidate_item_ids=blk.cands[c0:c1].tolist(),
            top_k=min(self.top_k, c1 - c0),
        )
        h0, h1 = int(blk.hist_offsets[j]), int(blk.hist_offsets[j + 1])
        if h1 > h0:
            req.sparse_features[self.sizes.history_feature].values.extend(blk.hist[h0:h1].tolist())
        return req

    __call__ = request

    def __iter__(self) -> Iterator[recommend_pb2.RecommendRequest]:
        return (self.request(i) for i in itertools.count())

    def is_cold(self, i: int) -> bool:
        """Whether request ``i``'s user is a cold user (no stored features)."""
        b, j = divmod(i, self.block_size)
        return bool(self._block(b).cold[j])

    def params(self) -> dict:
        """The parameters that define the mix (for the result JSON's ``workload``)."""
        lo, hi = self.candidates
        return {
            "preset": self._preset,
            "sizes": {**asdict(self.sizes), "cold_users": list(self.sizes.cold_users) if self.sizes.cold_users else None},
            "candidates": lo if lo == hi else [lo, hi],
            "unique_candidates": self.unique_candidates,
            "top_k": self.top_k,
            "seed": self.seed,
            "cold_user_share": self.cold_user_share,
            "history_override_share": self.history_override_share,
            "alpha": self.alpha,
            "model": self.model_name,
            "block_size": self.block_size,
        }

    # -- generation ------------------------------------------------------------------------

    def _block(self, b: int) -> _Block:
        blk = self._blocks.get(b)
        if blk is not None:
            self._blocks.move_to_end(b)
            return blk
        blk = self._generate(b)
        self._blocks[b] = blk
        while len(self._blocks) > _BLOCKS_CACHED:
            self._blocks.popitem(last=False)
        return blk

    def _generate(self, b: int) -> _Block:
        n, s = self.block_size, self.sizes
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(b,)))
        # Draw order is fixed; never reorder, or every request changes.
        users = power_law_ids(rng, n, s.users_with_features, self.alpha)
        cold = rng.random(n) < self.cold_user_share
        if cold.any():
            lo, hi = s.cold_users  # type: ignore[misc]
            users[cold] = rng.integers(lo, hi, size=int(cold.sum()))
        lo, hi = self.candidates
        counts = np.full(n, lo, dtype=np.int64) if lo == hi else rng.integers(lo, hi + 1, size=n)
        if self.unique_candidates:
            cands = _distinct_power_law(rng, counts, s.items, self.alpha)
        else:
            cands = power_law_ids(rng, int(counts.sum()), s.items, self.alpha)
        has_hist = rng.random(n) < self.history_override_share
        hist_len = np.zeros(n, dtype=np.int64)
        if has_hist.any():
            k = int(has_hist.sum())
            lens = np.minimum(rng.exponential(HISTORY_MEAN_LEN, size=k).astype(np.int64), s.history_max_len)
            hist_len[has_hist] = np.maximum(lens, 1)
        hist = power_law_ids(rng, int(hist_len.sum()), s.items, self.alpha) if hist_len.any() else np.empty(0, np.int64)
        return _Block(
            users=users,
            cold=cold,
            cand_offsets=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
            cands=cands,
            hist_offsets=np.concatenate(([0], np.cumsum(hist_len))).astype(np.int64),
            hist=hist,
        )


def _distinct_power_law(rng: np.random.Generator, counts: np.ndarray, rows: int, alpha: float) -> np.ndarray:
    """For each request ``r``, ``counts[r]`` distinct power-law ids in first-draw order,
    concatenated. Vectorised over the block: oversample, drop repeats, keep the first ``k``;
    rows still short draw again, 3x wider (the head of the power law repeats a lot: 1000
    draws over 500k items give ~520 distinct ids); the last resort fills from unused ids."""
    n = len(counts)
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n
    todo = np.arange(n)
    factor = 1.5
    for _ in range(3):
        c = counts[todo]
        draws, keep = _first_occurrences(rng, c, rows, alpha, int(factor * c.max() + 32))
        done = keep.sum(axis=1) >= c
        if todo.size == n and done.all():
            return draws[keep]  # row-major: each row's kept ids in draw order
        for r in np.flatnonzero(done).tolist():
            parts[int(todo[r])] = draws[r][keep[r]]
        todo = todo[~done]
        if todo.size == 0:
            return np.concatenate(parts)
        factor *= 3
    for r in todo.tolist():
        parts[r] = _top_up(rng, np.empty(0, np.int64), int(counts[r]), rows, alpha)
    return np.concatenate(parts)


def _first_occurrences(
    rng: np.random.Generator, counts: np.ndarray, rows: int, alpha: float, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """``width`` draws per row and the mask of each row's first ``counts[r]`` distinct ids."""
    n = len(counts)
    draws = power_law_ids(rng, n * width, rows, alpha).reshape(n, width)
    # Sort (id, column) pairs as one int64 key: equal ids end up adjacent, earliest column first.
    col = np.arange(width, dtype=np.int64)
    srt, order = np.divmod(np.sort(draws * width + col, axis=1), width)
    dup_sorted = np.zeros(srt.shape, dtype=bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # the first occurrence is kept
    first = np.ones_like(dup_sorted)
    np.put_along_axis(first, order, ~dup_sorted, axis=1)
    keep = first & (np.cumsum(first, axis=1) <= counts[:, None])
    return draws, keep


def _top_up(rng: np.random.Generator, have: np.ndarray, k: int, rows: int, alpha: float) -> np.ndarray:
    seen = dict.fromkeys(have.tolist())
    for _ in range(4):
        for x in power_law_ids(rng, 2 * (k - len(seen)) + 32, rows, alpha).tolist():
            if len(seen) >= k:
                break
            seen.setdefault(x)
        if len(seen) >= k:
            return np.fromiter(seen, dtype=np.int64, count=k)
    unused = np.setdiff1d(np.arange(rows, dtype=np.int64), np.fromiter(seen, dtype=np.int64))
    fill = rng.permutation(unused)[: k - len(seen)]
    return np.concatenate((np.fromiter(seen, dtype=np.int64), fill))
