"""The demo model: a synthetic DLRM checkpoint plus stored feature rows, from a seed.

``synthesize(root, "demo")`` writes base version 1 of model ``"demo"`` (format v1, see
docs/checkpoint.md) and ``features/users.npz`` / ``features/items.npz``. The preset only changes
sizes; the features, their order and the tables are the same for every preset:

=================  ===============  ====  =======  ===  ========  =========
sparse feature     table            side  pooling  bag  mapping   source
=================  ===============  ====  =======  ===  ========  =========
user_id            users            user  sum      1    modulo    entity_id
user_history       items            user  mean     50   identity  stored
user_country       countries        user  sum      1    identity  stored
user_age_bucket    age_buckets      user  sum      1    identity  stored
user_device        devices          user  sum      1    modulo    stored
item_id            items            item  sum      1    identity  entity_id
item_category      item_categories  item  sum      1    identity  stored
item_tags          tags             item  max      5    modulo    stored
=================  ===============  ====  =======  ===  ========  =========

dense features: user_activity (user, 0.0), user_tenure (user, 0.0), item_ctr (item, 0.02),
item_age (item, 0.5).

Determinism: the same seed gives byte-identical tables and identical feature arrays. Every
table, the dense weights and every feature array draw from their own generator,
``SeedSequence(seed, spawn_key=(stream, index))``, so the output depends neither on the order
of generation nor on the chunk size. Tables are generated and written ``TABLE_CHUNK_BYTES`` at a
time: the large preset (> 4 GiB) never holds a table in memory.

Drift deltas: ``synthesize_deltas(root, "demo", 3)`` writes deltas on top of the latest version,
each parent = the previous one, each changing a ``drift`` fraction of the rows of every table
(ids drawn with ``power_law_ids``, so hot rows change more often) to new normal(0, TABLE_STD)
values; the deltas of even versions also replace the dense weights with a small perturbation.
Their streams are keyed by the version written, so they are deterministic per seed too.

Feature rows: users ``0 .. U-1`` and items ``0 .. I-1`` have stored rows (low ids are the hot
ids of ``power_law_ids``, so hot entities have features). Identity features store row numbers
in ``[0, rows)``; modulo features store raw int64 values (negative ones included) whose
``value mod rows`` follows the power law, which exercises the mapping.

Pure module: numpy only (no torch, no grpc).
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from services.core.checkpoint.manifest import Manifest, ModelSpec
from services.core.checkpoint.storage import CheckpointStore
from services.core.checkpoint.writer import VersionWriter
from services.core.errors import CheckpointError, ConfigError
from services.core.types import (
    DenseArch,
    DenseFeatureSpec,
    FeatureSide,
    FeatureSource,
    MappingKind,
    PoolingType,
    SparseFeatureSpec,
    TableSpec,
    Version,
)

MODEL_NAME = "demo"
FEATURES_DIR = "features"
# Tables are generated and written this many bytes at a time.
TABLE_CHUNK_BYTES = 64 << 20
# Embedding values are normal(0, TABLE_STD) whatever the dim. With nn.Linear-style dense
# weights this gives a logit std of about 1 over (user, item) pairs for the small and demo
# presets (measured: 1st..99th percentile of scores ~0.08 .. 0.96, almost none saturated); a
# 1/sqrt(dim) scale instead leaves every score within 0.5 +- 0.02.
TABLE_STD = 2.0
# Raw values of modulo features are ``row + rows * k`` with k uniform in [-2**20, 2**20).
_MODULO_SPREAD = 1 << 20

# Random streams (the first spawn_key element); never renumber, or outputs change.
_STREAM_TABLE = 1
_STREAM_DENSE = 2
_STREAM_USERS = 3
_STREAM_ITEMS = 4
_STREAM_DELTA_IDS = 5
_STREAM_DELTA_ROWS = 6
_STREAM_DELTA_DENSE = 7
# A drift delta that replaces the dense weights multiplies each by (1 + DENSE_DRIFT * normal).
DENSE_DRIFT = 0.01
# Rounds of power-law draws a drift delta makes to find its unique ids before it fills the rest
# uniformly from the rows not drawn yet (only a large drift on a heavy-tailed table gets there).
_DRIFT_DRAW_ROUNDS = 8

_S = FeatureSide
SPARSE_FEATURES: tuple[SparseFeatureSpec, ...] = (
    SparseFeatureSpec("user_id", "users", _S.USER, PoolingType.SUM, 1, MappingKind.MODULO, FeatureSource.ENTITY_ID),
    SparseFeatureSpec("user_history", "items", _S.USER, PoolingType.MEAN, 50, MappingKind.IDENTITY, FeatureSource.STORED),
    SparseFeatureSpec("user_country", "countries", _S.USER, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.STORED),
    SparseFeatureSpec("user_age_bucket", "age_buckets", _S.USER, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.STORED),
    SparseFeatureSpec("user_device", "devices", _S.USER, PoolingType.SUM, 1, MappingKind.MODULO, FeatureSource.STORED),
    SparseFeatureSpec("item_id", "items", _S.ITEM, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.ENTITY_ID),
    SparseFeatureSpec("item_category", "item_categories", _S.ITEM, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.STORED),
    SparseFeatureSpec("item_tags", "tags", _S.ITEM, PoolingType.MAX, 5, MappingKind.MODULO, FeatureSource.STORED),
)
DENSE_FEATURES: tuple[DenseFeatureSpec, ...] = (
    DenseFeatureSpec("user_activity", _S.USER, 0.0),
    DenseFeatureSpec("user_tenure", _S.USER, 0.0),
    DenseFeatureSpec("item_ctr", _S.ITEM, 0.02),
    DenseFeatureSpec("item_age", _S.ITEM, 0.5),
)


@dataclass(frozen=True)
class Preset:
    """Sizes of the demo model: table rows (in table order), embedding dim, MLPs, and how many
    users / items (ids ``0 .. n-1``) get stored feature rows."""

    name: str
    dim: int
    table_rows: tuple[tuple[str, int], ...]
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    users_with_features: int
    items_with_features: int

    def rows(self, table: str) -> int:
        return dict(self.table_rows)[table]


def _rows(users: int, items: int, categories: int, tags: int, countries: int, ages: int, devices: int) -> tuple[tuple[str, int], ...]:
    """Table rows in table order (the order of ``ModelSpec.tables``)."""
    return (
        ("users", users),
        ("items", items),
        ("item_categories", categories),
        ("tags", tags),
        ("countries", countries),
        ("age_buckets", ages),
        ("devices", devices),
    )


_SMALL_MLP = {"bottom_mlp": (32, 16), "top_mlp": (64, 32, 1)}
_BIG_MLP = {"bottom_mlp": (256, 128, 64), "top_mlp": (512, 256, 1)}

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "small": Preset(
            name="small",
            dim=16,
            table_rows=_rows(users=2000, items=5000, categories=50, tags=300, countries=20, ages=8, devices=12),
            users_with_features=2000,
            items_with_features=5000,
            **_SMALL_MLP,
        ),
        "demo": Preset(
            name="demo",
            dim=64,
            table_rows=_rows(
                users=1_000_000, items=500_000, categories=2_000, tags=20_000, countries=200, ages=10, devices=64
            ),
            users_with_features=200_000,
            items_with_features=500_000,
            **_BIG_MLP,
        ),
        "large": Preset(
            name="large",
            dim=64,
            table_rows=_rows(
                users=10_000_000, items=8_000_000, categories=20_000, tags=1_000_000, countries=250, ages=10, devices=128
            ),
            users_with_features=1_000_000,
            items_with_features=1_000_000,
            **_BIG_MLP,
        ),
    }
)


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def model_spec(preset: str | Preset) -> ModelSpec:
    """The ModelSpec of the demo model at ``preset``'s sizes (model name ``"demo"`` always)."""
    p = _preset(preset)
    spec = ModelSpec(
        name=MODEL_NAME,
        tables=tuple(TableSpec(name, rows, p.dim) for name, rows in p.table_rows),
        sparse_features=SPARSE_FEATURES,
        dense_features=DENSE_FEATURES,
        dense_arch=DenseArch(
            num_dense=len(DENSE_FEATURES),
            embedding_dim=p.dim,
            num_sparse=len(SPARSE_FEATURES),
            bottom_mlp=p.bottom_mlp,
            top_mlp=p.top_mlp,
        ),
    )
    spec.validate()
    return spec


def power_law_ids(rng: np.random.Generator, size: int, num_rows: int, alpha: float = 1.1) -> np.ndarray:
    """``size`` int64 ids in ``[0, num_rows)``, Zipf-like: P(id) ~ (id + 1) ** -alpha.

    Drawn by the inverse CDF of a Pareto bounded to ``[1, num_rows + 1)`` (vectorized); low ids
    are the hottest. With alpha 1.1 and 5000 rows, the lowest 1% of ids take about half the draws.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    u = rng.random(size)
    hi = float(num_rows) + 1.0
    if abs(alpha - 1.0) < 1e-9:
        x = np.exp(u * np.log(hi))
    else:
        e = 1.0 - alpha
        x = (1.0 - u * (1.0 - hi**e)) ** (1.0 / e)
    ids = x.astype(np.int64) - 1
    np.clip(ids, 0, num_rows - 1, out=ids)
    return ids


def _stream(seed: int, stream: int, *index: int) -> np.random.Generator:
    """The generator of one stream: every table, array and weight set has its own."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, *index)))


def _table_chunks(seed: int, table_index: int, rows: int, dim: int) -> Iterator[np.ndarray]:
    """float32 [k, dim] chunks of normal(0, TABLE_STD) from the table's own generator.

    The generator draws value by value, so the bytes do not depend on the chunk size."""
    step = max(1, TABLE_CHUNK_BYTES // (dim * 4))
    scale = np.float32(TABLE_STD)
    rng = _stream(seed, _STREAM_TABLE, table_index)
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), dim), dtype=np.float32)
        chunk *= scale
        yield chunk


def dense_weights(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Dense weights initialised like ``torch.nn.Linear``: weight and bias uniform in
    ``±1/sqrt(fan_in)``, float32, named as ``DenseArch.param_shapes()`` names them."""
    rng = _stream(seed, _STREAM_DENSE, 0)
    state: dict[str, np.ndarray] = {}
    shapes = spec.dense_arch.param_shapes()
    fan_in = 0
    for name, shape in shapes.items():
        if name.endswith(".weight"):
            fan_in = shape[1]
        bound = 1.0 / np.sqrt(fan_in)
        state[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return state


def _modulo_raw(rng: np.random.Generator, rows_wanted: np.ndarray, num_rows: int) -> np.ndarray:
    """Raw int64 values with ``value mod num_rows == rows_wanted`` (negative values included)."""
    k = rng.integers(-_MODULO_SPREAD, _MODULO_SPREAD, size=rows_wanted.shape, dtype=np.int64)
    return rows_wanted + k * num_rows


def feature_rows(preset: str | Preset, side: FeatureSide | str, seed: int = 0) -> dict[str, np.ndarray]:
    """The stored feature rows of one side, as written to ``features/<users|items>.npz``.

    Keys: ``user_id`` / ``item_id`` int64 [N]; per stored sparse feature ``<name>.values`` int64
    and ``<name>.lengths`` int32 [N] (CSR: row i's values are the next ``lengths[i]``); per
    dense feature ``<name>`` float32 [N].
    """
    p = _preset(preset)
    side = FeatureSide(side)
    if side is FeatureSide.USER:
        n, stream, id_key = p.users_with_features, _STREAM_USERS, "user_id"
    else:
        n, stream, id_key = p.items_with_features, _STREAM_ITEMS, "item_id"
    out: dict[str, np.ndarray] = {id_key: np.arange(n, dtype=np.int64)}
    for i, f in enumerate(SPARSE_FEATURES):
        if f.side is not side or f.source is not FeatureSource.STORED:
            continue
        rng = _stream(seed, stream, i)
        rows = p.rows(f.table)
        if f.name == "user_history":
            # Exponential lengths (mean ~20) capped at the bag limit: 0 .. 50, some at 50.
            lengths = np.minimum(rng.exponential(23.0, size=n).astype(np.int64), f.max_bag_len)
            values = power_law_ids(rng, int(lengths.sum()), rows)
        elif f.name == "user_age_bucket":
            lengths = np.ones(n, dtype=np.int64)
            values = rng.integers(0, rows, size=n, dtype=np.int64)
        else:
            lengths = rng.integers(1, f.max_bag_len + 1, size=n) if f.max_bag_len > 1 else np.ones(n, dtype=np.int64)
            values = power_law_ids(rng, int(lengths.sum()), rows)
        if f.mapping is MappingKind.MODULO:
            values = _modulo_raw(rng, values, rows)
        out[f"{f.name}.values"] = values.astype(np.int64, copy=False)
        out[f"{f.name}.lengths"] = lengths.astype(np.int32)
    base = len(SPARSE_FEATURES)
    for i, f in enumerate(DENSE_FEATURES):
        if f.side is not side:
            continue
        rng = _stream(seed, stream, base + i)
        if f.name == "user_activity":
            v = rng.beta(2.0, 5.0, size=n)
        elif f.name == "item_ctr":
            v = rng.beta(2.0, 80.0, size=n)
        else:  # user_tenure, item_age: normalised to [0, 1)
            v = rng.random(n)
        out[f.name] = v.astype(np.float32)
    return out


def feature_file(side: FeatureSide | str) -> str:
    """Path of one side's feature rows below the checkpoint root."""
    return f"{FEATURES_DIR}/{'users' if FeatureSide(side) is FeatureSide.USER else 'items'}.npz"


def save_npz(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write atomically: a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_feature_rows(root: CheckpointStore | str | os.PathLike[str], side: FeatureSide | str) -> dict[str, np.ndarray]:
    """Read ``features/<users|items>.npz`` below ``root`` (no pickle) and check its CSR arrays:
    every ``<f>.lengths`` has one entry per id and sums to ``len(<f>.values)``."""
    store = root if isinstance(root, CheckpointStore) else CheckpointStore(root)
    rel = feature_file(side)
    path = store.local_path(rel)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{store.uri}: missing feature file {rel}") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{store.uri}: {rel} is not a readable .npz file: {e}") from e
    id_key = "user_id" if FeatureSide(side) is FeatureSide.USER else "item_id"
    if id_key not in arrays:
        raise CheckpointError(f"{store.uri}: {rel} has no {id_key!r} array (keys: {sorted(arrays)})")
    n = len(arrays[id_key])
    for key, lengths in arrays.items():
        if not key.endswith(".lengths"):
            continue
        name = key[: -len(".lengths")]
        values = arrays.get(f"{name}.values")
        if values is None or len(lengths) != n or int(lengths.sum()) != len(values) or (lengths < 0).any():
            raise CheckpointError(
                f"{store.uri}: {rel}: feature {name!r} is not valid CSR for {n} rows "
                f"(lengths {len(lengths)} summing to {int(lengths.sum())}, values "
                f"{None if values is None else len(values)})"
            )
    return arrays


def synthesize(
    out_root: CheckpointStore | str | os.PathLike[str],
    preset: str | Preset,
    seed: int = 0,
    version: Version = 1,
    *,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Write base ``version`` of the demo model at ``preset``'s sizes below ``out_root``, then
    ``features/users.npz`` and ``features/items.npz``. Returns the manifest.

    The version is published first (refused, with nothing written, when it already exists);
    feature files are replaced atomically afterwards. ``progress`` receives one line per table.
    """
    p = _preset(preset)
    spec = model_spec(p)
    store = out_root if isinstance(out_root, CheckpointStore) else CheckpointStore(out_root)
    say = progress or (lambda _line: None)
    with VersionWriter(store, version, spec) as w:
        for i, t in enumerate(spec.tables):
            t0 = time.perf_counter()
            w.write_table(t.name, _table_chunks(seed, i, t.rows, t.dim))
            say(f"table {t.name}: {t.rows} x {t.dim} ({t.size_bytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")
        w.write_dense(dense_weights(spec, seed))
        t0 = time.perf_counter()
        manifest = w.commit()
        say(f"version {version}: checksummed and published in {time.perf_counter() - t0:.1f} s")
    for side in (FeatureSide.USER, FeatureSide.ITEM):
        t0 = time.perf_counter()
        save_npz(store.local_path(feature_file(side)), feature_rows(p, side, seed))
        say(f"{feature_file(side)} written in {time.perf_counter() - t0:.1f} s")
    return manifest
