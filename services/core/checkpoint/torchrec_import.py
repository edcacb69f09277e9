"""Import a TorchRec DLRM state dict as a shardrec checkpoint base (docs/import.md).

``import_torchrec(state_dict, map, out)`` reads an unsharded ``torchrec.models.dlrm.DLRM``
state dict (its ``EmbeddingBagCollection`` tables and the ``dense_arch`` / ``over_arch`` MLPs;
safetensors or ``torch.save``), takes what the state dict does not say from the MAP
(``torchrec_map``), and writes one base version through ``VersionWriter``: table by table, in
chunks of ``chunk_bytes`` rows, so a table bigger than memory is never whole in it.

``plan_import`` does every check before anything is written: the DLRM's keys (found under one
prefix), one dim for every table, the MAP against the tables and MLP shapes, dtypes that
widen exactly to float32. TorchRec itself is never imported.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from services.core.checkpoint.manifest import Manifest, ModelSpec
from services.core.checkpoint.reader import CHUNK_BYTES
from services.core.checkpoint.state_dict_file import EXACT_AS_FLOAT32, StateDictFile, open_state_dict
from services.core.checkpoint.storage import StoreOrUri, as_store
from services.core.checkpoint.torchrec_map import TorchRecMap, load_map
from services.core.checkpoint.writer import VersionWriter, next_version
from services.core.errors import CheckpointError, ConfigError
from services.core.features import FeatureLayout
from services.core.synth import feature_file, load_feature_rows, save_npz
from services.core.types import DenseArch, FeatureSide, TableSpec, Version

_EBC = "sparse_arch.embedding_bag_collection.embedding_bags."
_TABLE_RE = re.compile(rf"^(?P<prefix>.*?){re.escape(_EBC)}(?P<table>[^.]+)\.weight$")
_BOTTOM_RE = re.compile(r"^dense_arch\.model\._mlp\.(?P<i>\d+)\._linear\.(?P<p>weight|bias)$")
_TOP_MLP_RE = re.compile(r"^over_arch\.model\.0\._mlp\.(?P<i>\d+)\._linear\.(?P<p>weight|bias)$")
_TOP_LAST_RE = re.compile(r"^over_arch\.model\.1\.(?P<p>weight|bias)$")
_LAYOUT_HINT = (
    "expected the state_dict() of an unsharded torchrec.models.dlrm.DLRM: "
    f"<prefix>{_EBC}<table>.weight, <prefix>dense_arch.model._mlp.<i>._linear.weight|bias, "
    "<prefix>over_arch.model.0._mlp.<i>._linear.weight|bias and <prefix>over_arch.model.1.weight|bias"
)


@dataclass(frozen=True)
class DlrmKeys:
    """Where a DLRM's tensors are in a state dict: ``tables`` maps a TorchRec table name to its
    key (file order); ``bottom`` / ``top`` are the ``(weight key, bias key)`` of each Linear of
    ``dense_arch`` and ``over_arch`` in forward order."""

    prefix: str
    tables: Mapping[str, str]
    bottom: tuple[tuple[str, str], ...]
    top: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ImportPlan:
    """What ``import_torchrec`` writes: the model spec, the source key of every table, and the
    source key of every dense weight under its shardrec name (``DenseArch.param_shapes``)."""

    spec: ModelSpec
    table_keys: Mapping[str, str]
    dense_keys: Mapping[str, str]


@dataclass(frozen=True)
class ImportSummary:
    """What ``import_torchrec`` did: the manifest written and, per feature file
    (``features/users.npz``, ...), ``"copied"``, ``"empty"`` or ``"kept"``."""

    manifest: Manifest
    features: Mapping[str, str] = field(default_factory=dict)


def _layers(found: dict[int, dict[str, str]], what: str) -> tuple[tuple[str, str], ...]:
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{what}: layers {sorted(found)} are not numbered 0..{len(found) - 1}")
    for i, params in found.items():
        if set(params) != {"weight", "bias"}:
            raise CheckpointError(f"{what}: layer {i} has {sorted(params)}, expected weight and bias")
    return tuple((found[i]["weight"], found[i]["bias"]) for i in range(len(found)))


def _no_dlrm_message(keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:6]) + (", ..." if len(keys) > 6 else "")
    if any(re.search(r"(^|\.)embedding_bags\.[^.]+\.weight$", k) for k in keys):
        return f"found an EmbeddingBagCollection but no DLRM around it ({shown}); {_LAYOUT_HINT}"
    if any(re.search(r"(^|\.)embeddings\.[^.]+\.weight$", k) for k in keys):
        return f"found an EmbeddingCollection (unpooled), which a DLRM does not use ({shown}); {_LAYOUT_HINT}"
    return f"no DLRM embedding tables found (keys: {shown}); {_LAYOUT_HINT}"


def find_dlrm_keys(keys: Sequence[str], prefix: str | None = None) -> DlrmKeys:
    """Classify every key of a state dict as a DLRM table or MLP weight under one prefix: the
    one the table keys share, or ``prefix`` (then keys outside it are ignored). CheckpointError
    when there is no DLRM, several, an interaction with weights (DLRM_DCN, DLRM_Projection) or
    any other key."""
    explicit = prefix is not None
    matches = [(m.group("prefix"), m.group("table"), k) for k in keys if (m := _TABLE_RE.match(k))]
    if explicit:
        matches = [x for x in matches if x[0] == prefix]
    if not matches:
        raise CheckpointError(_no_dlrm_message(keys) + ("" if prefix is None else f" (with MAP prefix {prefix!r})"))
    prefixes = sorted({p for p, _, _ in matches})
    if len(prefixes) > 1:
        raise CheckpointError(f"the state dict holds several DLRMs (key prefixes {prefixes}): set prefix in the MAP")
    prefix = prefixes[0]
    tables = {t: k for _, t, k in matches}
    bottom: dict[int, dict[str, str]] = {}
    top: dict[int, dict[str, str]] = {}
    last: dict[str, str] = {}
    unknown, interaction = [], []
    table_keys = set(tables.values())
    for k in keys:
        if k in table_keys or (explicit and not k.startswith(prefix)):
            continue
        rest = k[len(prefix) :] if k.startswith(prefix) else None
        if rest is not None and (m := _BOTTOM_RE.match(rest)):
            bottom.setdefault(int(m.group("i")), {})[m.group("p")] = k
        elif rest is not None and (m := _TOP_MLP_RE.match(rest)):
            top.setdefault(int(m.group("i")), {})[m.group("p")] = k
        elif rest is not None and (m := _TOP_LAST_RE.match(rest)):
            last[m.group("p")] = k
        elif rest is not None and rest.startswith("inter_arch."):
            interaction.append(k)
        else:
            unknown.append(k)
    if interaction:
        raise CheckpointError(
            f"the interaction has weights ({', '.join(interaction[:4])}): a DLRM_DCN or DLRM_Projection? "
            "Only torchrec.models.dlrm.DLRM's pairwise dot interaction (no weights) is supported"
        )
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} key(s) are not part of a plain DLRM: {', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}; {_LAYOUT_HINT}"
        )
    if not bottom or not last:
        raise CheckpointError(f"no {'dense_arch' if not bottom else 'over_arch'} weights under prefix {prefix!r}; {_LAYOUT_HINT}")
    top_layers = _layers(top, f"{prefix}over_arch.model.0") + _layers({0: last}, f"{prefix}over_arch.model.1")
    return DlrmKeys(prefix, MappingProxyType(tables), _layers(bottom, f"{prefix}dense_arch"), top_layers)


def _check_tables(file: StateDictFile, keys: DlrmKeys, tmap: TorchRecMap) -> dict[str, tuple[int, int]]:
    """(rows, dim) of every table after checking the MAP reads exactly the state dict's tables,
    in an order TorchRec's SparseArch can have, and that every table has one dim."""
    shapes = {t: file.shape(k) for t, k in keys.tables.items()}
    for t, s in shapes.items():
        if len(s) != 2 or s[0] < 1 or s[1] < 1:
            raise CheckpointError(f"table {t!r} ({keys.tables[t]}): expected a [rows, dim] tensor, got shape {list(s)}")
    unknown = [t for t in tmap.tables if t not in shapes]
    if unknown:
        raise ConfigError(f"MAP: table(s) {unknown} are not in the state dict, which has {list(shapes)}")
    unread = [t for t in shapes if t not in tmap.tables]
    if unread:
        raise ConfigError(f"MAP: no sparse feature reads table(s) {unread} of the state dict (list every feature_name of every table)")
    runs = [f.table for i, f in enumerate(tmap.sparse_features) if i == 0 or tmap.sparse_features[i - 1].table != f.table]
    if len(runs) != len(set(runs)):
        raise ConfigError(
            f"MAP: the features of a table must be listed together, in TorchRec's SparseArch order "
            f"(tables in config order, each one's feature_names in order); tables in MAP order: {runs}"
        )
    if file.kind == "torch.save" and list(tmap.tables) != list(shapes):
        raise ConfigError(
            f"MAP: features read the tables in the order {list(tmap.tables)}, but the state dict has them in the "
            f"order {list(shapes)}, which is the order TorchRec's SparseArch concatenates them in: reorder [[sparse_features]]"
        )
    by_dim: dict[int, list[str]] = {}
    for t in tmap.tables:
        by_dim.setdefault(shapes[t][1], []).append(t)
    if len(by_dim) > 1:
        listed = "; ".join(f"dim {d}: {', '.join(ts)}" for d, ts in by_dim.items())
        raise CheckpointError(
            f"tables of different dims ({listed}): shardrec's DLRM takes pairwise dot products of the pooled "
            "features, so every table needs the same dim; export tables of one dim"
        )
    return {t: (s[0], s[1]) for t, s in shapes.items()}


def _mlp(file: StateDictFile, layers: Sequence[tuple[str, str]], width: int, what: str) -> tuple[int, ...]:
    """The output sizes of a chain of Linear layers that takes ``width`` inputs."""
    sizes = []
    for w_key, b_key in layers:
        w, b = file.shape(w_key), file.shape(b_key)
        if len(w) != 2 or w[1] != width or b != (w[0],):
            raise CheckpointError(f"{what}: {w_key} {list(w)} / {b_key} {list(b)} do not take {width} inputs")
        sizes.append(w[0])
        width = w[0]
    return tuple(sizes)


def plan_import(file: StateDictFile, tmap: TorchRecMap) -> ImportPlan:
    """Every check of an import, nothing written: the model spec and where each tensor is.
    CheckpointError for a state dict problem, ConfigError for a MAP that does not fit it."""
    keys = find_dlrm_keys(file.keys, tmap.prefix)
    tables = _check_tables(file, keys, tmap)
    dim = next(iter(tables.values()))[1]
    num_dense, num_sparse = len(tmap.dense_features), len(tmap.sparse_features)
    bottom_in = file.shape(keys.bottom[0][0])
    if len(bottom_in) == 2 and bottom_in[1] != num_dense:
        raise ConfigError(f"MAP lists {num_dense} dense feature(s) but dense_arch takes {bottom_in[1]} inputs ({keys.bottom[0][0]})")
    bottom = _mlp(file, keys.bottom, num_dense, f"{keys.prefix}dense_arch")
    if bottom[-1] != dim:
        raise CheckpointError(f"dense_arch ends at {bottom[-1]} but the tables have dim {dim}")
    arch_in = dim + num_sparse * (num_sparse + 1) // 2
    top_in = file.shape(keys.top[0][0])
    if len(top_in) == 2 and top_in[1] != arch_in:
        raise ConfigError(
            f"over_arch takes {top_in[1]} inputs, but D + F(F+1)/2 = {arch_in} for D = {dim} and the F = {num_sparse} "
            "sparse features of the MAP: list every feature_name of every table, once"
        )
    top = _mlp(file, keys.top, arch_in, f"{keys.prefix}over_arch")
    arch = DenseArch(num_dense, dim, num_sparse, bottom, top)
    dense_keys: dict[str, str] = {}
    for prefix, layers in (("bottom_mlp", keys.bottom), ("top_mlp", keys.top)):
        for i, (w_key, b_key) in enumerate(layers):
            dense_keys[f"{prefix}.{2 * i}.weight"], dense_keys[f"{prefix}.{2 * i}.bias"] = w_key, b_key
    for k in [*keys.tables.values(), *dense_keys.values()]:
        if file.dtype(k) not in EXACT_AS_FLOAT32:
            raise CheckpointError(f"{k}: dtype {file.dtype(k)} is not stored exactly as float32 (supported: {list(EXACT_AS_FLOAT32)})")
    spec = ModelSpec(
        name=tmap.name,
        tables=tuple(TableSpec(t, *tables[t]) for t in tmap.tables),
        sparse_features=tmap.sparse_features,
        dense_features=tmap.dense_features,
        dense_arch=arch,
    )
    if arch.top_mlp[-1] != 1:
        raise CheckpointError(f"over_arch ends at {arch.top_mlp[-1]} outputs; shardrec scores one logit (last layer size 1)")
    spec.validate()
    return ImportPlan(spec, MappingProxyType({t: keys.tables[t] for t in tmap.tables}), MappingProxyType(dense_keys))


def _chunks(file: StateDictFile, key: str, rows: int, dim: int, chunk_bytes: int) -> Iterator[np.ndarray]:
    step = max(1, chunk_bytes // (dim * 4))
    for start in range(0, rows, step):
        yield file.read(key, start, start + step)


def empty_feature_rows(spec: ModelSpec, side: FeatureSide) -> dict[str, np.ndarray]:
    """Feature rows of no entity (docs/checkpoint.md layout): every entity then serves with
    empty stored bags and the dense defaults."""
    layout = FeatureLayout(spec, side)
    rows = {layout.id_key: np.zeros(0, np.int64)}
    for f in layout.sparse:
        rows[f"{f.name}.values"], rows[f"{f.name}.lengths"] = np.zeros(0, np.int64), np.zeros(0, np.int32)
    rows.update({d.name: np.zeros(0, np.float32) for d in layout.dense})
    return rows


def _given_features(spec: ModelSpec, features: StoreOrUri | None) -> dict[FeatureSide, dict[str, np.ndarray]]:
    """The feature rows below the ``features`` root (``features/users.npz`` and / or
    ``features/items.npz``), each checked against ``spec``; {} when ``features`` is None."""
    if features is None:
        return {}
    store = as_store(features)
    given = {}
    for side in FeatureSide:
        if store.exists(feature_file(side)):
            rows = load_feature_rows(store, side)
            layout = FeatureLayout(spec, side)
            layout.validate(rows, rows[layout.id_key])
            given[side] = rows
    if not given:
        raise ConfigError(f"--features {store.uri}: neither {feature_file(FeatureSide.USER)} nor {feature_file(FeatureSide.ITEM)} is there")
    return given


def import_torchrec(
    state_dict: str | os.PathLike[str],
    map_path: str | os.PathLike[str] | TorchRecMap,
    out: StoreOrUri,
    *,
    version: Version | None = None,
    features: StoreOrUri | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    created_at: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportSummary:
    """Write base ``version`` (default ``next_version(out)``) of ``out`` from a TorchRec DLRM
    state dict and its MAP, then the feature files: those below the ``features`` root when
    given (checked against the model first), else empty ones where ``out`` has none (existing
    ones are kept). Tables stream ``chunk_bytes`` of rows at a time; ``progress`` gets a line
    per table. Every check runs before anything is written (``plan_import``)."""
    file = open_state_dict(state_dict)
    tmap = map_path if isinstance(map_path, TorchRecMap) else load_map(map_path)
    plan = plan_import(file, tmap)
    given = _given_features(plan.spec, features)
    store = as_store(out)
    version = next_version(store) if version is None else version
    say = progress or (lambda _line: None)
    with VersionWriter(store, version, plan.spec, created_at=created_at) as w:
        for t in plan.spec.tables:
            t0 = time.perf_counter()
            w.write_table(t.name, _chunks(file, plan.table_keys[t.name], t.rows, t.dim, chunk_bytes))
            say(f"table {t.name}: {t.rows:,} x {t.dim} ({t.size_bytes / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f} s")
        w.write_dense({name: file.read(key) for name, key in plan.dense_keys.items()})
        manifest = w.commit()
    written = {}
    for side in FeatureSide:
        rel = feature_file(side)
        if side in given:
            save_npz(store.local_path(rel), given[side])
            written[rel] = "copied"
        elif not store.exists(rel):
            save_npz(store.local_path(rel), empty_feature_rows(plan.spec, side))
            written[rel] = "empty"
        else:
            written[rel] = "kept"
    return ImportSummary(manifest, MappingProxyType(written))
