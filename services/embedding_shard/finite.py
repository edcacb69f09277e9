"""A Lookup's answer is finite, or refused (docs/overload.md, "Shard Lookup limits"): checked
value by value unless the rows' bound proves it cannot overflow, and the refusal named after
its cause (the caller's weights or float16, or the table's own rows).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from services.core.errors import InvalidArgumentError

# ``all_finite`` checks this many values at a time (a bounded temporary, whatever the answer).
_FINITE_CHUNK = 1 << 18
# ``rows_bound`` reads this many rows at a time.
_BOUND_ROWS = 1 << 16


def rows_bound(rows: torch.Tensor) -> float:
    """The largest |value| in ``rows`` (inf when one is NaN or infinite), a chunk at a time."""
    peak = 0.0
    for i in range(0, rows.shape[0], _BOUND_ROWS):
        lo, hi = torch.aminmax(rows[i : i + _BOUND_ROWS])
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return math.inf
        peak = max(peak, -lo, hi)
    return peak


def cannot_overflow(bound: float, lengths: np.ndarray, weights: np.ndarray | None, out_dtype: type) -> bool:
    """True when no bag of ``lengths`` over rows bounded by ``bound`` can pool to a value beyond
    ``out_dtype``'s range: the longest bag x the bound x the largest |weight|, twice over for
    rounding, is within it (that bounds a sum; a mean or a max is smaller)."""
    if not math.isfinite(bound) or not len(lengths):
        return math.isfinite(bound)
    longest = max(int(lengths.max()), 1)
    weight = float(np.abs(weights).max()) if weights is not None and len(weights) else 1.0
    return 2.0 * bound * longest * weight < float(np.finfo(out_dtype).max)


def all_finite(a: np.ndarray) -> bool:
    """True when no value of ``a`` is NaN or infinite."""
    flat = a.reshape(-1)
    return all(np.isfinite(flat[i : i + _FINITE_CHUNK]).all() for i in range(0, flat.size, _FINITE_CHUNK))


def not_finite(where: str, weights: np.ndarray | None, pooled: np.ndarray) -> Exception:
    """The refusal of a group (``where``) whose answer is not finite, from its float32 ``pooled``."""
    if all_finite(pooled):  # finite in float32, not in the float16 asked for
        peak = float(np.abs(pooled).max())
        return InvalidArgumentError(f"{where}: pooled values reach {peak:g}, beyond float16's range: ask for FLOAT32 output")
    if weights is not None:
        peak = float(np.abs(weights).max()) if len(weights) else 0.0
        return InvalidArgumentError(f"{where}: pooled output is not finite; the cause is the per-id weights (largest |w| {peak:g})")
    # The table's own rows overflow: not the caller's doing. An INTERNAL answer with an incident id.
    return FloatingPointError(f"{where}: pooled output is not finite (the table's rows overflow float32)")
