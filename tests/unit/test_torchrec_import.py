"""``shardrec checkpoint import --torchrec`` on the fixture exported by real TorchRec 1.8
(tests/fixtures/torchrec/, made by its make_fixture.py): tables and weights land unchanged, the
reference path reproduces TorchRec's own pooled embeddings and DLRM scores, both file formats
give one checkpoint, deltas between two exports work, and what cannot be imported is refused
with a message naming it. Where TorchRec is installed, one test also runs it live."""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.torchrec_import import import_torchrec
from services.core.checkpoint.torchrec_map import load_map, parse_map
from services.core.errors import CheckpointError, ConfigError
from services.core.reference import ReferenceModel, ReferenceRecommender
from services.core.synth import load_feature_rows

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "torchrec"
MAP = FIXTURE / "map.toml"
EXAMPLE_MAP = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples" / "torchrec_map.toml"
EBC = "sparse_arch.embedding_bag_collection.embedding_bags."
TORCHREC_HINT = (
    "torchrec is not installed (optional). In a venv with torch==2.13.0: pip install --no-deps "
    "fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0 && pip install tensordict torchmetrics==1.0.3 pyre-extensions tqdm"
)


def fixture_tensors() -> dict[str, np.ndarray]:
    with safe_open(FIXTURE / "dlrm.safetensors", framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def save(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return path


def map_text(**replace: str) -> str:
    text = MAP.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def write_map(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    (tmp_path / "map.toml").write_text(text)
    return tmp_path / "map.toml"


def reference_outputs(root: pathlib.Path, expected) -> tuple[np.ndarray, np.ndarray]:
    """Our pooled [B, F, D] (the KJT's rows pooled by the reference path) and scores [B]."""
    model = ReferenceModel(str(root))
    keys = [str(k) for k in expected["kjt_keys"]]
    assert keys == [f.name for f in model.spec.sparse_features]  # SparseArch order = ours
    b = len(expected["dense"])
    lengths = expected["kjt_lengths"].reshape(len(keys), b)
    starts = np.concatenate([[0], np.cumsum(lengths.sum(axis=1))])
    pooled = np.stack(
        [
            model.pool(f.table, expected["kjt_values"][starts[i] : starts[i + 1]], lengths[i], f.pooling)
            for i, f in enumerate(model.spec.sparse_features)
        ],
        axis=1,
    )
    return pooled, model.scores(expected["dense"], pooled)


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture imported from each format, with its feature files."""
    out = {}
    for suffix in ("safetensors", "pt"):
        root = tmp_path_factory.mktemp(suffix)
        import_torchrec(FIXTURE / f"dlrm.{suffix}", MAP, root, features=FIXTURE, created_at="t", chunk_bytes=5 * 8 * 4)
        out[suffix] = root
    return out


# ---------------------------------------------------------------- what an import writes


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_tables_and_dense_weights_equal_the_state_dict(imported, suffix):
    tensors = fixture_tensors()
    reader = CheckpointReader(imported[suffix])
    m = reader.manifest(1)
    assert (m.kind, m.model.name, m.model.table_names) == ("base", "torchrec_fixture", ("t_users", "t_items", "t_categories", "t_tags"))
    for t in m.model.tables:
        np.testing.assert_array_equal(reader.open_table(1, t.name, verify=True), tensors[f"{EBC}{t.name}.weight"])
    dense = reader.dense_state(1)
    renamed = {
        "bottom_mlp.0": "dense_arch.model._mlp.0._linear",
        "bottom_mlp.2": "dense_arch.model._mlp.1._linear",
        "top_mlp.0": "over_arch.model.0._mlp.0._linear",
        "top_mlp.2": "over_arch.model.0._mlp.1._linear",
        "top_mlp.4": "over_arch.model.1",
    }
    assert sorted(dense) == sorted(f"{ours}.{p}" for ours in renamed for p in ("weight", "bias"))
    for ours, theirs in renamed.items():
        for p in ("weight", "bias"):
            np.testing.assert_array_equal(dense[f"{ours}.{p}"], tensors[f"{theirs}.{p}"])
    a = m.model.dense_arch
    assert (a.num_dense, a.embedding_dim, a.num_sparse, a.bottom_mlp, a.top_mlp) == (3, 8, 5, (16, 8), (16, 8, 1))


def test_reference_path_reproduces_torchrec_pooled_outputs_and_scores(imported, expected):
    pooled, scores = reference_outputs(imported["safetensors"], expected)
    np.testing.assert_allclose(pooled, expected["pooled"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-5, atol=1e-6)
    # The whole Recommend computation from RAW ids and the copied feature files (modulo
    # mappings of hashed user ids and tags, an empty history, an item with no stored row).
    rec = ReferenceRecommender(str(imported["pt"]))
    users, items = expected["sample_user_id"], expected["sample_item_id"]
    for user in dict.fromkeys(users.tolist()):
        np.testing.assert_allclose(rec.scores(user, items[users == user]), expected["scores"][users == user], rtol=1e-5, atol=1e-6)


def test_safetensors_and_torch_save_give_identical_checkpoints(imported):
    a, b = imported["safetensors"], imported["pt"]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert pathlib.Path("versions/1/tables/t_tags.npy") in files and pathlib.Path("features/items.npz") in files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_without_features_empty_feature_files_serve_the_defaults_and_later_imports_keep_them(tmp_path, expected):
    summary = import_torchrec(FIXTURE / "dlrm.safetensors", MAP, tmp_path)
    assert dict(summary.features) == {"features/users.npz": "empty", "features/items.npz": "empty"}
    assert len(load_feature_rows(tmp_path, "user")["user_id"]) == 0
    scores = ReferenceRecommender(str(tmp_path)).scores(7, [3, 17])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    summary = import_torchrec(FIXTURE / "dlrm.pt", MAP, tmp_path, features=FIXTURE)  # version 2 of the root
    assert summary.manifest.version == 2 and set(summary.features.values()) == {"copied"}
    assert import_torchrec(FIXTURE / "dlrm.pt", MAP, tmp_path).features["features/users.npz"] == "kept"
    with pytest.raises(CheckpointError, match="already complete"):
        import_torchrec(FIXTURE / "dlrm.pt", MAP, tmp_path, version=1)


# ---------------------------------------------------------------- deltas between exports


# ---------------------------------------------------------------- refusals


def test_tables_of_different_dims_are_refused_naming_them(tmp_path):
    tensors = fixture_tensors()
    tensors[f"{EBC}t_categories.weight"] = np.zeros((24, 4), np.float32)
    with pytest.raises(CheckpointError, match=r"different dims \(dim 8: t_users, t_items, t_tags; dim 4: t_categories\).*same dim"):
        import_torchrec(save(tmp_path / "x.safetensors", tensors), MAP, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # every check runs before anything is written


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({'name = "item_tags"': 'name = "item_tagz"', "max_bag_len = 4": "max_bag_len = 4\nhashed = true"}, ConfigError, r"unknown key.*hashed"),
        ({"max_bag_len = 10": ""}, ConfigError, r"user_history.*needs max_bag_len"),
        ({'pooling = "mean"\nmapping = "identity"\nsource = "stored"': 'pooling = "max"\nmapping = "identity"\nsource = "stored"'}, ConfigError, "sum or mean"),
        ({'name = "item_category"': 'name = "item_tags"'}, ConfigError, r"\['item_tags'\] listed more than once"),
        ({'table = "t_tags"': 'table = "t_tag"'}, ConfigError, r"\['t_tag'\] are not in the state dict"),
        ({'table = "t_categories"': 'table = "t_tags"'}, ConfigError, r"no sparse feature reads table\(s\) \['t_categories'\]"),
        ({'name = "item_id"\ntable = "t_items"': 'name = "item_id"\ntable = "t_tags"'}, ConfigError, "listed together"),
        ({'[[dense_features]]\nname = "item_age"\nside = "item"\ndefault = 0.5\n': ""}, ConfigError, r"2 dense feature\(s\) but dense_arch takes 3"),
    ],
)
def test_map_problems_are_refused_naming_the_entry(tmp_path, change, error, match):
    path = write_map(tmp_path, map_text(**change))
    with pytest.raises(error, match=match):
        import_torchrec(FIXTURE / "dlrm.safetensors", path, tmp_path / "out")


def test_a_missing_feature_is_caught_by_the_over_arch_width(tmp_path):
    data = tomllib.loads(MAP.read_text())
    data["sparse_features"] = [f for f in data["sparse_features"] if f["name"] != "user_history"]
    with pytest.raises(ConfigError, match=r"over_arch takes 23 inputs, but D \+ F\(F\+1\)/2 = 18 .* F = 4"):
        import_torchrec(FIXTURE / "dlrm.safetensors", parse_map(data), tmp_path / "out")


def test_a_torch_save_file_checks_the_table_order(tmp_path):
    text = map_text()
    blocks = text.split("[[sparse_features]]")
    cat, tags = blocks[4], blocks[5].split("# Dense")[0]
    swapped = text.replace(cat, "@@").replace(tags, cat).replace("@@", tags)
    path = write_map(tmp_path, swapped)
    with pytest.raises(ConfigError, match=r"order \['t_users', 't_items', 't_tags', 't_categories'\].*reorder"):
        import_torchrec(FIXTURE / "dlrm.pt", path, tmp_path / "out")
    import_torchrec(FIXTURE / "dlrm.safetensors", path, tmp_path / "out")  # no order in safetensors: the MAP rules


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.update({"inter_arch.crossnet.W_kernels.0": np.zeros((8, 8), np.float32)}), "DLRM_DCN or DLRM_Projection"),
        (lambda t: t.update({"extra.weight": np.zeros(1, np.float32)}), r"not part of a plain DLRM: extra.weight"),
        (lambda t: t.pop("over_arch.model.0._mlp.1._linear.bias"), r"over_arch.model.0: layer 1 has \['weight'\]"),
        (lambda t: [t.pop(k) for k in list(t) if not k.startswith(EBC)], "no dense_arch weights"),
        (lambda t: [t.update({k.replace("sparse_arch.embedding_bag_collection.", ""): t.pop(k)}) for k in list(t)], "EmbeddingBagCollection but no DLRM"),
        (lambda t: t.update({f"{EBC}t_tags.weight": t[f"{EBC}t_tags.weight"].astype(np.float64)}), "dtype F64 is not stored exactly"),
    ],
)
def test_state_dicts_that_are_not_a_plain_dlrm_are_refused(tmp_path, edit, match):
    tensors = fixture_tensors()
    edit(tensors)
    with pytest.raises(CheckpointError, match=match):
        import_torchrec(save(tmp_path / "x.safetensors", tensors), MAP, tmp_path / "out")


def test_a_prefixed_state_dict_and_float16_tables_import_exactly(tmp_path):
    tensors = {f"model.{k}": v for k, v in fixture_tensors().items()}  # DLRMTrain's keys
    tensors[f"model.{EBC}t_tags.weight"] = tensors[f"model.{EBC}t_tags.weight"].astype(np.float16)
    import_torchrec(save(tmp_path / "x.safetensors", tensors), MAP, tmp_path / "out")
    np.testing.assert_array_equal(
        CheckpointReader(tmp_path / "out").open_table(1, "t_tags"), tensors[f"model.{EBC}t_tags.weight"].astype(np.float32)
    )


def test_several_dlrms_need_the_map_prefix_which_ignores_the_rest(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    tensors = fixture_tensors()
    both = {f"{p}.{k}": torch.from_numpy(v).clone() for p in ("a", "b") for k, v in tensors.items()}
    both[f"b.{EBC}t_items.weight"] = both[f"b.{EBC}t_items.weight"].to(torch.bfloat16)
    save_torch(both, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match=r"several DLRMs \(key prefixes \['a.', 'b.'\]\): set prefix in the MAP"):
        import_torchrec(tmp_path / "two.safetensors", MAP, tmp_path / "out")
    path = write_map(tmp_path, 'prefix = "b."\n' + MAP.read_text())
    import_torchrec(tmp_path / "two.safetensors", path, tmp_path / "out")
    np.testing.assert_array_equal(
        CheckpointReader(tmp_path / "out").open_table(1, "t_items"), both[f"b.{EBC}t_items.weight"].float().numpy()
    )


def test_the_documented_example_map_is_the_fixture_map():
    assert load_map(EXAMPLE_MAP) == load_map(MAP)


# ---------------------------------------------------------------- live TorchRec


def test_live_torchrec_scores_equal_the_imported_reference(tmp_path, expected):
    if importlib.util.find_spec("torchrec") is None:
        pytest.skip(TORCHREC_HINT)
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    make_fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixture)
    import torch

    model = make_fixture.build_model(seed=7)  # another model than the committed one
    state = model.state_dict()
    assert list(state) == list(torch.load(FIXTURE / "dlrm.pt", weights_only=True))  # TorchRec's names, in order
    torch.save(state, tmp_path / "live.pt")
    import_torchrec(tmp_path / "live.pt", MAP, tmp_path / "out", features=FIXTURE)
    inputs = make_fixture.model_inputs(make_fixture.feature_rows())
    live = make_fixture.torchrec_outputs(model, inputs)
    pooled, scores = reference_outputs(tmp_path / "out", inputs)
    np.testing.assert_allclose(pooled, live["pooled"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, live["scores"], rtol=1e-5, atol=1e-6)
