"""The two numpy structures under the embedding cache (docs/cache.md), both vectorized over a
batch of int64 keys, in a fixed number of numpy passes whatever the batch (no per-key loop):

- ``SlotIndex``: key -> slot, a bucketized two-choice hash table: every key has two candidate
  buckets of 8 ways (two multiplicative hashes), so a lookup compares each key with 16 stored
  keys at once, and an insert goes to the emptier bucket (then the other); with twice as many
  ways as keys, a key that finds both full is a rarity the caller handles (it is not cached).
- ``FrequencySketch``: TinyLFU's count-min sketch: 4 rows of saturating 8-bit counters, each
  row four times as wide as the cache holds keys (so a key seen once rarely shares all four
  counters with hot keys: about 1 in 256),
  conservative update, every counter halved once ``sample`` increments have been added (old
  popularity fades, so a row hot yesterday does not hold its place for ever).

Keys are non-negative int64. Event loop only (no locking).
"""

from __future__ import annotations

import numpy as np

EMPTY = -1
WAYS = 8
_DEPTH = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: uint64 hashes whose every bit depends on every key bit (ids
    are consecutive integers; multiplicative hashing alone maps them onto a lattice)."""
    z = keys.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _pow2_at_least(n: int) -> int:
    return 1 << max(1, int(n - 1).bit_length())


class SlotIndex:
    """Map of at most ``capacity`` keys to int32 slots; ``nbytes`` is its whole footprint.

    >>> ix = SlotIndex(4)
    >>> ix.put(np.array([7, 9]), np.array([0, 1])).tolist()
    [True, True]
    >>> ix.get(np.array([9, 8, 7])).tolist()
    [1, -1, 0]
    >>> ix.delete(np.array([7, 5])).tolist(), ix.get(np.array([7])).tolist()
    ([0, -1], [-1])
    """

    def __init__(self, capacity: int) -> None:
        buckets = _pow2_at_least(max(2, -(-2 * capacity // WAYS)))
        self._keys = np.full((buckets, WAYS), EMPTY, dtype=np.int64)
        self._slots = np.zeros((buckets, WAYS), dtype=np.int32)
        self._flat_keys = self._keys.reshape(-1)
        self._flat_slots = self._slots.reshape(-1)
        self._shift = np.uint64(64 - (buckets.bit_length() - 1))
        self.live = 0

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._slots.nbytes

    @staticmethod
    def bytes_for(capacity: int) -> int:
        return _pow2_at_least(max(2, -(-2 * capacity // WAYS))) * WAYS * 12

    def _buckets(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b1 = (h >> self._shift).astype(np.int64)
        b2 = ((h << _S32) >> self._shift).astype(np.int64)  # the low half
        return b1, np.where(b2 == b1, b1 ^ 1, b2)

    def _find(self, keys: np.ndarray, h: np.ndarray | None) -> np.ndarray:
        """Flat position (bucket * WAYS + way) of each key, or -1 where it is absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        column = keys[:, None]
        for b in self._buckets(mix(keys) if h is None else h):  # a key is in at most one of its two buckets
            i, way = np.nonzero(np.take(self._keys, b, axis=0) == column)
            out[i] = b[i] * WAYS + way
        return out

    def get(self, keys: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        """int32 slot of each key, -1 where absent (``h``: ``mix(keys)``, if the caller has it)."""
        at = self._find(keys, h)
        return np.where(at >= 0, self._flat_slots[at], -1).astype(np.int32)

    def put(self, keys: np.ndarray, slots: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        """Add ``keys`` (distinct, none present) with their ``slots``; returns the mask of the
        keys placed (False: both buckets were full)."""
        placed = np.zeros(len(keys), dtype=bool)
        b1, b2 = self._buckets(mix(keys) if h is None else h)
        free1 = (np.take(self._keys, b1, axis=0) == EMPTY).sum(axis=1)
        free2 = (np.take(self._keys, b2, axis=0) == EMPTY).sum(axis=1)
        first = np.where(free1 >= free2, b1, b2)
        todo = np.arange(len(keys))
        for target in (first, np.where(first == b1, b2, b1)):
            if not todo.size:
                break
            t = target[todo]
            order = np.argsort(t, kind="stable")
            todo, t = todo[order], t[order]
            group = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
            rank = np.arange(len(t)) - np.repeat(group, np.diff(np.r_[group, len(t)]))
            free = np.cumsum(np.take(self._keys, t, axis=0) == EMPTY, axis=1)  # [m, WAYS]
            fits = rank < free[:, -1]
            way = (free[fits] == (rank[fits] + 1)[:, None]).argmax(axis=1)  # the (rank+1)-th empty way
            at = t[fits] * WAYS + way
            self._flat_keys[at] = keys[todo[fits]]
            self._flat_slots[at] = slots[todo[fits]]
            placed[todo[fits]] = True
            todo = todo[~fits]
        self.live += int(placed.sum())
        return placed

    def delete(self, keys: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
        """Remove ``keys`` (distinct); returns the slot each held, -1 where absent."""
        at = self._find(keys, h)
        present = at >= 0
        out = np.full(len(keys), -1, dtype=np.int32)
        out[present] = self._flat_slots[at[present]]
        self._flat_keys[at[present]] = EMPTY
        self.live -= int(present.sum())
        return out

    def clear(self) -> None:
        self._keys.fill(EMPTY)
        self.live = 0


class FrequencySketch:
    """Approximate access counts of keys (count-min, 4 x ``width`` uint8 counters), aged by
    halving every ``sample`` increments (TinyLFU's reset)."""

    def __init__(self, capacity: int) -> None:
        width = _pow2_at_least(4 * max(1, capacity))
        self._counts = np.zeros(_DEPTH * width, dtype=np.uint8)
        self._mask = np.uint64(width - 1)
        self._rows = np.arange(_DEPTH, dtype=np.uint64)
        self._row_base = (np.arange(_DEPTH, dtype=np.int64) * width)[:, None]
        self.sample = 10 * max(1, capacity)
        self._added = 0
        self.resets = 0

    @property
    def nbytes(self) -> int:
        return self._counts.nbytes

    @staticmethod
    def bytes_for(capacity: int) -> int:
        return _DEPTH * _pow2_at_least(4 * max(1, capacity))

    def _cells(self, h: np.ndarray) -> np.ndarray:
        h1, h2 = h >> _S32, (h << _S32) >> _S32
        step = h1[None, :] + self._rows[:, None] * (h2[None, :] | np.uint64(1))  # double hashing
        return (step & self._mask).astype(np.int64) + self._row_base  # [4, n] flat indices

    def estimate(self, h: np.ndarray) -> np.ndarray:
        """int32 estimated count of each key of hashes ``h`` (``mix(keys)``): never below its
        true count since the last reset, up to 255."""
        if not len(h):
            return np.zeros(0, dtype=np.int32)
        return self._counts[self._cells(h)].min(axis=0).astype(np.int32)

    def add(self, h: np.ndarray, counts: np.ndarray) -> None:
        """Count ``counts`` more accesses of each key of hashes ``h`` (distinct keys).
        Conservative update: a counter rises only as far as the key's new estimate."""
        if not len(h):
            return
        cells = self._cells(h)
        target = np.minimum(self._counts[cells].min(axis=0).astype(np.int64) + counts, 255).astype(np.uint8)
        # ``maximum.at``: two keys of the batch sharing a counter both count (no lost write)
        np.maximum.at(self._counts, cells.reshape(-1), np.broadcast_to(target, cells.shape).reshape(-1))
        self._added += int(counts.sum())
        if self._added >= self.sample:
            self._counts >>= 1
            self._added //= 2
            self.resets += 1
