"""Bag pooling over one table partition with torch ``embedding_bag`` (vectorized, GIL released).

Used by the embedding shard and by the frontend's in-process and redis-kv lookups (through
``as_weight``, so the frontend itself never imports torch); the reference path
(``services.core.reference``) deliberately pools with its own plain code instead.

Shapes, for ``bags`` bags holding ``n`` ids in total over a ``[rows, dim]`` partition::

    local_ids int64 [n]   lengths int32 [bags]   weights float32 [n] | None
    -> pooled float32 [bags, dim]   (an empty bag pools to zeros in every mode)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from services.core.errors import InvalidArgumentError
from services.core.types import PoolingType

# Arrays decoded from the wire are read-only views of message bytes; torch only reads them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_MODES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean", PoolingType.MAX: "max"}


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Start offset of every bag: ``[0, l0, l0+l1, ...]`` without the total (int64 [bags])."""
    offsets = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return offsets


def concat_bags(
    parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The bags of several ``(ids, lengths, weights | None)`` in turn, as one ``(ids, lengths,
    weights)`` to pool at once (one ``embedding_bag``; cut its rows back by each part's bag
    count). Weights are all given or all None. One part is handed back as it is."""
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts])
    lengths = np.concatenate([p[1] for p in parts])
    weights = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return ids, lengths, weights


def as_weight(table: np.ndarray) -> torch.Tensor:
    """A ``[rows, dim]`` float32 numpy table (memory-mapped included) as the ``weight`` that
    ``pool`` reads, sharing its memory (no copy). Lets numpy-only callers (the frontend's
    lookup baselines) pool without touching torch themselves. A read-only table (a checkpoint
    mapped read-only) is shared as it is: pooling never writes its weight, so torch's warning
    about non-writable arrays does not apply and is not raised."""
    if table.flags.writeable:
        return torch.from_numpy(table)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(table)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a``, or an aligned copy when it is a view at an odd offset of a request's bytes."""
    return a if a.flags.aligned else a.copy()


def pool(
    weight: torch.Tensor,
    local_ids: np.ndarray,
    lengths: np.ndarray,
    pooling: PoolingType,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Pool bags of ``local_ids`` (rows of ``weight``) into float32 ``[bags, dim]``.

    The caller has validated ids (in range) and lengths (non-negative, sum == n). Per-id
    ``weights`` are only defined for SUM pooling.
    """
    if weights is not None and pooling is not PoolingType.SUM:
        raise InvalidArgumentError(f"per-id weights need sum pooling, got {pooling.value}")
    bags = len(lengths)
    if bags == 0:
        return np.zeros((0, weight.shape[1]), dtype=np.float32)
    out = F.embedding_bag(
        torch.from_numpy(_aligned(local_ids)),
        weight,
        torch.from_numpy(offsets_from_lengths(lengths)),
        mode=_MODES[pooling],
        per_sample_weights=None if weights is None else torch.from_numpy(_aligned(weights)),
    )
    return out.numpy()
