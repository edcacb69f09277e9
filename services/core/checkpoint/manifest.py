"""Model manifest and checkpoint format v1 (see docs/checkpoint.md).

A checkpoint root (a URI; ``file://`` or a plain path today) holds::

    versions/<N>/manifest.json   this version: kind, parent, model spec, files + sha256
    versions/<N>/tables/<table>.npy        base: the whole table, float32 [rows, dim], C order
    versions/<N>/tables/<table>.ids.npy    delta: int64 [k] changed global row ids, strictly increasing
    versions/<N>/tables/<table>.rows.npy   delta: float32 [k, dim] their new values, same order
    versions/<N>/dense.safetensors         dense weights (no pickle); optional in a delta
    versions/<N>/COMPLETE                  written last: sha256 of manifest.json
    features/users.npz, features/items.npz stored user / item feature rows (for Redis)

Pure module: no torch, no grpc.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core.errors import CheckpointError
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

FORMAT = "shardrec.checkpoint/v1"
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE"
DENSE_FILE = "dense.safetensors"
KIND_BASE = "base"
KIND_DELTA = "delta"
# On-disk dtypes: table rows (base tables and delta rows) and delta row ids.
TABLE_DTYPE = np.dtype("<f4")
ID_DTYPE = np.dtype("<i8")


def table_file(table: str) -> str:
    """Path of a base table inside a version folder."""
    return f"tables/{table}.npy"


def delta_ids_file(table: str) -> str:
    return f"tables/{table}.ids.npy"


def delta_rows_file(table: str) -> str:
    return f"tables/{table}.rows.npy"


def version_dir(version: Version) -> str:
    return f"versions/{version}"


def delta_ids_problem(ids: np.ndarray, num_rows: int) -> str | None:
    """What is wrong with a delta's row ids (1-D int), or None when they are strictly
    increasing and in ``[0, num_rows)``: the one rule the writer and the reader both enforce.

    Vectorized: one pass over ``ids``, no per-id Python loop.
    """
    if len(ids) == 0:
        return None
    steps = np.diff(ids)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = int(bad[0])
        if steps[i] == 0:
            return f"id {int(ids[i])} is listed twice (ids must be unique)"
        return f"ids[{i + 1}] = {int(ids[i + 1])} follows ids[{i}] = {int(ids[i])} (ids must be sorted strictly increasing)"
    if ids[0] < 0:
        return f"id {int(ids[0])} is outside [0, {num_rows})"
    if ids[-1] >= num_rows:
        return f"id {int(ids[-1])} is outside [0, {num_rows})"
    return None


def spec_differences(expected: "ModelSpec", actual: "ModelSpec") -> list[str]:
    """How ``actual`` differs from ``expected``, one readable line per difference ([] when equal).

    A delta must have exactly its parent's spec; this names what differs (table rows, a feature,
    the dense architecture, ...) so a refusal can say why.
    """
    if expected == actual:
        return []
    out: list[str] = []
    if expected.name != actual.name:
        out.append(f"model name {actual.name!r}, expected {expected.name!r}")
    want = {t.name: t for t in expected.tables}
    got = {t.name: t for t in actual.tables}
    for name in [n for n in want if n not in got]:
        out.append(f"table {name!r} is missing")
    for name in [n for n in got if n not in want]:
        out.append(f"table {name!r} is not in the expected spec")
    for name in [n for n in want if n in got and want[n] != got[n]]:
        w, g = want[name], got[name]
        out.append(f"table {name!r}: [{g.rows}, {g.dim}] {g.dtype}, expected [{w.rows}, {w.dim}] {w.dtype}")
    if not out and [t.name for t in expected.tables] != [t.name for t in actual.tables]:
        out.append(f"table order {list(actual.table_names)}, expected {list(expected.table_names)}")
    for what, w_items, g_items in (
        ("sparse features", expected.sparse_features, actual.sparse_features),
        ("dense features", expected.dense_features, actual.dense_features),
    ):
        if w_items != g_items:
            out.append(f"{what} {[f.name for f in g_items]} differ from the expected {[f.name for f in w_items]}")
    if expected.dense_arch != actual.dense_arch:
        out.append(f"dense_arch {actual.dense_arch}, expected {expected.dense_arch}")
    return out


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: its tables, features and dense architecture."""

    name: str
    tables: tuple[TableSpec, ...]
    sparse_features: tuple[SparseFeatureSpec, ...]
    dense_features: tuple[DenseFeatureSpec, ...]
    dense_arch: DenseArch

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    def features(self, side: FeatureSide) -> tuple[SparseFeatureSpec, ...]:
        return tuple(f for f in self.sparse_features if f.side is side)

    def validate(self) -> None:
        """Raise CheckpointError when the spec is inconsistent."""
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise CheckpointError(f"model {self.name!r}: duplicate table names {names}")
        dims = {t.dim for t in self.tables}
        if dims != {self.dense_arch.embedding_dim}:
            raise CheckpointError(
                f"model {self.name!r}: every table dim must equal dense_arch.embedding_dim "
                f"{self.dense_arch.embedding_dim}, got {sorted(dims)}"
            )
        for f in self.sparse_features:
            if f.table not in names:
                raise CheckpointError(f"feature {f.name!r} names unknown table {f.table!r}")
            if f.max_bag_len < 1:
                raise CheckpointError(f"feature {f.name!r}: max_bag_len must be >= 1")
        if len(self.sparse_features) != self.dense_arch.num_sparse:
            raise CheckpointError(
                f"model {self.name!r}: {len(self.sparse_features)} sparse features but "
                f"dense_arch.num_sparse = {self.dense_arch.num_sparse}"
            )
        if len(self.dense_features) != self.dense_arch.num_dense:
            raise CheckpointError(
                f"model {self.name!r}: {len(self.dense_features)} dense features but "
                f"dense_arch.num_dense = {self.dense_arch.num_dense}"
            )
        if self.dense_arch.bottom_mlp[-1] != self.dense_arch.embedding_dim:
            raise CheckpointError("dense_arch.bottom_mlp must end at embedding_dim")
        if self.dense_arch.top_mlp[-1] != 1:
            raise CheckpointError("dense_arch.top_mlp must end at 1")

    def to_json(self) -> dict[str, Any]:
        a = self.dense_arch
        return {
            "name": self.name,
            "tables": [{"name": t.name, "rows": t.rows, "dim": t.dim, "dtype": t.dtype} for t in self.tables],
            "sparse_features": [
                {
                    "name": f.name,
                    "table": f.table,
                    "side": f.side.value,
                    "pooling": f.pooling.value,
                    "max_bag_len": f.max_bag_len,
                    "mapping": f.mapping.value,
                    "source": f.source.value,
                }
                for f in self.sparse_features
            ],
            "dense_features": [
                {"name": f.name, "side": f.side.value, "default": f.default} for f in self.dense_features
            ],
            "dense_arch": {
                "kind": "dlrm",
                "num_dense": a.num_dense,
                "embedding_dim": a.embedding_dim,
                "num_sparse": a.num_sparse,
                "bottom_mlp": list(a.bottom_mlp),
                "top_mlp": list(a.top_mlp),
            },
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
        try:
            a = d["dense_arch"]
            if a.get("kind", "dlrm") != "dlrm":
                raise CheckpointError(f"unsupported dense_arch.kind {a.get('kind')!r}")
            spec = cls(
                name=str(d["name"]),
                tables=tuple(
                    TableSpec(str(t["name"]), int(t["rows"]), int(t["dim"]), str(t.get("dtype", "float32")))
                    for t in d["tables"]
                ),
                sparse_features=tuple(
                    SparseFeatureSpec(
                        name=str(f["name"]),
                        table=str(f["table"]),
                        side=FeatureSide(f["side"]),
                        pooling=PoolingType(f["pooling"]),
                        max_bag_len=int(f.get("max_bag_len", 1)),
                        mapping=MappingKind(f.get("mapping", "identity")),
                        source=FeatureSource(f.get("source", "stored")),
                    )
                    for f in d["sparse_features"]
                ),
                dense_features=tuple(
                    DenseFeatureSpec(str(f["name"]), FeatureSide(f["side"]), float(f.get("default", 0.0)))
                    for f in d["dense_features"]
                ),
                dense_arch=DenseArch(
                    num_dense=int(a["num_dense"]),
                    embedding_dim=int(a["embedding_dim"]),
                    num_sparse=int(a["num_sparse"]),
                    bottom_mlp=tuple(int(x) for x in a["bottom_mlp"]),
                    top_mlp=tuple(int(x) for x in a["top_mlp"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed model spec in manifest: {e!r}") from e
        spec.validate()
        return spec


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: path relative to the version folder, size and sha256 hex."""

    path: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """``versions/<N>/manifest.json``: one version of a model, base or delta."""

    version: Version
    kind: str  # KIND_BASE or KIND_DELTA
    parent: Version | None
    model: ModelSpec
    files: tuple[FileEntry, ...] = field(default_factory=tuple)
    created_at: str = ""

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise CheckpointError(f"version {self.version}: manifest lists no file {path!r}")

    def lists(self, path: str) -> bool:
        """True when the manifest lists ``path``."""
        return any(f.path == path for f in self.files)

    def table_files(self, table: str) -> tuple[str, ...]:
        """The files of this version that hold rows of ``table``: a base's ``tables/<t>.npy``,
        a delta's ``tables/<t>.ids.npy`` + ``tables/<t>.rows.npy`` when it changes the table
        (``()`` when it does not)."""
        if self.kind == KIND_BASE:
            paths: tuple[str, ...] = (table_file(table),)
        else:
            paths = (delta_ids_file(table), delta_rows_file(table))
        return tuple(p for p in paths if self.lists(p))

    @property
    def delta_tables(self) -> tuple[str, ...]:
        """The tables a delta changes (those whose ``tables/<t>.ids.npy`` it lists), in model
        order; ``()`` for a base."""
        if self.kind != KIND_DELTA:
            return ()
        return tuple(t for t in self.model.table_names if self.lists(delta_ids_file(t)))

    @property
    def size_bytes(self) -> int:
        """Bytes of every listed file (manifest.json and COMPLETE not counted)."""
        return sum(f.size_bytes for f in self.files)

    def to_bytes(self) -> bytes:
        d = {
            "format": FORMAT,
            "version": self.version,
            "kind": self.kind,
            "parent": self.parent,
            "created_at": self.created_at,
            "model": self.model.to_json(),
            "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in self.files],
        }
        return (json.dumps(d, indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        try:
            d = json.loads(data)
        except ValueError as e:
            raise CheckpointError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError(f"manifest format must be {FORMAT!r}, got {d.get('format') if isinstance(d, dict) else d!r}")
        try:
            version = int(d["version"])
            kind = str(d["kind"])
            parent = None if d.get("parent") is None else int(d["parent"])
            files = tuple(FileEntry(str(f["path"]), int(f["size_bytes"]), str(f["sha256"])) for f in d["files"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"malformed manifest: {e!r}") from e
        if version < 1:
            raise CheckpointError(f"manifest version must be >= 1, got {version}")
        if kind not in (KIND_BASE, KIND_DELTA):
            raise CheckpointError(f"manifest kind must be base or delta, got {kind!r}")
        if kind == KIND_DELTA and (parent is None or parent >= version):
            raise CheckpointError(f"delta {version} needs a parent version below it, got {parent}")
        return cls(version, kind, parent, ModelSpec.from_json(d["model"]), files, str(d.get("created_at", "")))
