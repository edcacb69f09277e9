"""The arrays of a version (docs/checkpoint.md, "Tables" and "Deltas"): checked ``.npy``
memory maps, and a table's rows at a version from its base rows and its deltas' rows.

Pure module: numpy only (no torch, no grpc).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from services.core.checkpoint.manifest import TABLE_DTYPE
from services.core.errors import CheckpointError

# One delta's changes to one table: (ids int64 [k] strictly increasing, rows float32 [k, dim]).
DeltaRows = tuple[np.ndarray, np.ndarray]


def open_npy(local: str | os.PathLike[str], where: str, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """A read-only memory map of the ``.npy`` file ``local`` after checking that its header is
    ``dtype``, C order and ``shape`` (``shape`` None: any 1-D). CheckpointError prefixed with
    ``where`` otherwise."""
    try:
        with open(local, "rb") as f:
            npy_version = np.lib.format.read_magic(f)
            if npy_version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif npy_version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {npy_version} (expected 1.0 or 2.0)")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: not a readable .npy file: {e}") from e
    shape_ok = len(got_shape) == 1 if shape is None else tuple(got_shape) == shape
    if not shape_ok or got_dtype != dtype or (fortran and len(got_shape) > 1):
        want = "[k]" if shape is None else list(shape)
        raise CheckpointError(
            f"{where}: expected {dtype.name} {want} C order, got {got_dtype} {list(got_shape)}"
            f"{' Fortran order' if fortran and len(got_shape) > 1 else ''}"
        )
    try:
        return np.load(local, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{where}: cannot memory-map: {e}") from e


def materialize(base: np.ndarray, deltas: Sequence[DeltaRows], start: int, stop: int, step: int) -> np.ndarray:
    """Rows ``start:stop:step`` of a table at a version, as a new writable C-contiguous float32
    array: the base rows (a memory-map slice: only those pages are read), then every delta in
    chain order, restricted to the ids in that range (``searchsorted`` on the sorted ids)."""
    out = np.array(base[start:stop:step], dtype=TABLE_DTYPE, order="C", copy=True)
    apply_deltas(out, deltas, start, stop, step)
    return out


def apply_deltas(out: np.ndarray, deltas: Sequence[DeltaRows], start: int, stop: int, step: int) -> None:
    """Write into ``out`` (rows ``start:stop:step`` of a table) every delta's rows in that range,
    in chain order."""
    for ids, rows in deltas:
        lo, hi = (int(i) for i in np.searchsorted(ids, [start, stop]))
        if lo == hi:
            continue
        offset = np.asarray(ids[lo:hi]) - start
        if step == 1:
            out[offset] = rows[lo:hi]
            continue
        hit = np.flatnonzero(offset % step == 0)
        out[offset[hit] // step] = rows[lo + hit]
