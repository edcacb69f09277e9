"""The synthetic demo model: spec, determinism, feature rules, power-law ids (its commands:
test_cli_model.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from services.core import synth, synth_deltas
from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import CheckpointError, ConfigError
from services.core.types import FeatureSide, FeatureSource, MappingKind

SMALL = synth.PRESETS["small"]


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    synth.synthesize(root, "small", seed=0)
    return root


# ---------------------------------------------------------------- spec


def test_feature_mix_and_order_are_fixed():
    spec = synth.model_spec("small")
    assert [(f.name, f.table, f.side.value, f.pooling.value, f.max_bag_len, f.mapping.value, f.source.value) for f in spec.sparse_features] == [
        ("user_id", "users", "user", "sum", 1, "modulo", "entity_id"),
        ("user_history", "items", "user", "mean", 50, "identity", "stored"),
        ("user_country", "countries", "user", "sum", 1, "identity", "stored"),
        ("user_age_bucket", "age_buckets", "user", "sum", 1, "identity", "stored"),
        ("user_device", "devices", "user", "sum", 1, "modulo", "stored"),
        ("item_id", "items", "item", "sum", 1, "identity", "entity_id"),
        ("item_category", "item_categories", "item", "sum", 1, "identity", "stored"),
        ("item_tags", "tags", "item", "max", 5, "modulo", "stored"),
    ]
    assert [(f.name, f.side.value, f.default) for f in spec.dense_features] == [
        ("user_activity", "user", 0.0),
        ("user_tenure", "user", 0.0),
        ("item_ctr", "item", 0.02),
        ("item_age", "item", 0.5),
    ]


@pytest.mark.parametrize(
    "preset, dim, users, items, bottom, top",
    [
        ("small", 16, 2000, 5000, (32, 16), (64, 32, 1)),
        ("demo", 64, 1_000_000, 500_000, (256, 128, 64), (512, 256, 1)),
        ("large", 64, 10_000_000, 8_000_000, (256, 128, 64), (512, 256, 1)),
    ],
)
def test_presets(preset, dim, users, items, bottom, top):
    spec = synth.model_spec(preset)
    assert spec.name == "demo"
    assert spec.table_names == ("users", "items", "item_categories", "tags", "countries", "age_buckets", "devices")
    assert {t.dim for t in spec.tables} == {dim}
    assert (spec.table("users").rows, spec.table("items").rows) == (users, items)
    a = spec.dense_arch
    assert (a.num_dense, a.num_sparse, a.embedding_dim, a.bottom_mlp, a.top_mlp) == (4, 8, dim, bottom, top)


def test_large_preset_is_over_4_gib():
    assert sum(t.size_bytes for t in synth.model_spec("large").tables) > 4 * 2**30


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        synth.model_spec("huge")


# ---------------------------------------------------------------- written checkpoint


def test_small_checkpoint_verifies_with_the_preset_shapes(small_root):
    reader = CheckpointReader(small_root)
    m = reader.verify(reader.latest_version())
    assert m.version == 1 and m.kind == "base" and m.model == synth.model_spec("small")
    for name, rows in SMALL.table_rows:
        t = reader.open_table(1, name)
        assert t.shape == (rows, SMALL.dim) and t.dtype == np.float32
    users = reader.open_table(1, "users")
    assert 1.8 < float(users.std()) < 2.2 and abs(float(users.mean())) < 0.05
    state = reader.dense_state(1)
    for name, arr in state.items():
        fan_in = state[name.replace(".bias", ".weight")].shape[1]
        assert np.abs(arr).max() <= 1 / np.sqrt(fan_in) + 1e-6, name


def test_same_seed_same_bytes_other_seed_other_bytes(small_root, tmp_path):
    again = synth.synthesize(tmp_path / "again", "small", seed=0)
    other = synth.synthesize(tmp_path / "other", "small", seed=1)
    first = CheckpointReader(small_root).manifest(1)
    assert {f.path: f.sha256 for f in again.files} == {f.path: f.sha256 for f in first.files}
    assert all(f.sha256 != first.file(f.path).sha256 for f in other.files), "another seed must change every file"
    for side in ("user", "item"):
        a = synth.load_feature_rows(small_root, side)
        b = synth.load_feature_rows(tmp_path / "again", side)
        c = synth.load_feature_rows(tmp_path / "other", side)
        assert a.keys() == b.keys() == c.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert any(not np.array_equal(a[k], c[k]) for k in a if not k.endswith("_id"))


def test_table_chunking_does_not_change_the_bytes(small_root, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "TABLE_CHUNK_BYTES", 4096)  # many chunks per table
    rechunked = synth.synthesize(tmp_path, "small", seed=0)
    assert rechunked.files == CheckpointReader(small_root).manifest(1).files


def test_existing_version_is_refused_and_features_untouched(small_root):
    before = (small_root / "features/users.npz").read_bytes()
    with pytest.raises(CheckpointError, match="already complete"):
        synth.synthesize(small_root, "small", seed=5)
    assert (small_root / "features/users.npz").read_bytes() == before


# ---------------------------------------------------------------- drift deltas


@pytest.fixture(scope="module")
def drift_root(tmp_path_factory):
    """The small model (seed 0) with 4 drift deltas of 2% (versions 2..5)."""
    root = tmp_path_factory.mktemp("drift")
    synth.synthesize(root, "small", seed=0)
    assert synth_deltas.synthesize_deltas(root, "small", 4, drift=0.02, seed=0) == [2, 3, 4, 5]
    return root


def test_drift_deltas_chain_and_change_the_drift_fraction_of_every_table(drift_root):
    reader = CheckpointReader(drift_root)
    assert [m.version for m in reader.chain(5)] == [1, 2, 3, 4, 5]
    for v in (2, 3, 4, 5):
        m = reader.verify(v)
        assert m.parent == v - 1 and m.delta_tables == synth.model_spec("small").table_names
        assert m.lists("dense.safetensors") == (v % 2 == 0), "every other delta replaces the dense weights"
        for name, rows in SMALL.table_rows:
            ids, values = reader.delta_rows(v, name)
            assert len(ids) == synth_deltas.drift_rows(rows, 0.02) == max(1, round(0.02 * rows))
            assert len(np.unique(ids)) == len(ids) and np.all(np.diff(ids) > 0) and 0 <= ids[0] and ids[-1] < rows
            assert values.dtype == np.float32 and values.shape == (len(ids), SMALL.dim)
    changed = reader.rows_at(3, "items", reader.delta_rows(3, "items")[0])
    assert 1.5 < float(changed.std()) < 2.5, "new rows are normal(0, TABLE_STD)"
    base, drifted = reader.dense_state(1), reader.dense_state(3)  # 3 keeps 2's weights
    for name, w in base.items():
        assert not np.array_equal(w, drifted[name]) and np.allclose(w, drifted[name], rtol=0.1, atol=1e-6), name


def test_drift_ids_prefer_hot_rows(drift_root):
    reader = CheckpointReader(drift_root)
    ids = np.concatenate([reader.delta_rows(v, "items")[0] for v in (2, 3, 4, 5)])
    assert np.mean(ids < 50) > 0.1  # the hottest 1% of 5000 items: ~10x their uniform share
    assert np.mean(ids >= 2500) > 0.05  # the tail changes too


def test_drift_deltas_are_deterministic_per_seed(drift_root, tmp_path):
    for seed, same in ((0, True), (1, False)):
        root = tmp_path / f"seed{seed}"
        synth.synthesize(root, "small", seed=0)
        synth_deltas.synthesize_deltas(root, "small", 4, drift=0.02, seed=seed)
        for v in (2, 3, 4, 5):
            want = {f.path: f.sha256 for f in CheckpointReader(drift_root).manifest(v).files}
            got = {f.path: f.sha256 for f in CheckpointReader(root).manifest(v).files}
            assert (got == want) is same, (seed, v)


def test_drift_deltas_on_an_existing_root_can_branch(drift_root, tmp_path):
    root = tmp_path / "branch"
    shutil.copytree(drift_root, root)
    assert synth_deltas.synthesize_deltas(root, "small", 2, first_parent=3) == [6, 7]
    reader = CheckpointReader(root)
    assert [m.version for m in reader.chain(7)] == [1, 2, 3, 6, 7]
    assert reader.changed_ids(5, 7, "users") is not None
    with pytest.raises(ConfigError, match="drift must be in"):
        synth_deltas.synthesize_deltas(root, "small", 1, drift=0.0)
    with pytest.raises(CheckpointError, match="model spec differs from parent 7's"):
        synth_deltas.synthesize_deltas(root, "demo", 1)


@pytest.mark.parametrize("k, rows", [(0, 10), (1, 1), (4900, 5000), (5000, 5000)])
def test_drift_ids_edges(k, rows):
    ids = synth_deltas.drift_ids(np.random.default_rng(0), k, rows)
    assert ids.dtype == np.int64 and len(ids) == k and len(np.unique(ids)) == k and np.all(np.diff(ids) > 0)
    assert k == 0 or (ids[0] >= 0 and ids[-1] < rows)


# ---------------------------------------------------------------- feature rows


def _csr_rows(arrays, name):
    lengths = arrays[f"{name}.lengths"]
    assert lengths.dtype == np.int32 and arrays[f"{name}.values"].dtype == np.int64
    assert lengths.sum() == len(arrays[f"{name}.values"])
    return lengths, arrays[f"{name}.values"]


@pytest.mark.parametrize("side, n, id_key", [(FeatureSide.USER, 2000, "user_id"), (FeatureSide.ITEM, 5000, "item_id")])
def test_feature_rows_follow_the_spec(small_root, side, n, id_key):
    spec = synth.model_spec("small")
    arrays = synth.load_feature_rows(small_root, side)
    np.testing.assert_array_equal(arrays[id_key], np.arange(n))
    expected_keys = {id_key}
    for f in spec.sparse_features:
        if f.side is not side or f.source is not FeatureSource.STORED:
            continue
        expected_keys |= {f"{f.name}.values", f"{f.name}.lengths"}
        lengths, values = _csr_rows(arrays, f.name)
        assert len(lengths) == n
        assert lengths.min() >= (0 if f.name == "user_history" else 1) and lengths.max() <= f.max_bag_len, f.name
        rows = spec.table(f.table).rows
        if f.mapping is MappingKind.IDENTITY:
            assert values.min() >= 0 and values.max() < rows, f.name
        else:  # raw values, outside [0, rows) too, negative ones included
            assert values.min() < 0 and values.max() >= rows, f.name
    for f in spec.dense_features:
        if f.side is side:
            expected_keys.add(f.name)
            v = arrays[f.name]
            assert v.dtype == np.float32 and v.shape == (n,) and 0.0 <= v.min() and v.max() <= 1.0, f.name
    assert set(arrays) == expected_keys


def test_history_lengths_and_skew(small_root):
    users = synth.load_feature_rows(small_root, "user")
    lengths, values = _csr_rows(users, "user_history")
    assert 17 < lengths.mean() < 23 and lengths.min() == 0 and lengths.max() == 50
    assert len(np.unique(lengths)) > 40
    # Power law over items: the lowest 1% of item ids take far more than 1% of the history.
    assert np.mean(values < SMALL.rows("items") // 100) > 0.2
    items = synth.load_feature_rows(small_root, "item")
    tag_lengths, _ = _csr_rows(items, "item_tags")
    assert set(np.unique(tag_lengths)) == {1, 2, 3, 4, 5}
    ages = users["user_age_bucket.values"]
    assert set(np.unique(ages)) == set(range(SMALL.rows("age_buckets")))  # uniform: every bucket used


def test_load_feature_rows_refuses_bad_csr(tmp_path):
    (tmp_path / "features").mkdir()
    np.savez(tmp_path / "features/users.npz", user_id=np.arange(3), **{"h.values": np.arange(4), "h.lengths": np.array([1, 1, 1], np.int32)})
    with pytest.raises(CheckpointError, match="feature 'h' is not valid CSR for 3 rows"):
        synth.load_feature_rows(tmp_path, "user")
    with pytest.raises(CheckpointError, match="missing feature file features/items.npz"):
        synth.load_feature_rows(tmp_path, "item")


# ---------------------------------------------------------------- power_law_ids


def test_power_law_ids_range_dtype_and_skew():
    rng = np.random.default_rng(0)
    ids = synth.power_law_ids(rng, 200_000, 10_000)
    assert ids.dtype == np.int64 and ids.shape == (200_000,)
    assert ids.min() == 0 and ids.max() < 10_000
    counts = np.bincount(ids, minlength=10_000)
    assert np.mean(ids < 100) > 0.4  # lowest 1% of ids: ~50% of draws (uniform would be 1%)
    assert counts[0] > counts[1] > counts[10] > counts[100] > 5 * counts[-100:].mean()
    assert (counts > 0).sum() > 5_000  # the tail is still drawn


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.1, 2.0])
def test_power_law_ids_alphas_and_determinism(alpha):
    a = synth.power_law_ids(np.random.default_rng(7), 1000, 50, alpha)
    b = synth.power_law_ids(np.random.default_rng(7), 1000, 50, alpha)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() < 50 and np.mean(a == 0) > 1 / 50


def test_power_law_ids_edges():
    assert synth.power_law_ids(np.random.default_rng(0), 10, 1).tolist() == [0] * 10
    assert synth.power_law_ids(np.random.default_rng(0), 0, 10).shape == (0,)
    with pytest.raises(ValueError):
        synth.power_law_ids(np.random.default_rng(0), 10, 0)


# ---------------------------------------------------------------- dense scores


def test_scores_are_varied_not_saturated(small_root):
    """The demo model must rank: scores spread over (user, item) pairs, without saturating."""
    torch = pytest.importorskip("torch")
    from services.core.dense import build_dlrm

    reader = CheckpointReader(small_root)
    spec = reader.manifest(1).model
    tables = {t: np.asarray(reader.open_table(1, t)) for t in spec.table_names}
    model = build_dlrm(spec.dense_arch, reader.dense_state(1))
    feats = {FeatureSide.USER: synth.load_feature_rows(small_root, "user"), FeatureSide.ITEM: synth.load_feature_rows(small_root, "item")}
    rng = np.random.default_rng(0)
    entity = {FeatureSide.USER: rng.choice(2000, 30, replace=False), FeatureSide.ITEM: rng.choice(5000, 60, replace=False)}

    def pooled(f, idx):
        table = tables[f.table]
        arrays = feats[f.side]
        if f.source is FeatureSource.ENTITY_ID:
            values = arrays["user_id" if f.side is FeatureSide.USER else "item_id"][idx : idx + 1]
        else:
            offsets = np.concatenate([[0], np.cumsum(arrays[f"{f.name}.lengths"])])
            values = arrays[f"{f.name}.values"][offsets[idx] : offsets[idx + 1]]
        rows = table[values % len(table)]
        if len(rows) == 0:
            return np.zeros(table.shape[1], np.float32)
        return {"sum": rows.sum(0), "mean": rows.mean(0), "max": rows.max(0)}[f.pooling.value]

    side_vectors = {
        side: [np.stack([pooled(f, i) for f in spec.sparse_features if f.side is side]) for i in entity[side]] for side in entity
    }
    side_dense = {
        side: [[feats[side][f.name][i] for f in spec.dense_features if f.side is side] for i in entity[side]] for side in entity
    }
    sparse = np.array([np.concatenate([u, it]) for u in side_vectors[FeatureSide.USER] for it in side_vectors[FeatureSide.ITEM]])
    dense = np.array([u + it for u in side_dense[FeatureSide.USER] for it in side_dense[FeatureSide.ITEM]], np.float32)
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy().reshape(30, 60)
    assert np.percentile(scores, 90) - np.percentile(scores, 10) > 0.2
    assert scores.std(axis=1).mean() > 0.05, "items must be ranked differently for one user"
    assert np.mean((scores < 0.01) | (scores > 0.99)) < 0.05
