"""The repeated-candidate rule, pure (docs/features.md, "Repeated candidates"): each distinct
(scoring context, item) of a batch goes through the forward pass once (a request, or a user
context shared by requests that override no dense values) and its score is copied to every
position, so identical inputs get bit-identical scores and ties go to the earlier position.

The scorer here is a numpy stand-in whose last bit depends on a row's place in the batch, as
real kernels' may: without the rule, the later copy of a repeated item could rank first."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services._proto.shardrec.v1 import recommend_pb2 as pb
from services.core import synth
from services.frontend.batch import DistinctCandidates
from services.frontend.features import FeaturePrep
from services.frontend.lookup import LookupResult
from services.frontend.scoring import score_and_rank
from services.frontend.validate import FeatureLimits

SPEC = synth.model_spec("small")


class RowDependentScorer:
    """Scores from the inputs, plus one ulp on every odd row of the batch; records batch sizes."""

    device = "cpu"

    def __init__(self) -> None:
        self.batch_rows: list[int] = []

    async def score(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        self.batch_rows.append(len(dense))
        base = (1 / (1 + np.exp(-(sparse.sum(axis=(1, 2)) + dense.sum(axis=1))))).astype(np.float32)
        odd = np.arange(len(base)) % 2 == 1
        return np.where(odd, np.nextafter(base, np.float32(2)), base).astype(np.float32)


def score(requests: list[pb.RecommendRequest], keep: list[int] | None = None, subset: list[int] | None = None, best: int | None = None):
    """Prepare the requests (no Redis: stored features default), pool every bag to a vector of
    its own (item ``best``'s high, so it ranks first), score and rank; returns the
    recommendations, the scorer and the batch."""

    async def main():
        prep = FeaturePrep(SPEC, None, "", FeatureLimits())
        batch = await prep.prepare([prep.validate(r) for r in requests])
        if subset is not None:
            batch = batch.subset(subset)
        rng = np.random.default_rng(0)
        pooled = {}
        for f in SPEC.sparse_features:
            bags = (batch.user_bags if f.side.value == "user" else batch.item_bags)[f.name]
            pooled[f.name] = rng.normal(0, 0.1, (len(bags.lengths), SPEC.dense_arch.embedding_dim)).astype(np.float32)
            if best is not None and f.name == "item_id":
                pooled[f.name][int(np.searchsorted(bags.rows, best))] += 1.0  # items are unique and sorted
        scorer = RowDependentScorer()
        recs = await score_and_rank(scorer, SPEC, batch, LookupResult(pooled, 1, 1), {f: None for f in pooled}, keep=keep)
        return recs, scorer, batch

    return asyncio.run(main())


def req(user: int, candidates: list[int], top_k: int | None = None, rid: str = "r") -> pb.RecommendRequest:
    return pb.RecommendRequest(request_id=rid, user_id=user, candidate_item_ids=candidates, top_k=top_k or len(candidates))


def scores_by_position(rec) -> np.ndarray:
    out = np.empty(len(rec.positions), dtype=np.float32)
    out[rec.positions] = rec.scores
    return out


def test_distinct_candidates_points_every_sample_at_the_first_of_its_pair():
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 12, 9)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    items = rng.integers(0, 6, int(offsets[-1]))
    d = DistinctCandidates.of(offsets, items)
    request_of = np.repeat(np.arange(len(counts)), counts)
    pairs = set(zip(request_of.tolist(), items.tolist()))
    assert len(d.samples) == len(pairs) and not d.all_distinct
    # every sample's scored sample is the first sample of the same (request, item)
    first = {}
    for s, pair in enumerate(zip(request_of.tolist(), items.tolist())):
        first.setdefault(pair, s)
        assert d.samples[d.of_sample[s]] == first[pair]
    # grouped by request
    for r in range(len(counts)):
        assert set(request_of[d.samples[d.offsets[r] : d.offsets[r + 1]]].tolist()) <= {r}
        assert (d.of_sample[offsets[r] : offsets[r + 1]] >= d.offsets[r]).all()
        assert (d.of_sample[offsets[r] : offsets[r + 1]] < d.offsets[r + 1]).all()
    # the same item in two requests is two pairs; nothing repeated: the identity, in order
    same = DistinctCandidates.of(np.array([0, 2, 4]), np.array([0, 1, 1, 0]))
    assert same.all_distinct and same.samples.tolist() == [0, 1, 2, 3] and same.of_sample.tolist() == [0, 1, 2, 3]


def test_a_repeated_candidate_gets_one_score_and_its_earlier_position_ranks_first():
    # The request: user 42, candidates [0, 1, 2, 3, 4, 2], top_k 1 returned position 5.
    (rec,), scorer, _ = score([req(42, [0, 1, 2, 3, 4, 2], top_k=1)], best=2)
    assert rec.positions.tolist() == [2] and rec.item_ids.tolist() == [2]
    assert scorer.batch_rows == [5]  # the forward pass saw each distinct candidate once
    (full,), _, _ = score([req(42, [0, 1, 2, 3, 4, 2])], best=2)
    s = scores_by_position(full)
    assert s[2].tobytes() == s[5].tobytes()  # bit-identical
    assert full.positions.tolist()[:2] == [2, 5]


def test_ties_go_to_the_earlier_position_whatever_the_candidate_order():
    for candidates in ([9, 9, 9], [3, 9, 3, 9, 3], [7, 1, 7]):
        (rec,), _, _ = score([req(5, candidates)])
        s = scores_by_position(rec)
        ranked = rec.positions.tolist()
        for a in range(len(candidates)):
            for b in range(a + 1, len(candidates)):
                if candidates[a] == candidates[b]:
                    assert s[a] == s[b] and ranked.index(a) < ranked.index(b), (candidates, ranked)


def test_every_request_of_a_batch_follows_the_rule_with_keep_and_subset():
    requests = [req(1, [4, 4, 8], rid="a"), req(2, [8, 3, 8, 3], rid="b"), req(1, [4, 5], rid="c")]
    recs, scorer, batch = score(requests)
    assert scorer.batch_rows == [2 + 2 + 1]  # "a" and "c" are user 1's: item 4 is scored once
    assert batch.num_samples == 9 and len(batch.scored.samples) == 5
    assert scores_by_position(recs[0])[0].tobytes() == scores_by_position(recs[2])[0].tobytes()
    for r, rec in zip(requests, recs):
        s, ranked, c = scores_by_position(rec), rec.positions.tolist(), list(r.candidate_item_ids)
        for a in range(len(c)):
            for b in range(a + 1, len(c)):
                if c[a] == c[b]:
                    assert s[a] == s[b] and ranked.index(a) < ranked.index(b), (r.request_id, ranked)
    # keep: only request "b"'s two distinct candidates reach the forward pass
    (rec_b,), scorer, _ = score(requests, keep=[1])
    assert scorer.batch_rows == [2] and rec_b.request_id == "b"
    assert sorted(rec_b.positions.tolist()) == [0, 1, 2, 3]
    # a subset (dead requests dropped) keeps the rule
    (rec_a, rec_c), scorer, sub = score(requests, subset=[0, 2])
    assert scorer.batch_rows == [2 + 1] and sub.num_samples == 5
    assert scores_by_position(rec_a)[0] == scores_by_position(rec_a)[1]
    ranked = rec_a.positions.tolist()
    assert ranked.index(0) < ranked.index(1) and rec_c.request_id == "c"


def test_one_user_context_across_requests_is_scored_once_unless_dense_values_differ():
    same_a, same_b = req(7, [1, 2, 3], rid="a"), req(7, [3, 2, 9], rid="b")
    dense = req(7, [1, 2], rid="dense")
    dense.dense_features["user_activity"] = 0.5
    sparse = req(7, [1, 3], rid="sparse")
    sparse.sparse_features["user_history"].values.extend([4, 5])
    other = req(8, [1, 2], rid="other")
    recs, scorer, batch = score([same_a, same_b, dense, sparse, other])
    # a and b share user 7's context: {1, 2, 3, 9}; dense, sparse and other score their own
    assert scorer.batch_rows == [4 + 2 + 2 + 2]
    a, b = scores_by_position(recs[0]), scores_by_position(recs[1])
    assert a[1].tobytes() == b[1].tobytes() and a[2].tobytes() == b[0].tobytes()
    # keep one request whose pairs the batch first met in another: its own three rows only
    (rec_b,), scorer, _ = score([same_a, same_b, dense, sparse, other], keep=[1])
    assert scorer.batch_rows == [3] and rec_b.request_id == "b"
    np.testing.assert_allclose(scores_by_position(rec_b), b, rtol=1e-6)  # the stand-in's last bit is the row's


def test_distinct_candidates_across_requests_of_one_context():
    d = DistinctCandidates.of(np.array([0, 3, 5, 6]), np.array([7, 2, 7, 2, 4, 7]), np.array([0, 0, 1]))
    # the pairs (0, 2), (0, 7), (0, 4) first met in request 0 or 1; (1, 7) in request 2
    assert d.samples.tolist() == [1, 0, 4, 5] and d.offsets.tolist() == [0, 2, 3, 4]
    assert d.of_sample.tolist() == [1, 0, 1, 0, 2, 3]
    samples, positions = d.of_requests(np.array([0, 3, 5, 6]), [1, 2])
    assert samples.tolist() == [1, 4, 5] and [p.tolist() for p in positions] == [[0, 1], [2]]


@pytest.mark.parametrize("candidates", [[0, 1, 2, 3], [17]])
def test_without_repeats_the_forward_pass_sees_every_sample_in_order(candidates):
    (rec,), scorer, batch = score([req(3, candidates)])
    assert batch.scored.all_distinct and scorer.batch_rows == [len(candidates)]
    assert sorted(rec.positions.tolist()) == list(range(len(candidates)))
