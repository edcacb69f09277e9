"""Feature prep against a real Redis: the small preset's features loaded with the
``shardrec features load`` code path, then ``FeaturePrep.validate`` and ``prepare`` checked
against a plain per-request, per-candidate reference written here."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio

from services._proto.shardrec.v1 import recommend_pb2 as pb
from services.control.features import load_features
from services.core import synth
from services.core.errors import InvalidArgumentError, ResourceExhaustedError
from services.core.feature_store import StoreKeys, read_marker
from services.core.features import FeatureLayout
from services.core.types import FeatureSide, FeatureSource, MappingKind
from services.frontend.batch import PreparedBatch
from services.frontend.features import FeaturePrep
from services.frontend.validate import FeatureLimits

SPEC = synth.model_spec("small")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    synth.synthesize(root, "small")
    return str(root)


@pytest.fixture(scope="module")
def stored_rows() -> dict[FeatureSide, dict[str, np.ndarray]]:
    return {side: synth.feature_rows("small", side) for side in FeatureSide}


@pytest.fixture
def loaded(checkpoint, redis_server, redis_client, redis_prefix) -> str:
    """The small preset's features in Redis under this test's prefix (cleaned by redis_client)."""
    result = load_features(checkpoint, redis_server.url, prefix=redis_prefix, batch=700, progress=False)
    assert result["users"]["stats"].entities == 2000 and result["items"]["stats"].entities == 5000
    assert redis_client.dbsize() >= 7000
    return redis_prefix


def live_prefix(client, prefix: str) -> str:
    """What goes before ``FeatureLayout.key``'s own part for the live generation's records."""
    keys = StoreKeys.of(prefix, FeatureLayout(SPEC, FeatureSide.USER), FeatureLayout(SPEC, FeatureSide.ITEM))
    return keys.generation_prefix(read_marker(client, keys).generation)


def run_prep(url: str | None, prefix: str, body: Callable, limits: FeatureLimits = FeatureLimits()):
    """Run ``await body(prep)`` on a fresh loop with a redis.asyncio client on ``url``."""

    async def main():
        client = None if url is None else redis.asyncio.Redis.from_url(url, decode_responses=False)
        try:
            return await body(FeaturePrep(SPEC, client, prefix, limits))
        finally:
            if client is not None:
                await client.aclose()

    return asyncio.run(main())


# -- the reference: plain loops over requests and candidates -------------------------------


def _map(f, value: int) -> int:
    rows = SPEC.table(f.table).rows
    if f.mapping is MappingKind.MODULO:
        return value % rows  # Python modulo: negatives map into [0, rows)
    assert 0 <= value < rows
    return value


def _stored_bag(rows: dict[str, np.ndarray], id_key: str, name: str, entity: int) -> list[int]:
    ids = rows[id_key].tolist()
    if entity not in ids:
        return []
    i = ids.index(entity)
    lengths = rows[f"{name}.lengths"]
    start = int(lengths[:i].sum())
    return rows[f"{name}.values"][start : start + int(lengths[i])].tolist()


def _stored_dense(rows, id_key, d, entity) -> float:
    ids = rows[id_key].tolist()
    return float(rows[d.name][ids.index(entity)]) if entity in ids else d.default


def reference(req: pb.RecommendRequest, stored, missing_items=()):
    """Per candidate: {feature: (rows, weights)} and the dense vector, the obvious way."""
    users, items = stored[FeatureSide.USER], stored[FeatureSide.ITEM]
    out = []
    for cand in req.candidate_item_ids:
        bags = {}
        for f in SPEC.sparse_features:
            weights = None
            if f.source is FeatureSource.ENTITY_ID:
                raw = [req.user_id if f.side is FeatureSide.USER else cand]
            elif f.side is FeatureSide.USER and f.name in req.sparse_features:
                raw = list(req.sparse_features[f.name].values)
                weights = list(req.sparse_features[f.name].weights) or None
            elif f.side is FeatureSide.USER:
                raw = _stored_bag(users, "user_id", f.name, req.user_id)
            else:
                raw = [] if cand in missing_items else _stored_bag(items, "item_id", f.name, cand)
            bags[f.name] = ([_map(f, v) for v in raw], weights or [1.0] * len(raw))
        dense = []
        for d in SPEC.dense_features:
            if d.name in req.dense_features:
                dense.append(req.dense_features[d.name])
            elif d.side is FeatureSide.USER:
                dense.append(_stored_dense(users, "user_id", d, req.user_id))
            else:
                dense.append(d.default if cand in missing_items else _stored_dense(items, "item_id", d, cand))
        out.append((bags, np.array(dense, dtype=np.float32)))
    return out


def _bag_of(bags, index: int):
    offsets = np.concatenate(([0], np.cumsum(bags.lengths)))
    sl = slice(int(offsets[index]), int(offsets[index + 1]))
    weights = np.ones(sl.stop - sl.start, np.float32) if bags.weights is None else bags.weights[sl]
    return bags.rows[sl].tolist(), weights.tolist()


def assert_matches_reference(batch: PreparedBatch, reqs, stored, missing_items=()):
    assert batch.num_samples == sum(len(r.candidate_item_ids) for r in reqs)
    assert batch.dense.shape == (batch.num_samples, len(SPEC.dense_features)) and batch.dense.dtype == np.float32
    for r, req in enumerate(reqs):
        expected = reference(req, stored, missing_items)
        for c, (bags, dense) in enumerate(expected):
            s = int(batch.sample_offsets[r]) + c
            u, i = int(batch.user_of_sample[s]), int(batch.item_of_sample[s])
            for f in SPEC.sparse_features:
                got = _bag_of((batch.user_bags if f.side is FeatureSide.USER else batch.item_bags)[f.name],
                              u if f.side is FeatureSide.USER else i)
                assert got[0] == bags[f.name][0], f"request {r} candidate {c} feature {f.name}: rows"
                assert got[1] == pytest.approx(bags[f.name][1]), f"request {r} candidate {c} feature {f.name}: weights"
            np.testing.assert_array_equal(batch.dense[s], dense, err_msg=f"request {r} candidate {c} dense")


def req(user_id=5, candidates=(0, 1, 2), top_k=None, **kw) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        request_id=kw.pop("request_id", f"r-{user_id}"),
        user_id=user_id,
        candidate_item_ids=list(candidates),
        top_k=len(candidates) if top_k is None else top_k,
        **kw,
    )


# -- prepare --------------------------------------------------------------------------------


def test_prepare_batch_matches_reference_with_dedup_and_overrides(redis_server, loaded, stored_rows):
    reqs = [
        req(5, [0, 1, 2, 3, 4999]),
        req(5, [3, 2, 1, 1, 0], request_id="same-user-repeated-candidates"),
        req(5, [10, 11], sparse_features={"user_country": pb.SparseFeature(values=[3], weights=[0.5])},
            dense_features={"user_activity": 0.75, "item_ctr": 0.9}),
        req(1999, [4999, 10, 7, 7], sparse_features={"user_history": pb.SparseFeature(values=[4, 4, 4999, 0])}),
        req(1999, [8]),
        req(-17, [1, 2], sparse_features={"user_device": pb.SparseFeature(values=[-123456789])}),
        req(123_456_789, [0, 42], dense_features={"item_age": 2.5}),  # no stored row: defaults
        req(77, [5, 6], sparse_features={"user_history": pb.SparseFeature(values=[])}),  # empty override
    ]

    async def body(prep: FeaturePrep):
        recs = [prep.validate(r) for r in reqs]
        first = await prep.prepare(recs)
        second = await prep.prepare(recs[:2])
        return prep, first, second

    prep, batch, second = run_prep(redis_server.url, loaded, body)
    assert_matches_reference(batch, reqs, stored_rows)
    assert_matches_reference(second, reqs[:2], stored_rows)

    all_candidates = [c for r in reqs for c in r.candidate_item_ids]
    unique_items = sorted(set(all_candidates))
    # Items are unique per batch; every item bag has exactly one bag per unique item.
    for bags in batch.item_bags.values():
        assert len(bags.lengths) == len(unique_items)
    assert batch.item_bags["item_id"].rows.tolist() == unique_items
    # User contexts: users 5, 1999 and 123456789 shared; four requests with their own overrides.
    assert len(set(batch.user_of_sample.tolist())) == 3 + 4
    for bags in batch.user_bags.values():
        assert len(bags.lengths) == 7
    assert batch.user_of_sample.dtype == np.int32 and batch.item_of_sample.dtype == np.int32
    # Requests 0 and 1 (same user, no overrides) share one context.
    assert batch.user_of_sample[0] == batch.user_of_sample[int(batch.sample_offsets[1])]
    assert batch.user_bags["user_country"].weights is not None
    assert batch.user_bags["user_history"].weights is None  # nobody weighted it

    # One MGET per batch; the counters add up.
    assert prep.redis_round_trips == 2
    assert prep.batches == 2 and prep.requests == len(reqs) + 2
    assert prep.item_ids_requested == len(all_candidates) + 10
    assert prep.item_ids_unique == len(unique_items) + 5
    # Each unique user read once per batch, overriding or not: 5, 1999, -17, 123456789, 77.
    assert prep.redis_keys == (5 + len(unique_items)) + (1 + 5)

def test_overrides_win_and_missing_entities_get_defaults(redis_server, loaded, stored_rows, redis_client):
    item_layout = FeatureLayout(SPEC, FeatureSide.ITEM)
    assert redis_client.delete(item_layout.key(live_prefix(redis_client, loaded), 17)) == 1  # item 17 now has no stored row
    reqs = [
        req(3, [17, 18], sparse_features={"user_country": pb.SparseFeature(values=[19])},
            dense_features={"user_tenure": -1.0, "item_ctr": 0.5}),
        req(3_000_000, [17]),  # user without a stored row
    ]

    async def body(prep):
        return await prep.prepare([prep.validate(r) for r in reqs])

    batch = run_prep(redis_server.url, loaded, body)
    assert_matches_reference(batch, reqs, stored_rows, missing_items={17})
    country = batch.user_bags["user_country"]
    assert _bag_of(country, int(batch.user_of_sample[0]))[0] == [19]
    assert batch.dense[0, [1, 2]].tolist() == [-1.0, 0.5] and batch.dense[1, [1, 2]].tolist() == [-1.0, 0.5]
    # The missing user: empty stored bags, dense defaults; its id still maps (modulo 2000).
    u = int(batch.user_of_sample[2])
    assert _bag_of(batch.user_bags["user_history"], u)[0] == []
    assert _bag_of(batch.user_bags["user_id"], u)[0] == [3_000_000 % 2000]
    assert batch.dense[2].tolist() == pytest.approx([0.0, 0.0, 0.02, 0.5])
    # The missing item: empty stored bags, its entity id bag still there.
    i = int(batch.item_of_sample[2])
    assert _bag_of(batch.item_bags["item_category"], i)[0] == []
    assert _bag_of(batch.item_bags["item_id"], i)[0] == [17]


def test_without_redis_everything_is_default(stored_rows):
    reqs = [req(4, [1, 2, 1]), req(4, [3])]

    async def body(prep):
        return prep, await prep.prepare([prep.validate(r) for r in reqs])

    prep, batch = run_prep(None, "", body)
    empty = {FeatureSide.USER: {"user_id": np.empty(0, np.int64)}, FeatureSide.ITEM: {"item_id": np.empty(0, np.int64)}}
    for side in FeatureSide:
        layout = FeatureLayout(SPEC, side)
        for f in layout.sparse:
            empty[side][f"{f.name}.values"] = np.empty(0, np.int64)
            empty[side][f"{f.name}.lengths"] = np.empty(0, np.int32)
        for d in layout.dense:
            empty[side][d.name] = np.empty(0, np.float32)
    assert_matches_reference(batch, reqs, empty)
    assert prep.redis_round_trips == 0 and prep.batches == 1
    assert batch.user_bags["user_id"].lengths.tolist() == [1]  # one shared user context


def test_loader_refuses_invalid_rows_and_writes_nothing(tmp_path, redis_server, redis_client, redis_prefix):
    from services.core.checkpoint.storage import CheckpointStore
    from services.core.errors import CheckpointError

    synth.synthesize(tmp_path, "small")
    path = CheckpointStore(tmp_path).local_path(synth.feature_file("item"))
    rows = synth.feature_rows("small", "item")
    rows["item_category.values"][9] = 50  # the table has 50 rows
    np.savez(path, **rows)
    with pytest.raises(CheckpointError, match="'item_category': item 9 has value 50, outside \\[0, 50\\)"):
        load_features(str(tmp_path), redis_server.url, prefix=redis_prefix, progress=False)
    assert list(redis_client.scan_iter(match=redis_prefix + "*")) == []


def test_features_of_another_root_load_for_a_checkpoint_without_its_own(tmp_path, checkpoint, redis_server, redis_client, redis_prefix):
    import shutil

    from services.core.errors import CheckpointError

    bare = tmp_path / "bare"
    shutil.copytree(Path(checkpoint) / "versions", bare / "versions")  # the model, no features/
    with pytest.raises(CheckpointError, match="missing feature file features/users.npz"):
        load_features(str(bare), redis_server.url, prefix=redis_prefix, progress=False)
    result = load_features(str(bare), redis_server.url, prefix=redis_prefix, features=checkpoint, progress=False)
    assert result["users"]["stats"].entities == 2000 and result["items"]["stats"].entities == 5000
    assert redis_client.dbsize() >= 7000


# -- validate ---------------------------------------------------------------------------------

SF = pb.SparseFeature
REFUSED = [
    ({"model": "other"}, InvalidArgumentError, "unknown model 'other' (serving 'demo')"),
    ({"candidates": []}, InvalidArgumentError, "candidate_item_ids is empty"),
    ({"candidates": list(range(1001))}, ResourceExhaustedError, "1001 ids, more than max_candidates 1000"),
    ({"top_k": 0}, InvalidArgumentError, "top_k = 0"),
    ({"top_k": -2}, InvalidArgumentError, "top_k = -2"),
    ({"top_k": 4}, InvalidArgumentError, "top_k = 4 must be between 1 and the number of candidates (3)"),
    ({"candidates": [0, 1, 5000]}, InvalidArgumentError, "candidate_item_ids[2] = 5000 is not a row of table 'items'"),
    ({"candidates": [-1, 1]}, InvalidArgumentError, "candidate_item_ids[0] = -1"),
    ({"dense_features": {"nope": 1.0}}, InvalidArgumentError, "dense_features['nope']: unknown dense feature"),
    ({"dense_features": {"user_activity": math.nan}}, InvalidArgumentError, "dense_features['user_activity'] = nan"),
    ({"dense_features": {"item_ctr": math.inf}}, InvalidArgumentError, "dense_features['item_ctr'] = inf"),
    ({"sparse_features": {"nope": SF(values=[1])}}, InvalidArgumentError, "sparse_features['nope']: unknown sparse feature"),
    ({"sparse_features": {"item_tags": SF(values=[1])}}, InvalidArgumentError, "sparse_features['item_tags']: an item-side"),
    ({"sparse_features": {"user_id": SF(values=[1])}}, InvalidArgumentError, "sparse_features['user_id']: the entity id"),
    ({"sparse_features": {"user_country": SF(values=[1, 2])}}, InvalidArgumentError, "has 2 values, more than max_bag_len 1"),
    ({"sparse_features": {"user_history": SF(values=list(range(51)))}}, InvalidArgumentError, "max_bag_len 50"),
    ({"sparse_features": {"user_country": SF(values=[1], weights=[1.0, 2.0])}}, InvalidArgumentError,
     "sparse_features['user_country'].weights has 2 weights for 1 values"),
    ({"sparse_features": {"user_country": SF(values=[1], weights=[math.nan])}}, InvalidArgumentError,
     "sparse_features['user_country'].weights[0] = nan"),
    ({"sparse_features": {"user_history": SF(values=[1, 2], weights=[1.0, 1.0])}}, InvalidArgumentError,
     "pools by mean; per-value weights need sum pooling"),
    ({"sparse_features": {"user_country": SF(values=[20])}}, InvalidArgumentError,
     "sparse_features['user_country'].values[0] = 20 is not a row of table 'countries'"),
    ({"sparse_features": {"user_history": SF(values=[0, 4, -3])}}, InvalidArgumentError,
     "sparse_features['user_history'].values[2] = -3"),
]


@pytest.mark.parametrize("change, error, fragment", REFUSED, ids=[f"{i}-{r[2][:30]}" for i, r in enumerate(REFUSED)])
def test_validate_refuses(change, error, fragment):
    prep = FeaturePrep(SPEC, None, "", FeatureLimits())
    change = dict(change)
    candidates = change.pop("candidates", [0, 1, 2])
    top_k = change.pop("top_k", len(candidates))
    with pytest.raises(error) as e:
        prep.validate(req(5, candidates, top_k, **change))
    assert fragment in str(e.value)
    assert prep.batches == 0


def test_validate_accepts_and_converts():
    prep = FeaturePrep(SPEC, None, "", FeatureLimits())
    rec = prep.validate(
        req(-(2**62), [4999, 0, 0, 4999], 4, model="demo",
            sparse_features={"user_device": SF(values=[-(2**63)]), "user_country": SF(values=[0], weights=[0.25])},
            dense_features={"user_activity": -3.5, "item_age": 1e6})
    )
    assert rec.user_id == -(2**62) and rec.top_k == 4  # modulo user ids take any int64
    assert rec.candidates.dtype == np.int64 and rec.candidates.tolist() == [4999, 0, 0, 4999]  # repeats allowed
    values, weights = rec.sparse_overrides["user_device"]
    assert values.tolist() == [-(2**63)] and weights is None  # modulo features take any int64
    assert rec.sparse_overrides["user_country"][1].tolist() == [0.25]
    assert rec.dense_overrides == {"user_activity": -3.5, "item_age": pytest.approx(1e6, rel=1e-6)}
    assert prep.validate(req(1, [1], 1, model="")).user_id == 1  # empty model = the served one
    assert prep.validate(req(1, list(range(1000)))).candidates.size == 1000


@pytest.mark.parametrize("dense, weight", [(3e38, 1.0), (-1e7, 1.0), (1.0, 3e38), (1.0, -2e6), (1.0, float("nan"))])
def test_finite_but_huge_values_are_refused_naming_the_field(dense, weight):
    """Finite values the model overflows on (NaN scores answered OK before) are refused."""
    prep = FeaturePrep(SPEC, None, "", FeatureLimits())
    field = "dense_features['user_activity']" if abs(dense) > 1e6 else "sparse_features['user_country'].weights[0]"
    with pytest.raises(InvalidArgumentError, match=re.escape(field)):
        prep.validate(req(1, [1], 1, sparse_features={"user_country": SF(values=[0], weights=[weight])},
                          dense_features={"user_activity": dense}))  # fmt: skip


def test_default_top_k_rule():
    prep = FeaturePrep(SPEC, None, "", FeatureLimits(max_candidates=10, default_top_k=3))
    assert prep.validate(req(1, [1, 2, 3, 4], 0)).top_k == 3
    assert prep.validate(req(1, [1, 2], 0)).top_k == 2
    with pytest.raises(ResourceExhaustedError, match="max_candidates 10"):
        prep.validate(req(1, list(range(11))))


def test_identity_user_ids_are_checked():
    import dataclasses

    feats = tuple(
        dataclasses.replace(f, mapping=MappingKind.IDENTITY) if f.name == "user_id" else f for f in SPEC.sparse_features
    )
    prep = FeaturePrep(dataclasses.replace(SPEC, sparse_features=feats), None, "", FeatureLimits())
    assert prep.validate(req(1999, [1])).user_id == 1999
    for bad in (-1, 2000):
        with pytest.raises(InvalidArgumentError, match=f"user_id = {bad} is not a row of table 'users'"):
            prep.validate(req(bad, [1]))


def test_unreachable_redis_is_unavailable():
    import socket

    from services.core.errors import UnavailableError

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body(prep):
        with pytest.raises(UnavailableError, match="feature store \\(Redis\\) unavailable"):
            await prep.prepare([prep.validate(req(1, [1]))])
        return prep

    prep = run_prep(f"redis://127.0.0.1:{port}/0", "", body)
    assert prep.redis_round_trips == 0 and prep.batches == 0
