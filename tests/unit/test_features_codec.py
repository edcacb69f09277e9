"""The Redis feature record codec (services/core/features.py) on the small demo preset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.core import synth
from services.core.errors import CheckpointError, ShardrecError
from services.core.features import FeatureLayout, map_to_rows, unmappable
from services.core.types import FeatureSide, MappingKind

SIDES = (FeatureSide.USER, FeatureSide.ITEM)


@pytest.fixture(scope="module")
def spec():
    return synth.model_spec("small")


@pytest.fixture(scope="module")
def rows_by_side():
    return {side: synth.feature_rows("small", side) for side in SIDES}


def _bag(rows, name, i):
    lengths = rows[f"{name}.lengths"]
    start = int(lengths[:i].sum())
    return rows[f"{name}.values"][start : start + int(lengths[i])]


def test_layout_fields_and_sizes(spec):
    user = FeatureLayout(spec, FeatureSide.USER)
    item = FeatureLayout(spec, FeatureSide.ITEM)
    # Entity-id features are not stored; every stored feature and every dense one is.
    assert [f.name for f in user.sparse] == ["user_history", "user_country", "user_age_bucket", "user_device"]
    assert [f.name for f in item.sparse] == ["item_category", "item_tags"]
    assert [d.name for d in user.dense] == ["user_activity", "user_tenure"]
    assert user.record_bytes == (4 + 50 * 8) + 3 * (4 + 8) + 2 * 4
    assert item.record_bytes == (4 + 8) + (4 + 5 * 8) + 2 * 4
    assert user.dtype.isalignedstruct is False
    assert user.fingerprint != item.fingerprint
    assert len(user.fingerprint) == 12 and int(user.fingerprint, 16) >= 0


def test_keys(spec):
    layout = FeatureLayout(spec, FeatureSide.USER)
    assert layout.key("p:", 42) == f"p:demo:{layout.fingerprint}:u:42".encode()
    ids = np.array([0, -7, 2**62], dtype=np.int64)
    assert layout.keys("p:", ids) == [layout.key("p:", int(i)) for i in ids]
    assert layout.keys("50%:", np.array([1])) == [f"50%:demo:{layout.fingerprint}:u:1".encode()]
    assert layout.keys("p:", np.array([], dtype=np.int64)) == []
    assert FeatureLayout(spec, FeatureSide.ITEM).key("", 3) == f"demo:{FeatureLayout(spec, 'item').fingerprint}:i:3".encode()


@pytest.mark.parametrize("side", SIDES)
def test_round_trip(spec, rows_by_side, side):
    layout = FeatureLayout(spec, side)
    rows = rows_by_side[side]
    ids = rows[layout.id_key]
    blobs = layout.encode(rows, ids)
    assert len(blobs) == len(ids)
    assert all(type(b) is bytes and len(b) == layout.record_bytes for b in blobs)
    decoded = layout.decode(blobs)
    assert decoded.present.all()
    for f in layout.sparse:
        np.testing.assert_array_equal(decoded.sparse[f.name].values, rows[f"{f.name}.values"])
        np.testing.assert_array_equal(decoded.sparse[f.name].lengths, rows[f"{f.name}.lengths"])
        assert decoded.sparse[f.name].values.dtype == np.int64
        assert decoded.sparse[f.name].lengths.dtype == np.int32
    for d in layout.dense:
        np.testing.assert_array_equal(decoded.dense[d.name], rows[d.name])
        assert decoded.dense[d.name].dtype == np.float32


@pytest.mark.parametrize("side", SIDES)
def test_subset_and_missing_entities_get_defaults(spec, rows_by_side, side):
    layout = FeatureLayout(spec, side)
    rows = rows_by_side[side]
    blobs = layout.encode(rows, rows[layout.id_key])
    # Entities may repeat within a batch; None is a key Redis does not hold.
    batch = [blobs[7], None, blobs[3], None, blobs[7], blobs[0]]
    which = [7, None, 3, None, 7, 0]
    decoded = layout.decode(batch)
    np.testing.assert_array_equal(decoded.present, [w is not None for w in which])
    for f in layout.sparse:
        got = decoded.sparse[f.name]
        offsets = np.concatenate(([0], np.cumsum(got.lengths)))
        for e, w in enumerate(which):
            bag = got.values[offsets[e] : offsets[e + 1]]
            want = np.empty(0, np.int64) if w is None else _bag(rows, f.name, w)
            np.testing.assert_array_equal(bag, want, err_msg=f"{f.name} entity {e}")
    for d in layout.dense:
        want = [d.default if w is None else rows[d.name][w] for w in which]
        np.testing.assert_array_equal(decoded.dense[d.name], np.array(want, dtype=np.float32))


def test_all_missing_and_empty(spec):
    layout = FeatureLayout(spec, FeatureSide.ITEM)
    decoded = layout.decode([None, None])
    assert not decoded.present.any()
    assert all(b.lengths.tolist() == [0, 0] and b.values.size == 0 for b in decoded.sparse.values())
    assert decoded.dense["item_ctr"].tolist() == pytest.approx([0.02, 0.02])
    assert decoded.dense["item_age"].tolist() == [0.5, 0.5]
    assert layout.decode([]).present.size == 0


def test_wrong_blob_size_refused_naming_key(spec, rows_by_side):
    layout = FeatureLayout(spec, FeatureSide.USER)
    rows = rows_by_side[FeatureSide.USER]
    good = layout.encode(rows, rows["user_id"])[:2]
    keys = layout.keys("t:", np.array([10, 11, 12]))
    with pytest.raises(ShardrecError, match=r"u:11.*447 bytes"):
        layout.decode([good[0], good[1][:-1], None], keys)
    with pytest.raises(ShardrecError, match="entity #0"):
        layout.decode([good[0] + b"\0"])
    with pytest.raises(ShardrecError, match="0 bytes"):
        layout.decode([b""])


def test_corrupt_bag_length_refused(spec, rows_by_side):
    layout = FeatureLayout(spec, FeatureSide.ITEM)
    rows = rows_by_side[FeatureSide.ITEM]
    rec = layout.encode_records(rows, rows["item_id"])[:1].copy()
    rec["len:item_tags"] = 6  # max_bag_len is 5
    with pytest.raises(ShardrecError, match="item_tags.*bag length 6"):
        layout.decode([rec.tobytes()], [b"k1"])


def test_fingerprint_changes_with_the_layout(spec):
    base = FeatureLayout(spec, FeatureSide.USER).fingerprint
    assert FeatureLayout(spec, FeatureSide.USER).fingerprint == base  # deterministic

    def with_feature(name, **change):
        feats = tuple(dataclasses.replace(f, **change) if f.name == name else f for f in spec.sparse_features)
        return dataclasses.replace(spec, sparse_features=feats)

    longer = with_feature("user_history", max_bag_len=60)
    assert FeatureLayout(longer, FeatureSide.USER).fingerprint != base
    assert FeatureLayout(longer, FeatureSide.USER).record_bytes == FeatureLayout(spec, "user").record_bytes + 80
    # A mapping change changes how values are read, so it changes the keys too.
    assert FeatureLayout(with_feature("user_country", mapping=MappingKind.MODULO), "user").fingerprint != base
    # The other side's layout is untouched.
    assert FeatureLayout(longer, FeatureSide.ITEM).fingerprint == FeatureLayout(spec, FeatureSide.ITEM).fingerprint


def _copy(rows):
    return {k: v.copy() for k, v in rows.items()}


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.pop("user_tenure"), "missing arrays.*user_tenure"),
        (lambda r: r["user_country.values"].__setitem__(3, 20), "'user_country': user 3 has value 20, outside \\[0, 20\\)"),
        (lambda r: r["user_history.values"].__setitem__(0, -1), "'user_history': user 0 has value -1"),
        (lambda r: r["user_activity"].__setitem__(5, np.nan), "'user_activity': user 5 has non-finite value"),
        (lambda r: r["user_id"].__setitem__(1, 0), "user id 0 appears more than once"),
        (lambda r: r["user_country.lengths"].__setitem__(0, 2), "'user_country': not valid CSR"),
    ],
)
def test_invalid_rows_refused(spec, rows_by_side, mutate, fragment):
    layout = FeatureLayout(spec, FeatureSide.USER)
    rows = _copy(rows_by_side[FeatureSide.USER])
    mutate(rows)
    with pytest.raises(CheckpointError, match=fragment):
        layout.encode(rows, rows["user_id"])


def test_bag_longer_than_max_refused_naming_feature_and_entity(spec, rows_by_side):
    layout = FeatureLayout(spec, FeatureSide.ITEM)
    rows = _copy(rows_by_side[FeatureSide.ITEM])
    lengths = rows["item_tags.lengths"]
    # Grow item 1's bag to 6 values by taking them from the bags after it: still valid CSR.
    grow = 6 - int(lengths[1])
    donor = 2 + int(np.flatnonzero(lengths[2:] >= grow)[0])
    lengths[1] += grow
    lengths[donor] -= grow
    with pytest.raises(CheckpointError, match="'item_tags': item 1 has a bag of 6 values, more than max_bag_len 5"):
        layout.encode(rows, rows["item_id"])


def test_modulo_and_identity_mapping():
    values = np.array([-1, -12, 0, 11, 12, 2**62 + 1], dtype=np.int64)
    np.testing.assert_array_equal(map_to_rows(values, MappingKind.MODULO, 12), [v % 12 for v in values.tolist()])
    assert unmappable(values, MappingKind.MODULO, 12).size == 0
    np.testing.assert_array_equal(unmappable(values, MappingKind.IDENTITY, 12), [0, 1, 4, 5])
