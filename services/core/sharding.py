"""Pure split/merge maths for row-wise tables (numpy only, vectorized).

A bag over a row-wise table with P partitions is split into P sub-bags (id ``r`` goes to
partition ``r % P``); each partition pools its sub-bag; the partial pools merge:
SUM adds; MEAN asks every partition for SUMs and their counts, adds them and divides ONCE by
the total count (never a mean of means); MAX takes the elementwise max over partitions whose
sub-bag was not empty. Shapes::

    ids int64 [n], lengths int32 [bags]  --split-->  P x (ids_p [n_p], lengths_p [bags])
    P x (pooled_p float32 [bags, dim], counts_p int32 [bags])  --merge-->  float32 [bags, dim]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.core.types import PoolingType


@dataclass(frozen=True)
class SubBags:
    """The part of a batch of bags that one partition pools."""

    partition: int
    ids: np.ndarray  # int64 [n_p], global ids
    lengths: np.ndarray  # int32 [bags]
    weights: np.ndarray | None  # float32 [n_p]


def partial_pooling(pooling: PoolingType) -> PoolingType:
    """What each partition is asked for: MEAN travels as SUM (+ counts) and is divided once."""
    return PoolingType.SUM if pooling is PoolingType.MEAN else pooling


def split_bags(
    ids: np.ndarray, lengths: np.ndarray, num_partitions: int, weights: np.ndarray | None = None
) -> list[SubBags]:
    """Split bags by partition ``id % num_partitions``; bag order is kept in every part."""
    lengths = np.asarray(lengths, dtype=np.int32)
    if num_partitions == 1:
        return [SubBags(0, ids, lengths, weights)]
    return split_bags_by(ids % num_partitions, num_partitions, ids, lengths, weights)


def split_bags_by(
    part: np.ndarray, num_parts: int, ids: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None
) -> list[SubBags]:
    """Split bags by ``part`` (int [n], the part of each id in ``[0, num_parts)``); bag order is
    kept in every part. ``split_bags`` splits by partition; the shard also splits a bag into the
    rows it reads from its table and the rows a version overlay replaces."""
    lengths = np.asarray(lengths, dtype=np.int32)
    bag_of = np.repeat(np.arange(len(lengths)), lengths)
    order = np.argsort(part, kind="stable")  # ids of each part, bag order kept
    counts = np.bincount(part, minlength=num_parts)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    out = []
    for p in range(num_parts):
        sel = order[bounds[p] : bounds[p + 1]]
        out.append(
            SubBags(
                p,
                ids[sel],
                np.bincount(bag_of[sel], minlength=len(lengths)).astype(np.int32),
                None if weights is None else weights[sel],
            )
        )
    return out


def merge_partials(
    partials: list[tuple[np.ndarray, np.ndarray]], pooling: PoolingType
) -> np.ndarray:
    """Merge per-partition ``(pooled, counts)`` into the pooled result of the whole bags.

    ``partials`` were pooled with ``partial_pooling(pooling)``.
    """
    if len(partials) == 1 and pooling is not PoolingType.MEAN:
        return partials[0][0].astype(np.float32, copy=False)
    pooled = np.stack([p.astype(np.float32, copy=False) for p, _ in partials])  # [P, bags, dim]
    counts = np.stack([c for _, c in partials]).astype(np.int64)  # [P, bags]
    if pooling is PoolingType.SUM:
        return pooled.sum(axis=0)
    if pooling is PoolingType.MEAN:
        total = counts.sum(axis=0)
        sums = pooled.sum(axis=0)
        return (sums / np.maximum(total, 1)[:, None]).astype(np.float32)
    masked = np.where(counts[:, :, None] > 0, pooled, -np.inf)
    out = masked.max(axis=0)
    out[counts.sum(axis=0) == 0] = 0.0
    return out.astype(np.float32)
