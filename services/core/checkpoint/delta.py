"""Producing and retiring deltas: ``diff_versions`` (a delta from two versions), ``compact_version``
(a new base equal to a delta version) and ``collect_garbage`` (delete versions no chain needs).

Diff and compact stream tables ``CHUNK_BYTES`` of rows at a time (base chunk + the deltas' rows
in its range), so a multi-GiB table is never whole in memory, and read their inputs with sha256
checks: a corrupt input is refused, never baked into a new version with fresh checksums.

Pure module: numpy and safetensors only (no torch, no grpc).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from services.core.checkpoint.manifest import TABLE_DTYPE, Manifest, spec_differences, version_dir
from services.core.checkpoint.reader import CHUNK_BYTES, CheckpointReader
from services.core.checkpoint.storage import CheckpointStore, StoreOrUri, as_store, is_version_name
from services.core.checkpoint.writer import DeltaWriter, VersionWriter, next_version
from services.core.errors import CheckpointError, ConfigError
from services.core.types import Version


def split_version_path(path: str | os.PathLike[str]) -> tuple[CheckpointStore, Version]:
    """``<root>/versions/<V>`` (a plain path or ``file://`` URI) -> (the root's store, V).
    CheckpointError when the path does not end in ``versions/<V>``."""
    local = CheckpointStore(path).local_path(".")
    if local.parent.name != "versions" or not is_version_name(local.name):
        raise CheckpointError(f"{os.fspath(path)!r} is not a version folder: expected <root>/versions/<N>")
    return CheckpointStore(local.parent.parent), int(local.name)


def same_root(a: CheckpointStore, b: CheckpointStore) -> bool:
    """True when both stores are the same folder (however their URIs are spelled)."""
    return os.path.realpath(a.local_path("versions")) == os.path.realpath(b.local_path("versions"))


@dataclass(frozen=True)
class DeltaSummary:
    """What ``diff_versions`` wrote: the manifest and, per table, how many rows changed."""

    manifest: Manifest
    rows_changed: Mapping[str, int]
    dense_changed: bool

    @property
    def size_bytes(self) -> int:
        return self.manifest.size_bytes


def _differing_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Local indices of the rows of two float32 [k, dim] arrays whose BYTES differ (so -0.0 vs
    0.0 and NaN payloads count as changes, and equal NaNs do not)."""
    return np.flatnonzero((a.view(np.uint32) != b.view(np.uint32)).any(axis=1))


def _chunked(ids: np.ndarray, dim: int, chunk_bytes: int) -> Iterable[np.ndarray]:
    step = max(1, chunk_bytes // (dim * TABLE_DTYPE.itemsize))
    for start in range(0, len(ids), step):
        yield ids[start : start + step]


def diff_versions(
    out: StoreOrUri,
    parent: Version,
    to_root: StoreOrUri,
    to_version: Version,
    *,
    version: Version | None = None,
    created_at: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> DeltaSummary:
    """Write delta ``version`` (default ``next_version(out)``) of root ``out`` on ``parent``
    (a complete version of ``out``) holding exactly what differs between ``parent`` and
    ``to_root``'s ``to_version`` (any root, base or delta, resolved through its own chain):
    the rows whose bytes differ, table by table, and the dense weights when any differs.
    Applying the delta to ``parent`` reproduces ``to_version``.

    Tables are compared ``chunk_bytes`` of rows at a time; the changed ids (8 bytes a row) are
    held, and their new rows streamed from ``to_version`` into the delta. Every file read is
    checked against its sha256. CheckpointError when the model specs differ (naming what).

    Example: ``diff_versions("/ckpt", 3, "/export", 1)`` -> delta 4 (parent 3) of ``/ckpt``.
    """
    out_store = as_store(out)
    source = CheckpointReader(to_root)
    base = CheckpointReader(out_store)
    spec = base.chain(parent)[-1].model
    to_spec = source.chain(to_version)[-1].model
    differences = spec_differences(spec, to_spec)
    if differences:
        raise CheckpointError(
            f"cannot diff {source.store.uri} version {to_version} against {out_store.uri} version {parent}: "
            f"the model specs differ: {'; '.join(differences)}"
        )
    version = next_version(out_store) if version is None else version
    rows_changed: dict[str, int] = {}
    with DeltaWriter(out_store, version, parent, spec, created_at=created_at) as w:
        for t in spec.tables:
            pieces = [
                _differing_rows(old, new) + start
                for (start, old), (_, new) in zip(
                    base.table_chunks(parent, t.name, chunk_bytes=chunk_bytes, verify=True),
                    source.table_chunks(to_version, t.name, chunk_bytes=chunk_bytes, verify=True),
                )
            ]
            ids = np.concatenate(pieces).astype(np.int64, copy=False)
            rows_changed[t.name] = len(ids)
            chunks = (source.rows_at(to_version, t.name, part) for part in _chunked(ids, t.dim, chunk_bytes))
            w.write_sorted_rows(t.name, ids, chunks)
        old_dense = base.dense_state(parent)
        new_dense = source.dense_state(to_version)
        dense_changed = any(old_dense[k].tobytes() != new_dense[k].tobytes() for k in new_dense)
        if dense_changed:
            w.write_dense(new_dense)
        manifest = w.commit()
    return DeltaSummary(manifest, MappingProxyType(rows_changed), dense_changed)


def compact_version(
    store_or_uri: StoreOrUri,
    version: Version,
    as_version: Version | None = None,
    *,
    created_at: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Manifest:
    """Write a new BASE ``as_version`` (default ``next_version``) equal to ``version`` (base or
    delta): every table streamed in chunks (base chunk + the chain's deltas in its range) and
    the chain's dense weights. Its inputs are checked against their sha256. Returns the
    manifest of the new base."""
    store = as_store(store_or_uri)
    reader = CheckpointReader(store)
    spec = reader.chain(version)[-1].model
    as_version = next_version(store) if as_version is None else as_version
    with VersionWriter(store, as_version, spec, created_at=created_at) as w:
        for t in spec.tables:
            w.write_table(t.name, (rows for _, rows in reader.table_chunks(version, t.name, chunk_bytes=chunk_bytes, verify=True)))
        w.write_dense(reader.dense_state(version))
        return w.commit()


def collect_garbage(store_or_uri: StoreOrUri, keep: int, protect: Iterable[Version] = ()) -> list[Version]:
    """Delete the version folders that are older than the ``keep`` newest complete versions and
    that no kept or protected version's chain needs. Returns the versions deleted, ascending.

    - Every version a kept or ``protect``-ed version resolves through (its parents down to the
      base) stays, however old.
    - A folder without COMPLETE is deleted only when it is older than the oldest kept version
      (an abandoned write); one above it, e.g. younger than the newest complete version, may be
      a writer at work and stays. Staging folders (``<N>.tmp-*``) are never touched.
    - A folder is first renamed out of ``versions/<N>`` (readers stop seeing it at once), then
      removed.

    CheckpointError, with nothing deleted, when a protected version is not complete or a kept
    version's chain cannot be read (it is then unclear what it needs).
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep must be a positive int (how many newest complete versions stay), got {keep!r}")
    store = as_store(store_or_uri)
    reader = CheckpointReader(store)
    folders = store.list_versions()
    complete = [v for v in folders if reader.is_complete(v)]
    if not complete:
        return []
    protect = sorted(set(protect))
    for v in protect:
        if v not in complete:
            raise CheckpointError(f"{store.uri}: protected version {v} is not a complete version (complete: {complete})")
    kept = complete[-keep:]
    needed: set[Version] = set()
    for v in sorted(set(kept) | set(protect)):
        try:
            needed.update(m.version for m in reader.chain(v))
        except CheckpointError as e:
            raise CheckpointError(
                f"{store.uri}: nothing deleted: cannot tell which versions version {v} needs ({e}); "
                f"repair or delete version {v} first"
            ) from e
    doomed = [v for v in folders if v < kept[0] and v not in needed]
    for v in doomed:
        folder = store.local_path(version_dir(v))
        trash = folder.with_name(f"{v}.gc-{secrets.token_hex(6)}")
        try:
            os.rename(folder, trash)
        except OSError as e:
            raise CheckpointError(f"{store.uri}: cannot delete {version_dir(v)} (deleted so far: {doomed[: doomed.index(v)]}): {e}") from e
        shutil.rmtree(trash)
    return doomed
