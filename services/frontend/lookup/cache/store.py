"""``RowCache``: hot embedding rows of one model version in the frontend, memory-bounded,
admitted by frequency, invalidated precisely when the version changes (docs/cache.md).

A row is keyed by (table, id) as one int64 (``table code << 40 | id``) and lives in a slot of
one preallocated float32 slab ``[capacity, dim]``; ``SlotIndex`` maps keys to slots and
``FrequencySketch`` counts accesses. Every row held is the row at ``version``:

- ``find`` / ``read``: slots of keys (-1: absent) and copies of their rows;
- ``record``: a batch's accesses into the sketch (hits and misses alike);
- ``offer``: rows just fetched at ``version``. Free slots take the most frequent first; once
  full, each candidate must be strictly more frequent than the victim it would replace, the
  victims being the least frequent of a random sample of held rows (sampled TinyLFU), so a
  scan of rows seen once cannot flush the hot set;
- ``advance(old, new, changes)``: the version moves; the rows of ids in ``changes[table]``
  (``CheckpointReader.changed_ids(old, new, table)``: a delta, a rollback, a branch) are
  dropped, every other row stays (equal at both versions); a table whose change is None
  (another base) is dropped whole.

Event loop only. Counters are plain integers read at scrape time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from services.core.checkpoint.manifest import ModelSpec
from services.core.errors import ConfigError
from services.core.types import Version
from services.frontend.lookup.cache.table import FrequencySketch, SlotIndex, mix

ID_BITS = 40
_ID_MASK = (1 << ID_BITS) - 1


def capacity_for(budget_bytes: int, dim: int) -> int:
    """The most rows whose slab, key array, index and sketch fit in ``budget_bytes``."""

    def total(n: int) -> int:
        return n * (dim * 4 + 16) + SlotIndex.bytes_for(n) + FrequencySketch.bytes_for(n)

    lo, hi = 0, max(0, budget_bytes) // (dim * 4 + 16) + 1
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget_bytes else (lo, mid)
    return lo


class RowCache:
    def __init__(self, spec: ModelSpec, budget_bytes: int, version: Version, *, seed: int = 0) -> None:
        self.dim = spec.dense_arch.embedding_dim
        self.capacity = capacity_for(budget_bytes, self.dim)
        if self.capacity < 1:
            raise ConfigError(f"a cache of {budget_bytes} bytes holds no row of {self.dim * 4} bytes")
        big = [t.name for t in spec.tables if t.rows > _ID_MASK]
        if big:
            raise ConfigError(f"tables {big} have more than 2**{ID_BITS} rows: the cache cannot key them")
        self.codes = {t.name: i for i, t in enumerate(spec.tables)}
        self.table_names = [t.name for t in spec.tables]
        self.rows_of = {t.name: t.rows for t in spec.tables}
        self.version = version
        self._slab = np.zeros((self.capacity, self.dim), dtype=np.float32)
        self._key_of_slot = np.full(self.capacity, -1, dtype=np.int64)
        self._hash_of_slot = np.zeros(self.capacity, dtype=np.uint64)
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)  # a stack: _free[:_nfree]
        self._nfree = self.capacity
        self._index = SlotIndex(self.capacity)
        self._sketch = FrequencySketch(self.capacity)
        self._rng = np.random.default_rng(seed)
        # Counters (event loop; read at scrape time).
        self.hits = self.misses = self.bypassed = 0  # ids looked up (every occurrence)
        self.admitted = self.rejected = self.evicted = 0  # rows offered / displaced
        self.invalidated = self.flushed = 0  # rows dropped by a version change: precisely / wholesale

    @property
    def nbytes(self) -> int:
        """Every byte the cache allocated: slab, slot keys, index and sketch."""
        return self._slab.nbytes + self._key_of_slot.nbytes + self._hash_of_slot.nbytes + self._index.nbytes + self._sketch.nbytes

    @property
    def rows_held(self) -> int:
        return self.capacity - self._nfree

    def keys(self, table: str, ids: np.ndarray) -> np.ndarray:
        """int64 keys of ``table``'s rows ``ids`` (in range)."""
        return (np.int64(self.codes[table]) << ID_BITS) | ids.astype(np.int64, copy=False)

    @staticmethod
    def split(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(table code, id) of each key."""
        return keys >> ID_BITS, keys & _ID_MASK

    @staticmethod
    def hash(keys: np.ndarray) -> np.ndarray:
        """The hashes the index and the sketch use (compute once per batch, pass them on)."""
        return mix(keys)

    def find(self, keys: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        """int32 slot of each key (-1: not held)."""
        return self._index.get(keys, h)

    def read(self, slots: np.ndarray) -> np.ndarray:
        """A copy of the rows of ``slots`` (float32 [len(slots), dim])."""
        return np.take(self._slab, slots, axis=0)

    def record(self, keys: np.ndarray, counts: np.ndarray, h: np.ndarray | None = None) -> None:
        """``counts`` more accesses of each of ``keys`` (distinct)."""
        self._sketch.add(mix(keys) if h is None else h, counts)

    def offer(self, keys: np.ndarray, rows: np.ndarray, h: np.ndarray | None = None) -> int:
        """Rows fetched at ``self.version`` (``keys`` distinct): admit what the policy takes
        (module docstring). Returns how many were admitted."""
        h = mix(keys) if h is None else h
        absent = self._index.get(keys, h) < 0  # a concurrent batch may have brought some in
        keys, rows, h = keys[absent], rows[absent], h[absent]
        if not len(keys):
            return 0
        freq = self._sketch.estimate(h)
        order = np.argsort(-freq, kind="stable")
        keys, rows, h, freq = keys[order], rows[order], h[order], freq[order]
        n_free = min(self._nfree, len(keys))
        slots = self._free[self._nfree - n_free : self._nfree][::-1].copy()
        self._nfree -= n_free
        rest = len(keys) - n_free
        if rest:
            victims = self._victims(rest, exclude=slots)
            vfreq = self._sketch.estimate(self._hash_of_slot[victims])
            k = min(rest, len(victims))
            wins = int(np.count_nonzero(freq[n_free : n_free + k] > vfreq[:k]))  # both sorted: a prefix wins
            self.rejected += rest - wins
            if wins:
                out = victims[:wins]
                self._index.delete(self._key_of_slot[out], self._hash_of_slot[out])
                self.evicted += wins
                slots = np.concatenate([slots, out])
        n = len(slots)
        placed = self._index.put(keys[:n], slots, h[:n])
        if not placed.all():  # both of a key's buckets full: it stays out, its slot is free again
            self.rejected += int((~placed).sum())
            self._release(slots[~placed])
            keys, rows, h, slots = keys[:n][placed], rows[:n][placed], h[:n][placed], slots[placed]
            n = len(slots)
        self._key_of_slot[slots] = keys[:n]
        self._hash_of_slot[slots] = h[:n]
        self._slab[slots] = rows[:n]
        self.admitted += n
        return n

    def _victims(self, n: int, exclude: np.ndarray) -> np.ndarray:
        """Up to ``n`` held slots, the least frequent of a random sample of about 8n + 32,
        least frequent first; ``exclude`` (slots filled by this offer) never."""
        sample = np.unique(self._rng.integers(0, self.capacity, size=min(8 * n + 32, 4 * self.capacity)))
        sample = sample[self._key_of_slot[sample] >= 0]
        if len(exclude):
            sample = sample[~np.isin(sample, exclude)]
        freq = self._sketch.estimate(self._hash_of_slot[sample])
        return sample[np.argsort(freq, kind="stable")[:n]].astype(np.int32)

    def _drop(self, keys: np.ndarray) -> int:
        slots = self._index.delete(keys)
        slots = slots[slots >= 0]
        self._release(slots)
        return len(slots)

    def _release(self, slots: np.ndarray) -> None:
        self._key_of_slot[slots] = -1
        self._free[self._nfree : self._nfree + len(slots)] = slots
        self._nfree += len(slots)

    def flush(self) -> int:
        """Drop every row; returns how many were held."""
        n = self.rows_held
        self._index.clear()
        self._key_of_slot.fill(-1)
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)
        self._nfree = self.capacity
        self.flushed += n
        return n

    def advance(self, old: Version, new: Version, changes: Mapping[str, np.ndarray | None] | None) -> int:
        """Serve ``new`` from now on. ``changes``: per table, the ids whose rows may differ
        between ``old`` and ``new`` (None: the whole table; a table not named: unchanged);
        None altogether (another base, or the changes could not be read): everything goes.
        A cache not at ``old`` is flushed too. Returns the rows dropped."""
        dropped = 0
        if changes is None or old != self.version:
            dropped = self.flush()
        else:
            for table, ids in changes.items():
                if table not in self.codes:
                    continue
                if ids is None:
                    held = np.flatnonzero((self._key_of_slot >= 0) & ((self._key_of_slot >> ID_BITS) == self.codes[table]))
                    self._index.delete(self._key_of_slot[held])
                    self._release(held.astype(np.int32))
                    self.flushed += len(held)
                    dropped += len(held)
                elif len(ids):
                    n = self._drop(self.keys(table, np.asarray(ids)))
                    self.invalidated += n
                    dropped += n
        self.version = new
        return dropped


def version_changes(reader, old: Version, new: Version, tables) -> dict[str, np.ndarray | None] | None:
    """Per table, the ids whose rows may differ between ``old`` and ``new``
    (``CheckpointReader.changed_ids``); None when the two versions are on different bases.
    Reads delta files: call it in an executor."""
    out: dict[str, np.ndarray | None] = {}
    for table in tables:
        ids = reader.changed_ids(old, new, table)
        if ids is None:
            return None
        out[table] = ids
    return out
