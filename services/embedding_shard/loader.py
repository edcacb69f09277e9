"""The shard's loader: one partition at one version, read from a checkpoint (TF Serving's
Loader; docs/checkpoint.md, "Serving a new version" and "Shard side").

A ``PartitionLoader`` knows what the store already holds of its partition (``over``: the rows
at that version, or nothing) and so what it must read:

- **rows**: every row of the partition at the version (the base's strided rows, then each
  delta of the chain), when nothing is held or the version has another base;
- **changes**: only the rows that may differ from ``over`` (``changed_ids`` then ``rows_at``:
  a delta's rows, or for a rollback the older values of the rows changed since).

Before loading it can ``verify`` exactly the files it needs: the manifests of the chain and
their COMPLETE markers always, then its own table's files (the base file and every delta's
files of the table for rows; the version's own files of the table for changes). A node that
holds only ``users`` never hashes ``items``. ``estimate_bytes`` says what loading will cost
before it happens; ``Throttle`` paces loads (``--load-rate-bytes-s``); ``Pacer`` holds a
version's verification and changes to a share of one core (``--swap-cpu-share``), so serving on
the same node barely notices them (docs/checkpoint.md, "Paced swaps").

Runs on the node's reconciler thread (or the start-up thread in ``main.py``); blocking I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from services.core.checkpoint.manifest import TABLE_DTYPE
from services.core.checkpoint.reader import CheckpointReader
from services.core.placement import partition_rows
from services.core.types import PartitionId, Version

log = logging.getLogger(__name__)

# A throttled wait checks ``stop`` and whether the load is still wanted this often.
_THROTTLE_SLICE_S = 0.1
# Changed rows read at a time by a paced ``load_changes`` (4 MiB at dim 64).
PACE_ROWS = 1 << 14


@dataclass(frozen=True)
class Changes:
    """The rows of one partition that differ between two versions: LOCAL ids, strictly
    increasing, and their rows at the newer one (``TableStore.apply`` / an overlay)."""

    local_ids: np.ndarray  # int64 [k]
    rows: torch.Tensor  # float32 [k, dim]

    def pair(self) -> tuple[np.ndarray, torch.Tensor]:
        return self.local_ids, self.rows


class Throttle:
    """Paces loading at ``rate_bytes_s`` (0: unthrottled), so a live move stays gentle on disk
    and node. ``spend`` waits ``size / rate`` seconds in slices, giving up when ``stop`` is set or
    ``still_wanted`` turns False."""

    def __init__(self, rate_bytes_s: int = 0, stop: threading.Event | None = None) -> None:
        self.rate_bytes_s = rate_bytes_s
        self._stop = stop or threading.Event()

    def spend(self, size_bytes: int, still_wanted: Callable[[], bool] = lambda: True) -> bool:
        """False when the load should be abandoned (the node stops, or it is no longer wanted)."""
        if self.rate_bytes_s <= 0:
            return still_wanted()
        deadline = time.monotonic() + size_bytes / self.rate_bytes_s
        while (left := deadline - time.monotonic()) > 0:
            if self._stop.wait(min(left, _THROTTLE_SLICE_S)) or not still_wanted():
                return False
        return still_wanted()


class Pacer:
    """Holds the calling thread to ``share`` of one core while it works in chunks: ``begin()``,
    then ``step()`` after each chunk, which sleeps until the thread's CPU time since ``begin``
    is at most ``share`` x the wall time since. ``share`` >= 1: no pacing. The sleeps end at
    once when ``stop`` is set (the work then finishes unpaced). One thread uses it at a time.

        pacer = Pacer(0.25, stop); pacer.begin()
        for chunk in work: do(chunk); pacer.step()   # ~4x the CPU time in wall time
    """

    def __init__(self, share: float = 1.0, stop: threading.Event | None = None) -> None:
        if not share > 0:
            raise ValueError(f"share must be > 0, got {share}")
        self.share = share
        self._stop = stop or threading.Event()
        self._cpu0 = self._wall0 = 0.0
        self.slept_s = 0.0  # since ``begin``

    def begin(self) -> None:
        self._cpu0, self._wall0, self.slept_s = time.thread_time(), time.monotonic(), 0.0

    @property
    def cpu_s(self) -> float:
        """CPU seconds of this thread since ``begin``."""
        return time.thread_time() - self._cpu0

    def step(self) -> None:
        if self.share >= 1 or self._stop.is_set():
            return
        wait = self._wall0 + self.cpu_s / self.share - time.monotonic()
        if wait > 0:
            self.slept_s += wait
            self._stop.wait(wait)



class PartitionLoader:
    """``pid`` at ``version``, given the store holds its rows at ``over`` (None: nothing).

    ``full`` says which load applies: rows (nothing held, or another base than ``over``'s) or
    changes. Construction reads and checks the manifests of both chains (CheckpointError when
    one is incomplete or broken); ``changed`` may share the changed ids of one table between the
    loaders of its partitions (``loaders_for`` does)."""

    def __init__(
        self, reader: CheckpointReader, pid: PartitionId, version: Version, *, over: Version | None = None,
        changed: dict | None = None,
    ) -> None:
        self.reader, self.pid, self.version, self.over = reader, pid, version, over
        self._chain = reader.chain(version)
        self.spec = self._chain[-1].model.table(pid.table)
        self.full = over is None or reader.chain(over)[0].version != self._chain[0].version
        self._changed = {} if changed is None else changed
        self._mine: np.ndarray | None = None

    def files(self) -> dict[Version, tuple[str, ...]]:
        """The files it reads that it verifies, per version: its table's files of every version
        of the chain (rows), or of ``version`` itself (changes)."""
        chain = self._chain if self.full else self._chain[-1:]
        return {m.version: m.table_files(self.pid.table) for m in chain if m.table_files(self.pid.table)}

    def verify(self) -> None:
        """sha256 of every file of ``files()`` (manifests and COMPLETE markers included)."""
        verify_all([self])

    def _changed_ids(self) -> np.ndarray:
        """GLOBAL ids of this partition whose rows may differ between ``over`` and ``version``."""
        if self._mine is None:
            key = (self.pid.table, self.over, self.version)
            ids = self._changed.get(key)
            if ids is None:
                ids = self._changed[key] = self.reader.changed_ids(self.over, self.version, self.pid.table)
            n = self.pid.num_partitions
            self._mine = ids[ids % n == self.pid.partition] if n > 1 else ids
        return self._mine

    def estimate_bytes(self) -> int:
        """What loading will hold in memory: the partition's rows, or the changed rows and their
        ids (reads the deltas' ids files: the rows themselves are not read)."""
        row_bytes = self.spec.dim * TABLE_DTYPE.itemsize
        if self.full:
            return partition_rows(self.spec.rows, self.pid.num_partitions, self.pid.partition) * row_bytes
        return len(self._changed_ids()) * (row_bytes + 8)

    def load_rows(self) -> torch.Tensor:
        """Every row of the partition at ``version``, a private writable tensor (a whole table
        is copied out of the checkpoint, so deltas can be written in place: a copy-on-write map
        would dirty a whole page per changed row)."""
        pid = self.pid
        rows = self.reader.partition_rows(self.version, pid.table, pid.partition, pid.num_partitions)
        log.info("loaded %s v%d: %d rows x %d (%.1f MiB)", pid, self.version, rows.shape[0], rows.shape[1], rows.nbytes / 2**20)
        return torch.from_numpy(rows)

    def load_changes(self, pacer: Pacer | None = None) -> Changes:
        """The rows that may differ from ``over``, at ``version`` (``full`` must be False), read
        ``PACE_ROWS`` at a time when paced."""
        if self.full:
            raise ValueError(f"{self.pid} v{self.version} has another base than v{self.over}: load its rows")
        mine = self._changed_ids()
        pacer = pacer or Pacer()
        if pacer.share >= 1 or len(mine) <= PACE_ROWS:
            rows = self.reader.rows_at(self.version, self.pid.table, mine)
        else:
            rows = np.empty((len(mine), self.spec.dim), dtype=TABLE_DTYPE)
            for start in range(0, len(mine), PACE_ROWS):
                rows[start : start + PACE_ROWS] = self.reader.rows_at(self.version, self.pid.table, mine[start : start + PACE_ROWS])
                pacer.step()
        pacer.step()
        return Changes(mine // self.pid.num_partitions, torch.from_numpy(rows))


def loaders_for(reader: CheckpointReader, version: Version, pids: Iterable[PartitionId], *, over: Version | None = None) -> list[PartitionLoader]:
    """One loader per partition, sharing the changed ids of each table."""
    changed: dict = {}
    return [PartitionLoader(reader, pid, version, over=over, changed=changed) for pid in pids]


def verify_all(loaders: Sequence[PartitionLoader], pacer: Pacer | None = None) -> None:
    """Verify the files of every loader, each file once (CheckpointError on the first bad one),
    a step of ``pacer`` after each MiB hashed."""
    done: set[tuple[Version, str]] = set()
    for loader in loaders:
        for version, paths in loader.files().items():
            todo = [p for p in paths if (version, p) not in done]
            if todo:
                loader.reader.verify_files(version, todo, full=True, pace=pacer.step if pacer else None)
                done.update((version, p) for p in todo)


def load_rows(loaders: Sequence[PartitionLoader], throttle: Throttle | None = None) -> dict[PartitionId, torch.Tensor] | None:
    """Every loader's rows (``load_rows``), each once its bytes are spent on ``throttle``;
    None when the throttle gives up (the node stops)."""
    out: dict[PartitionId, torch.Tensor] = {}
    for loader in loaders:
        if throttle is not None and not throttle.spend(loader.estimate_bytes()):
            return None
        out[loader.pid] = loader.load_rows()
    return out


def load_changes(loaders: Sequence[PartitionLoader], pacer: Pacer | None = None) -> dict[PartitionId, tuple[np.ndarray, torch.Tensor]]:
    """Every loader's changes as ``TableStore.apply`` takes them."""
    return {loader.pid: loader.load_changes(pacer).pair() for loader in loaders}
