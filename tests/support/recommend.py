"""Recommend requests for tests and the check of an answer against the reference path
(``core.reference.ReferenceRecommender``): scores within rtol 1e-5 / atol 1e-6, the reference's
ranking up to swaps within that tolerance, ties by candidate position."""

from __future__ import annotations

import numpy as np

from services._proto.shardrec.v1 import recommend_pb2
from services.core.reference import ReferenceRecommender
from services.core.synth import power_law_ids
from services.ranker.topk import top_k

RTOL, ATOL = 1e-5, 1e-6


def random_requests(n: int, seed: int) -> list[recommend_pb2.RecommendRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        candidates = power_law_ids(rng, int(rng.integers(1, 120)), 5000)
        req = recommend_pb2.RecommendRequest(
            request_id=f"r{seed}-{i}",
            user_id=int(power_law_ids(rng, 1, 2600)[0]),  # some users have no stored features
            candidate_item_ids=candidates.tolist(),
            top_k=int(rng.integers(1, len(candidates) + 1)),
        )
        if i % 5 == 0:
            req.dense_features["user_activity"] = float(rng.normal())
            req.dense_features["item_age"] = float(rng.random())
        if i % 7 == 0:
            req.sparse_features["user_history"].values.extend(power_law_ids(rng, int(rng.integers(0, 50)), 5000).tolist())
        if i % 11 == 0:
            req.sparse_features["user_country"].values.append(int(rng.integers(0, 20)))
        out.append(req)
    return out


def check_response(reference: ReferenceRecommender, req, resp) -> None:
    overrides = {name: (list(f.values), list(f.weights) or None) for name, f in req.sparse_features.items()}
    want = reference.scores(req.user_id, list(req.candidate_item_ids), dict(req.dense_features), overrides)
    positions = np.array([it.position for it in resp.items])
    got = np.array([it.score for it in resp.items], dtype=np.float32)
    assert len(resp.items) == req.top_k, req.request_id
    assert [it.item_id for it in resp.items] == [req.candidate_item_ids[p] for p in positions]
    np.testing.assert_allclose(got, want[positions], rtol=RTOL, atol=ATOL, err_msg=req.request_id)
    # the ranking equals the reference's except swaps of scores within the tolerance
    ref_order = top_k(want, req.top_k)
    np.testing.assert_allclose(want[positions], want[ref_order], rtol=RTOL, atol=ATOL, err_msg=f"{req.request_id}: ranking")
    # sorted by score descending, ties by candidate position
    assert all((got[i] > got[i + 1]) or (got[i] == got[i + 1] and positions[i] < positions[i + 1]) for i in range(len(got) - 1))
