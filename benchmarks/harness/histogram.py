"""Latency histograms: HDR (1 us .. 60 s, 3 significant digits) with fast numpy read-outs.

``LatencyHistogram`` records seconds and reports milliseconds. Values are stored as integer
microseconds in an ``hdrh`` HdrHistogram, so a histogram encodes to the standard HDR base64
"HISTFAAA..." blob (readable by any HdrHistogram tool) and merges with another exactly.

Percentiles follow HdrHistogram's definition: the value at percentile q is the highest value
equivalent (within 3 significant digits) to the smallest recorded value whose cumulative count
reaches ``round(q% * count)`` — i.e. numpy's ``percentile(..., method="inverted_cdf")`` within
the histogram's precision (relative error <= 1/1024). Values above 60 s are clamped to 60 s and
counted in ``clamped``; values below 1 us are recorded as 1 us.

Read-outs (percentiles, mean, CDF) run over the counts array with numpy (a few hundred
microseconds), not hdrh's per-bucket Python loops, so a live progress line can ask every second.

Not thread-safe: one event loop (or one thread) owns a histogram.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000  # 60 s
SIGNIFICANT_DIGITS = 3

# The percentiles ``summary`` reports, in percent, and their keys.
SUMMARY_PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50_ms", 50.0),
    ("p90_ms", 90.0),
    ("p95_ms", 95.0),
    ("p99_ms", 99.0),
    ("p999_ms", 99.9),
)


@functools.lru_cache(maxsize=4)
def _bucket_values(lowest: int, highest: int, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """(highest equivalent value, median equivalent value) of every counts index, in us."""
    h = HdrHistogram(lowest, highest, digits)
    n = h.counts_len
    hi = np.empty(n, dtype=np.float64)
    mid = np.empty(n, dtype=np.float64)
    for i in range(n):  # once per process and configuration (~20 ms)
        v = h.get_value_from_index(i)
        hi[i] = h.get_highest_equivalent_value(v)
        mid[i] = h._hdr_median_equiv_value(v)  # noqa: SLF001 - hdrh's own definition of a bucket's mean
    hi.flags.writeable = False
    mid.flags.writeable = False
    return hi, mid


class LatencyHistogram:
    """HDR histogram of latencies. ``record`` takes seconds; every read-out is in milliseconds.

    >>> h = LatencyHistogram()
    >>> for s in (0.001, 0.002, 0.010): h.record(s)
    >>> h.count, round(h.percentile_ms(50), 2)
    (3, 2.0)
    """

    __slots__ = ("_h", "clamped")

    def __init__(self, _hdr: HdrHistogram | None = None) -> None:
        self._h = _hdr if _hdr is not None else HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped = 0

    # -- recording -------------------------------------------------------------------------

    def record(self, seconds: float, count: int = 1) -> None:
        """Record one latency (``count`` times). Negative values count as 1 us."""
        us = int(seconds * 1e6 + 0.5)
        if us < LOWEST_US:
            us = LOWEST_US
        elif us > HIGHEST_US:
            us = HIGHEST_US
            self.clamped += count
        self._h.record_value(us, count)

    def record_many(self, seconds: Iterable[float]) -> None:
        for s in seconds:
            self.record(s)

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add ``other``'s counts into this histogram (exact); returns self."""
        if other.count:
            self._h.add(other._h)
        self.clamped += other.clamped
        return self

    def reset(self) -> None:
        self._h.reset()
        self.clamped = 0

    def copy(self) -> LatencyHistogram:
        out = LatencyHistogram()
        out.merge(self)
        return out

    # -- read-outs -------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def __len__(self) -> int:
        return self.count

    def _counts(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._h.counts)[: self._h.counts_len]

    def _values(self) -> tuple[np.ndarray, np.ndarray]:
        h = self._h
        return _bucket_values(h.lowest_trackable_value, h.highest_trackable_value, h.significant_figures)

    def percentiles_ms(self, qs: Sequence[float]) -> list[float]:
        """Values at the percentiles ``qs`` (each in percent, 0..100), in ms; 0.0 when empty."""
        total = self.count
        if total == 0:
            return [0.0 for _ in qs]
        cum = np.cumsum(self._counts(), dtype=np.int64)
        hi, _ = self._values()
        out = []
        for q in qs:
            if not 0.0 <= q <= 100.0:
                raise ValueError(f"percentile must be in [0, 100], got {q}")
            if q == 0.0:
                out.append(self.min_ms())  # hdrh: the lowest equivalent of the smallest value
                continue
            target = max(int(q * total / 100.0 + 0.5), 1)  # hdrh's get_target_count_at_percentile
            idx = int(np.searchsorted(cum, target, side="left"))
            out.append(float(hi[min(idx, len(hi) - 1)]) / 1e3)
        return out

    def percentile_ms(self, q: float) -> float:
        """The value at percentile ``q`` (in percent: 99 for p99), in ms; 0.0 when empty."""
        return self.percentiles_ms([q])[0]

    def max_ms(self) -> float:
        return float(self._h.get_max_value()) / 1e3 if self.count else 0.0

    def min_ms(self) -> float:
        return float(self._h.get_min_value()) / 1e3 if self.count else 0.0

    def mean_ms(self) -> float:
        total = self.count
        if total == 0:
            return 0.0
        _, mid = self._values()
        return float(np.dot(self._counts().astype(np.float64), mid)) / total / 1e3

    def count_above_ms(self, threshold_ms: float) -> int:
        """How many recorded values are above ``threshold_ms`` (at bucket precision)."""
        hi, _ = self._values()
        return int(self._counts()[hi > threshold_ms * 1e3].sum())

    def summary(self) -> dict[str, float | int]:
        """``{"count", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms",
        "min_ms"}`` (ms values rounded to 1 us)."""
        qs = self.percentiles_ms([q for _, q in SUMMARY_PERCENTILES])
        out: dict[str, float | int] = {"count": self.count}
        for (key, _), v in zip(SUMMARY_PERCENTILES, qs):
            out[key] = round(v, 3)
        out["max_ms"] = round(self.max_ms(), 3)
        out["mean_ms"] = round(self.mean_ms(), 3)
        out["min_ms"] = round(self.min_ms(), 3)
        return out

    def cdf_points(self) -> list[tuple[float, float]]:
        """``[(percentile, value_ms), ...]`` for every non-empty bucket, ascending: the share of
        values (in percent) at or below ``value_ms``. The last point is (100.0, max)."""
        counts = self._counts()
        nz = np.flatnonzero(counts)
        if nz.size == 0:
            return []
        hi, _ = self._values()
        cum = np.cumsum(counts[nz], dtype=np.int64)
        pct = cum * (100.0 / float(cum[-1]))
        return [(float(p), float(v) / 1e3) for p, v in zip(pct, hi[nz])]

    # -- serialisation ---------------------------------------------------------------------

    def encode(self) -> str:
        """The standard HDR V2 compressed base64 blob ("HISTFAAA..."), as str."""
        blob = self._h.encode()
        return blob.decode("ascii") if isinstance(blob, bytes) else str(blob)

    @classmethod
    def decode(cls, blob: str | bytes) -> LatencyHistogram:
        """Inverse of ``encode``. Raises ValueError on a malformed blob."""
        raw = blob.encode("ascii") if isinstance(blob, str) else blob
        try:
            h = HdrHistogram.decode(raw)
        except Exception as e:  # hdrh raises TypeError, zlib.error, its own Hdr*Exception
            raise ValueError(f"not an HDR histogram blob: {e}") from None
        if (h.lowest_trackable_value, h.highest_trackable_value, h.significant_figures) != (
            LOWEST_US,
            HIGHEST_US,
            SIGNIFICANT_DIGITS,
        ):
            out = cls()
            out._h.add(h)  # re-bucket into the standard layout
            return out
        return cls(h)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return self.count == other.count and bool(np.array_equal(self._counts(), other._counts()))

    def __repr__(self) -> str:
        if not self.count:
            return "LatencyHistogram(empty)"
        s = self.summary()
        return f"LatencyHistogram(count={s['count']}, p50={s['p50_ms']}ms, p99={s['p99_ms']}ms, max={s['max_ms']}ms)"
