"""The MAP of ``shardrec checkpoint import --torchrec``: what a TorchRec state dict does not say.

A TOML file (or JSON, by its ``.json`` suffix); every key is documented in docs/import.md and
``docs/examples/torchrec_map.toml`` is a commented example. ``load_map(path)`` parses and
checks it into a ``TorchRecMap``; unknown keys are refused (a typo must not fall back to a
default silently).

Pure module: the standard library and services.core.types only.
"""

from __future__ import annotations

import json
import os
import pathlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.core.errors import ConfigError
from services.core.types import (
    DenseFeatureSpec,
    FeatureSide,
    FeatureSource,
    MappingKind,
    PoolingType,
    SparseFeatureSpec,
)

MAP_FORMAT = "shardrec.torchrec-map/v1"
# TorchRec's EmbeddingBagCollection pools with SUM or MEAN (its PoolingType has no MAX).
TORCHREC_POOLINGS = (PoolingType.SUM, PoolingType.MEAN)

_TOP_KEYS = {"format", "name", "prefix", "sparse_features", "dense_features"}
_SPARSE_KEYS = {"name", "table", "side", "pooling", "mapping", "source", "max_bag_len"}
_DENSE_KEYS = {"name", "side", "default"}


@dataclass(frozen=True)
class TorchRecMap:
    """A parsed MAP. ``sparse_features`` are in TorchRec's SparseArch order (each names its
    TorchRec table, which keeps its TorchRec name in the checkpoint); ``dense_features`` in
    the order of the dense input's columns. ``prefix`` is the DLRM's key prefix in the state
    dict, or None to find it."""

    name: str
    prefix: str | None
    sparse_features: tuple[SparseFeatureSpec, ...]
    dense_features: tuple[DenseFeatureSpec, ...]

    @property
    def tables(self) -> tuple[str, ...]:
        """The tables the features read, in order of first use (the checkpoint's table order)."""
        return tuple(dict.fromkeys(f.table for f in self.sparse_features))


def _where(what: str, i: int, entry: Mapping[str, Any]) -> str:
    name = entry.get("name")
    return f"{what}[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")


def _check_keys(where: str, entry: Any, allowed: set[str], required: tuple[str, ...]) -> None:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a table of keys, got {type(entry).__name__}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in entry]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")


def _text(where: str, entry: Mapping[str, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _choice(where: str, entry: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = entry.get(key, default)
    try:
        return kind(value)
    except ValueError:
        allowed = [m.value for m in kind]  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: {key} must be one of {allowed}, got {value!r}") from None


def _sparse(i: int, entry: Any) -> SparseFeatureSpec:
    where = _where("sparse_features", i, entry if isinstance(entry, Mapping) else {})
    _check_keys(where, entry, _SPARSE_KEYS, ("name", "table", "side", "pooling"))
    pooling = _choice(where, entry, "pooling", PoolingType)
    if pooling not in TORCHREC_POOLINGS:
        raise ConfigError(f"{where}: pooling {pooling.value!r}: TorchRec's EmbeddingBagCollection pools with sum or mean")
    source = _choice(where, entry, "source", FeatureSource, "stored")
    if source is FeatureSource.STORED and "max_bag_len" not in entry:
        raise ConfigError(f"{where}: a stored feature needs max_bag_len (the longest bag a request may carry)")
    bag = entry.get("max_bag_len", 1)
    if isinstance(bag, bool) or not isinstance(bag, int) or bag < 1:
        raise ConfigError(f"{where}: max_bag_len must be an int >= 1, got {bag!r}")
    if source is FeatureSource.ENTITY_ID and bag != 1:
        raise ConfigError(f"{where}: an entity_id feature is a bag of exactly one value: max_bag_len must be 1, got {bag}")
    table = _text(where, entry, "table")
    if "/" in table or "\\" in table or table.startswith("."):
        raise ConfigError(f"{where}: table name {table!r} cannot be a file name")
    return SparseFeatureSpec(
        name=_text(where, entry, "name"),
        table=table,
        side=_choice(where, entry, "side", FeatureSide),
        pooling=pooling,
        max_bag_len=bag,
        mapping=_choice(where, entry, "mapping", MappingKind, "identity"),
        source=source,
    )


def _dense(i: int, entry: Any) -> DenseFeatureSpec:
    where = _where("dense_features", i, entry if isinstance(entry, Mapping) else {})
    _check_keys(where, entry, _DENSE_KEYS, ("name", "side"))
    default = entry.get("default", 0.0)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise ConfigError(f"{where}: default must be a number, got {default!r}")
    return DenseFeatureSpec(_text(where, entry, "name"), _choice(where, entry, "side", FeatureSide), float(default))


def parse_map(data: Mapping[str, Any], source: str = "MAP") -> TorchRecMap:
    """A ``TorchRecMap`` from the parsed TOML / JSON object; ConfigError naming ``source``,
    the entry and the key when anything is missing, unknown or invalid."""
    _check_keys(source, data, _TOP_KEYS, ("name", "sparse_features"))
    fmt = data.get("format", MAP_FORMAT)
    if fmt != MAP_FORMAT:
        raise ConfigError(f"{source}: format must be {MAP_FORMAT!r}, got {fmt!r}")
    name = _text(source, data, "name")
    prefix = data.get("prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ConfigError(f"{source}: prefix must be a string, got {prefix!r}")
    raw_sparse, raw_dense = data["sparse_features"], data.get("dense_features", [])
    if not isinstance(raw_sparse, list) or not raw_sparse:
        raise ConfigError(f"{source}: sparse_features must be a non-empty list ([[sparse_features]] tables)")
    if not isinstance(raw_dense, list):
        raise ConfigError(f"{source}: dense_features must be a list ([[dense_features]] tables)")
    try:
        sparse = tuple(_sparse(i, e) for i, e in enumerate(raw_sparse))
        dense = tuple(_dense(i, e) for i, e in enumerate(raw_dense))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for what, names in (("sparse", [f.name for f in sparse]), ("dense", [f.name for f in dense])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: {what} feature name(s) {dup} listed more than once")
    return TorchRecMap(name, prefix, sparse, dense)


def load_map(path: str | os.PathLike[str]) -> TorchRecMap:
    """Read and check the MAP at ``path``: JSON when it ends in ``.json``, else TOML."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read MAP {p}: {e}") from e
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {e}") from e
    return parse_map(data, str(p))
