"""A tiny made-up model for checkpoint tests: its spec, random tables and dense weights, and a
way to rewrite a version's files the way a buggy hand-written trainer would."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

from services.core.checkpoint.manifest import FileEntry, Manifest, ModelSpec
from services.core.types import (
    DenseArch,
    DenseFeatureSpec,
    FeatureSide,
    FeatureSource,
    MappingKind,
    PoolingType,
    SparseFeatureSpec,
    TableSpec,
)

DIM = 4


def tiny_spec(users: int = 10, items: int = 7, name: str = "tiny") -> ModelSpec:
    """Two tables (``users``, ``items``) of dim 4, one feature each, one dense feature."""
    return ModelSpec(
        name=name,
        tables=(TableSpec("users", users, DIM), TableSpec("items", items, DIM)),
        sparse_features=(
            SparseFeatureSpec("user_id", "users", FeatureSide.USER, PoolingType.SUM, 1, MappingKind.MODULO, FeatureSource.ENTITY_ID),
            SparseFeatureSpec("item_id", "items", FeatureSide.ITEM, PoolingType.SUM, 1, MappingKind.IDENTITY, FeatureSource.ENTITY_ID),
        ),
        dense_features=(DenseFeatureSpec("age", FeatureSide.USER),),
        dense_arch=DenseArch(num_dense=1, embedding_dim=DIM, num_sparse=2, bottom_mlp=(3, DIM), top_mlp=(5, 1)),
    )


def tiny_tables(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal((t.rows, t.dim), dtype=np.float32) for t in spec.tables}


def tiny_dense(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 100)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in spec.dense_arch.param_shapes().items()}


def republish(root: pathlib.Path, version: int, manifest: Manifest) -> None:
    """Rewrite manifest.json and a matching COMPLETE, as a (buggy) hand-written trainer would."""
    data = manifest.to_bytes()
    (root / f"versions/{version}/manifest.json").write_bytes(data)
    (root / f"versions/{version}/COMPLETE").write_text(hashlib.sha256(data).hexdigest())


def replace_file(root: pathlib.Path, manifest: Manifest, path: str, array: np.ndarray) -> None:
    """Save ``array`` as ``path`` of ``manifest``'s version and republish the manifest with the
    new size and sha256, so only the content checks (headers, ids) can catch it."""
    folder = root / f"versions/{manifest.version}"
    np.save(folder / path, array)
    data = (folder / path).read_bytes()
    entry = FileEntry(path, len(data), hashlib.sha256(data).hexdigest())
    files = tuple(entry if f.path == path else f for f in manifest.files)
    republish(root, manifest.version, Manifest(manifest.version, manifest.kind, manifest.parent, manifest.model, files, manifest.created_at))
