"""The table store of one shard node: the partitions it holds, per version, and their pooling.

Thread-safety: ``lookup`` is called concurrently from the RPC thread pool; it only reads the
immutable ``_versions`` snapshot (replaced whole under a lock by ``install``), and counters are
best-effort (GIL-atomic increments are enough for load statistics).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from services.core import pooling
from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import FailedPreconditionError, InvalidArgumentError
from services.core.types import PartitionKey, PoolingType, TableSpec, Version

log = logging.getLogger(__name__)


@dataclass
class PartitionTable:
    """Rows of one partition: global row ``r`` is local row ``r // num_partitions`` here, and
    only rows with ``r % num_partitions == key.partition`` belong to it."""

    key: PartitionKey
    spec: TableSpec
    num_partitions: int
    weight: torch.Tensor  # float32 [local_rows, dim]
    lookups: int = 0
    ids: int = 0

    @property
    def size_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def local_ids(self, ids: np.ndarray) -> np.ndarray:
        """Validate GLOBAL ``ids`` against this partition and map them to local rows."""
        if len(ids) == 0:
            return ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.spec.rows:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(f"table {self.spec.name!r}: id {bad} out of range [0, {self.spec.rows})")
        if self.num_partitions == 1:
            return ids
        p = self.key.partition
        owner = ids % self.num_partitions
        wrong = np.flatnonzero(owner != p)
        if len(wrong):
            bad = int(ids[wrong[0]])
            raise InvalidArgumentError(
                f"table {self.spec.name!r}: id {bad} is not in partition {p} of {self.num_partitions} "
                f"(it belongs to partition {bad % self.num_partitions})"
            )
        return ids // self.num_partitions

    def pool(
        self, ids: np.ndarray, lengths: np.ndarray, pooling_type: PoolingType, weights: np.ndarray | None
    ) -> np.ndarray:
        local = self.local_ids(ids)
        out = pooling.pool(self.weight, local, lengths, pooling_type, weights)
        self.lookups += 1
        self.ids += len(ids)
        return out


@dataclass(frozen=True)
class VersionSlot:
    version: Version
    partitions: dict[PartitionKey, PartitionTable] = field(default_factory=dict)


class TableStore:
    """Owns every partition this node holds, keyed by version (one version for now).

    ``serving_version`` is what a request naming version 0 gets.
    """

    def __init__(self, table_specs: dict[str, TableSpec], num_partitions: dict[str, int]) -> None:
        self._specs = dict(table_specs)
        self._num_partitions = dict(num_partitions)
        self._lock = threading.Lock()
        self._versions: dict[Version, VersionSlot] = {}
        self.serving_version: Version = 0

    @property
    def versions_ready(self) -> list[Version]:
        return sorted(self._versions)

    def partitions(self, version: Version | None = None) -> dict[PartitionKey, PartitionTable]:
        slot = self._versions.get(self.serving_version if version is None else version)
        return {} if slot is None else dict(slot.partitions)

    def install(self, slot: VersionSlot, *, serve: bool = True) -> None:
        with self._lock:
            versions = dict(self._versions)
            versions[slot.version] = slot
            self._versions = versions
            if serve:
                self.serving_version = slot.version

    def resolve(self, version: Version, table: str, partition: int) -> PartitionTable:
        """The partition to pool from, or the error naming what is wrong.

        A table or partition that does not exist in the model/map is INVALID_ARGUMENT; one that
        exists but is not held here (or a version not ready here) is FAILED_PRECONDITION.
        """
        spec = self._specs.get(table)
        if spec is None:
            raise InvalidArgumentError(f"unknown table {table!r}")
        n = self._num_partitions.get(table, 1)
        if not 0 <= partition < n:
            raise InvalidArgumentError(f"table {table!r}: partition {partition} out of range [0, {n})")
        v = self.serving_version if version == 0 else version
        slot = self._versions.get(v)
        if slot is None:
            raise FailedPreconditionError(f"version {version} is not ready on this node (ready: {self.versions_ready})")
        part = slot.partitions.get(PartitionKey(table, partition))
        if part is None:
            raise FailedPreconditionError(f"table {table!r} partition {partition} is not held by this node")
        return part


def load_partitions(
    reader: CheckpointReader,
    version: Version,
    keys: list[PartitionKey],
    num_partitions: dict[str, int],
    *,
    verify: bool = True,
    load_rate_bytes_s: int = 0,
    stop: "threading.Event | None" = None,
) -> VersionSlot:
    """Load only the rows of ``keys`` at ``version``.

    A whole table (P = 1) stays a copy-on-write memory map of the checkpoint file (pages come
    in on first touch, nothing is copied); a row-wise partition copies its strided rows
    (``table[p::P]``), so a node holds about 1/P of the table. ``load_rate_bytes_s`` > 0
    throttles loading (operators use it to keep a live move gentle on the disk and the node).
    """
    manifest = reader.manifest(version)
    if verify:
        reader.verify(version, full=True)
    parts: dict[PartitionKey, PartitionTable] = {}
    for key in keys:
        spec = manifest.model.table(key.table)
        n = num_partitions[key.table]
        full = reader.open_table(version, key.table, verify=False)
        if n == 1:
            rows = np.lib.format.open_memmap(full.filename, mode="c") if isinstance(full, np.memmap) else full
        else:
            rows = np.ascontiguousarray(full[key.partition :: n])
        weight = torch.from_numpy(rows)
        parts[key] = PartitionTable(key, spec, n, weight)
        if load_rate_bytes_s > 0:
            (stop or threading.Event()).wait(parts[key].size_bytes / load_rate_bytes_s)
        log.info("loaded %s v%d: %d rows x %d (%.1f MiB)", key, version, weight.shape[0], spec.dim, parts[key].size_bytes / 2**20)
    return VersionSlot(version, parts)
