"""The data of the batch path: a validated request (``RecRequest``) and its place in the
batcher (``Pending``), what feature prep hands the lookup and scoring stages (the bags of a
micro-batch, deduplicated by entity), and a request's answer (``Recommendation``).

A ``PreparedBatch`` of R requests with C_r candidates each (S = sum C_r samples)::

    requests            R validated Recommend calls
    sample_offsets      int64 [R+1]: request r owns samples sample_offsets[r]:sample_offsets[r+1]
    user_of_sample      int32 [S]: which of the U user contexts a sample uses
    item_of_sample      int32 [S]: which of the I unique items a sample scores
    user_bags[f]        Bags with U bags, for every user-side sparse feature f
    item_bags[f]        Bags with I bags, for every item-side sparse feature f
    dense               float32 [S, num_dense], manifest order, request overrides applied
    scored              the D <= S samples the forward pass sees (``DistinctCandidates``): each
                        distinct (user context, item) once, across the batch's requests
    feature_defaults    True when the feature store could not be read and every stored feature
                        took its default (only where the operator chose that over failing)

A user context is a user id without request-time sparse overrides (shared by every request of
that user in the batch) or one request's own overridden features: user-side bags are looked up
once per request at most, never once per candidate. Items are unique per batch. A candidate
repeated within a request, or asked for by two requests of one user context (neither
overriding dense values), has identical inputs at every position, so it is scored once and its
score copied to each position: bit-identical scores, ties then broken by position (top-k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.core.types import Version


@dataclass(frozen=True)
class RecRequest:
    """One validated Recommend call (raw ids; rows are mapped in prep)."""

    request_id: str
    user_id: int
    candidates: np.ndarray  # int64 [C], raw item ids
    top_k: int
    dense_overrides: dict[str, float] = field(default_factory=dict)
    # user-side sparse feature name -> (raw values int64 [n], weights float32 [n] | None)
    sparse_overrides: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)


@dataclass(eq=False)
class Pending:
    """A request waiting in the batcher, with its absolute deadline (time.monotonic()).
    ``abandoned`` is set (on the event loop) when its caller stopped waiting: cancelled or out
    of time. Every stage drops abandoned and expired requests before it spends anything on
    them."""

    request: RecRequest
    deadline: float
    abandoned: bool = False
    arrived: float = 0.0  # time.monotonic() of its arrival (its queue wait is timed from it)
    span: object = None  # its request span (opentelemetry), linked from its batch's span

    def dead(self, now: float) -> bool:
        return self.abandoned or self.deadline <= now


@dataclass(frozen=True)
class Recommendation:
    """One request's answer: its top-k, computed at one version with one shard map."""

    request_id: str
    positions: np.ndarray  # int64 [k], candidate positions, best first
    item_ids: np.ndarray  # int64 [k]
    scores: np.ndarray  # float32 [k]
    version: Version
    shard_map_version: int
    # recommend_pb2.DegradedReason values of a cheaper mode that applied (empty: a full answer)
    degraded_reasons: tuple[int, ...] = ()


@dataclass(frozen=True)
class Bags:
    """One bag per entity of one sparse feature, values already mapped to table rows."""

    rows: np.ndarray  # int64 [n]
    lengths: np.ndarray  # int32 [entities]
    weights: np.ndarray | None = None  # float32 [n]


@dataclass(frozen=True)
class DistinctCandidates:
    """Each distinct (scoring context, item) of a batch once: what the forward pass scores.

    A scoring context is what, beside the item, decides a sample's inputs: by default the
    request; ``PreparedBatch`` passes the user context of a request without dense overrides
    (shared by every such request of that user in the batch) or the request itself when it
    overrides dense values. So a candidate repeated within a request, or asked for by two
    requests of one user in a batch, is scored once.

    ``samples`` int64 [D]: the first sample of each distinct pair, grouped by the first request
    that has it (request r first has ``samples[offsets[r]:offsets[r+1]]``); ``of_sample`` int64
    [S]: for every sample, the index into ``samples`` whose score is its score.
    ``all_distinct`` when D == S (then ``samples`` is ``arange(S)``, in sample order, and
    ``of_sample`` the same).
    """

    samples: np.ndarray
    offsets: np.ndarray
    of_sample: np.ndarray

    @property
    def all_distinct(self) -> bool:
        return len(self.samples) == len(self.of_sample)

    @classmethod
    def of(
        cls, sample_offsets: np.ndarray, item_of_sample: np.ndarray, context_of_request: np.ndarray | None = None
    ) -> "DistinctCandidates":
        """The distinct (context, item) pairs of samples ``sample_offsets`` x ``item_of_sample``
        (``context_of_request`` int [R] >= 0; None: each request its own context).

        >>> d = DistinctCandidates.of(np.array([0, 3, 5]), np.array([7, 2, 7, 2, 2]))
        >>> d.samples.tolist(), d.offsets.tolist(), d.of_sample.tolist()
        ([1, 0, 3], [0, 2, 3], [1, 0, 1, 2, 2])
        >>> d = DistinctCandidates.of(np.array([0, 3, 5]), np.array([7, 2, 7, 2, 2]), np.array([0, 0]))
        >>> d.samples.tolist(), d.offsets.tolist(), d.of_sample.tolist()
        ([1, 0], [0, 2, 2], [1, 0, 1, 0, 0])
        """
        num_samples = len(item_of_sample)
        counts = np.diff(sample_offsets)
        request_of_sample = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        context = request_of_sample
        if context_of_request is not None:
            context = np.repeat(np.asarray(context_of_request, dtype=np.int64), counts)
        key = context * (int(item_of_sample.max(initial=0)) + 1) + item_of_sample
        unique, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        if len(unique) == num_samples:
            identity = np.arange(num_samples, dtype=np.int64)
            return cls(identity, np.asarray(sample_offsets, dtype=np.int64), identity)
        inverse = inverse.reshape(-1)
        owner = request_of_sample[first]
        order = np.argsort(owner, kind="stable")  # grouped by the first request (identity per request)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=len(counts)), out=offsets[1:])
        return cls(first[order].astype(np.int64), offsets, rank[inverse].astype(np.int64))

    def of_requests(self, sample_offsets: np.ndarray, keep: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The distinct samples the requests ``keep`` (indices) need, in ``samples`` order, and
        for each of them, the index of each of its positions' sample in that selection."""
        parts = [self.of_sample[int(sample_offsets[r]) : int(sample_offsets[r + 1])] for r in keep]
        used, at = np.unique(np.concatenate(parts), return_inverse=True)
        bounds = np.cumsum([0] + [len(p) for p in parts])
        at = at.reshape(-1)
        return self.samples[used], [at[bounds[i] : bounds[i + 1]] for i in range(len(keep))]


def scoring_contexts(requests: Sequence[RecRequest], user_of_sample: np.ndarray, sample_offsets: np.ndarray) -> np.ndarray:
    """int64 [R]: the scoring context of each request (``DistinctCandidates``): the user context
    of its samples, or one of its own when it overrides dense values."""
    first = np.minimum(sample_offsets[:-1], max(0, len(user_of_sample) - 1))
    ctx = user_of_sample[first].astype(np.int64) if len(user_of_sample) else np.zeros(len(requests), dtype=np.int64)
    own = [i for i, r in enumerate(requests) if r.dense_overrides]
    if own:
        ctx[own] = int(ctx.max(initial=-1)) + 1 + np.arange(len(own))
    return ctx


@dataclass(frozen=True)
class PreparedBatch:
    requests: tuple[RecRequest, ...]
    sample_offsets: np.ndarray
    user_of_sample: np.ndarray
    item_of_sample: np.ndarray
    user_bags: dict[str, Bags]
    item_bags: dict[str, Bags]
    dense: np.ndarray
    scored: DistinctCandidates
    feature_defaults: bool = False

    @property
    def num_samples(self) -> int:
        return int(self.sample_offsets[-1])

    def subset(self, keep: list[int]) -> "PreparedBatch":
        """The batch of requests ``keep`` (indices, in order) alone: their samples, and only the
        user contexts and items they use (so a dropped request's bags are never looked up)."""
        counts = np.diff(self.sample_offsets)[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        samples = np.concatenate([np.arange(self.sample_offsets[r], self.sample_offsets[r + 1]) for r in keep])
        users, user_of_sample = np.unique(self.user_of_sample[samples], return_inverse=True)
        items, item_of_sample = np.unique(self.item_of_sample[samples], return_inverse=True)

        def take(bags: dict[str, Bags], index: np.ndarray) -> dict[str, Bags]:
            out = {}
            for name, b in bags.items():
                rows, lengths, weights = ragged_take(b.rows, b.lengths, index, b.weights)
                out[name] = Bags(rows, lengths, weights)
            return out

        item_of_sample = item_of_sample.reshape(-1).astype(np.int32)
        user_of_sample = user_of_sample.reshape(-1).astype(np.int32)
        requests = tuple(self.requests[r] for r in keep)
        return PreparedBatch(
            requests=requests,
            sample_offsets=offsets,
            user_of_sample=user_of_sample,
            item_of_sample=item_of_sample,
            user_bags=take(self.user_bags, users),
            item_bags=take(self.item_bags, items),
            dense=self.dense[samples],
            scored=DistinctCandidates.of(offsets, item_of_sample, scoring_contexts(requests, user_of_sample, offsets)),
            feature_defaults=self.feature_defaults,
        )


def ragged_take(
    values: np.ndarray, lengths: np.ndarray, index: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Bags ``index`` of a CSR (``values``, ``lengths``), in that order, as a new CSR.

    >>> ragged_take(np.array([5, 6, 7]), np.array([2, 1]), np.array([1, 0, 1]))[:2]
    (array([7, 5, 6, 7]), array([1, 2, 1], dtype=int32))
    """
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    out_lengths = lengths[index].astype(np.int32)
    total = int(out_lengths.sum())
    out_starts = np.cumsum(out_lengths, dtype=np.int64) - out_lengths
    pos = np.arange(total, dtype=np.int64) + np.repeat(starts[index] - out_starts, out_lengths)
    return values[pos], out_lengths, (None if weights is None else weights[pos])


# Bags longer than this are not compared for repeats (long history bags almost never repeat).
DEDUP_MAX_BAG_LEN = 8


def unique_bags(bags: Bags) -> tuple[Bags, np.ndarray | None]:
    """Identical bags (same rows in the same order, unweighted) pooled once per batch.

    Returns the unique bags and, for every original bag, the index of its unique twin; the
    inverse is None when nothing repeats (or the feature is weighted or has long bags), and the
    bags are returned as they are. Vectorized: bags are padded to a [B, max_len] matrix and
    compared with ``np.unique(axis=0)``.
    """
    lengths = bags.lengths
    if bags.weights is not None or len(lengths) < 2:
        return bags, None
    max_len = int(lengths.max())
    if max_len > DEDUP_MAX_BAG_LEN:
        return bags, None
    if max_len == 0:
        return Bags(bags.rows[:0], lengths[:1]), np.zeros(len(lengths), dtype=np.int64)
    if max_len == 1 and int(lengths.min()) == 1:
        uniq, inverse = np.unique(bags.rows, return_inverse=True)
        if len(uniq) == len(lengths):
            return bags, None
        return Bags(uniq.astype(np.int64), np.ones(len(uniq), dtype=np.int32)), inverse.ravel()
    mat = np.full((len(lengths), max_len), -1, dtype=np.int64)  # rows are >= 0: -1 pads
    mat[np.arange(max_len)[None, :] < lengths[:, None]] = bags.rows
    _, first, inverse = np.unique(mat, axis=0, return_index=True, return_inverse=True)
    if len(first) == len(lengths):
        return bags, None
    kept = mat[first]
    return Bags(kept[kept >= 0], lengths[first]), inverse.ravel()
