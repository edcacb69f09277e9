"""Top-k of a request's scores: candidate positions, score descending, ties by position."""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Candidate positions of the ``k`` best scores: score descending, ties by position."""
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    return order[:k]
