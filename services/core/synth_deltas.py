"""Drift deltas of the demo model: a few hot rows of every table changed, from a seed
(``shardrec model synth --deltas``, ``shardrec model drift``; docs/checkpoint.md, "Producing
deltas"). The base model itself is ``services.core.synth``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.storage import CheckpointStore, as_store
from services.core.checkpoint.writer import next_version, write_delta
from services.core.errors import ConfigError
from services.core.synth import (
    _DRIFT_DRAW_ROUNDS,
    _STREAM_DELTA_DENSE,
    _STREAM_DELTA_IDS,
    _STREAM_DELTA_ROWS,
    DENSE_DRIFT,
    TABLE_STD,
    Preset,
    _stream,
    model_spec,
    power_law_ids,
)
from services.core.types import Version


def drift_ids(rng: np.random.Generator, k: int, num_rows: int) -> np.ndarray:
    """``k`` unique int64 ids in ``[0, num_rows)``, sorted, drawn with ``power_law_ids``: the
    first ``k`` distinct ids of the draws in draw order (sampling without replacement, so hot
    ids are over-represented). After a few rounds, any still missing come uniformly from the
    ids not drawn yet."""
    if not 0 <= k <= num_rows:
        raise ValueError(f"k must be in [0, {num_rows}], got {k}")
    chosen = np.empty(0, dtype=np.int64)
    for _ in range(_DRIFT_DRAW_ROUNDS):
        if len(chosen) == k:
            break
        drawn = np.concatenate([chosen, power_law_ids(rng, 2 * (k - len(chosen)) + 16, num_rows)])
        _, first = np.unique(drawn, return_index=True)
        chosen = drawn[np.sort(first)][:k]
    if len(chosen) < k:
        rest = np.setdiff1d(np.arange(num_rows, dtype=np.int64), chosen, assume_unique=True)
        chosen = np.concatenate([chosen, rng.choice(rest, k - len(chosen), replace=False)])
    return np.sort(chosen)


def drift_rows(num_rows: int, drift: float) -> int:
    """How many rows of a table of ``num_rows`` a drift delta changes: ``round(drift * rows)``,
    at least 1 (so every table changes), at most ``num_rows``."""
    return min(num_rows, max(1, round(drift * num_rows)))


def synthesize_deltas(
    root: CheckpointStore | str | os.PathLike[str],
    preset: str | Preset,
    count: int,
    drift: float = 0.01,
    seed: int = 0,
    first_parent: Version | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> list[Version]:
    """Write ``count`` drift deltas of the demo model at ``preset`` below ``root``, numbered from
    ``next_version(root)``: the first on ``first_parent`` (default: the latest complete
    version), each next one on the previous. Returns their versions.

    Each changes ``drift_rows(rows, drift)`` rows of every table (``drift_ids``: power-law, hot
    ids more often) to new normal(0, TABLE_STD) rows; a delta of an even version also replaces
    the dense weights (the parent's, each multiplied by ``1 + DENSE_DRIFT * normal``). Every
    draw comes from a stream keyed by (seed, the version written, the table), so the same root,
    seed and arguments give byte-identical deltas. ``progress`` receives one line per delta.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"count must be an int >= 0, got {count!r}")
    if not 0.0 < drift <= 1.0:
        raise ConfigError(f"drift must be in (0, 1], got {drift!r}")
    spec = model_spec(preset)
    store = as_store(root)
    reader = CheckpointReader(store)
    parent = reader.latest_version() if first_parent is None else first_parent
    say = progress or (lambda _line: None)
    written: list[Version] = []
    version = next_version(store)
    for _ in range(count):
        t0 = time.perf_counter()
        rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i, t in enumerate(spec.tables):
            k = drift_rows(t.rows, drift)
            ids = drift_ids(_stream(seed, _STREAM_DELTA_IDS, version, i), k, t.rows)
            values = _stream(seed, _STREAM_DELTA_ROWS, version, i).standard_normal((k, t.dim), dtype=np.float32)
            values *= np.float32(TABLE_STD)
            rows[t.name] = (ids, values)
        dense = None
        if version % 2 == 0:
            rng = _stream(seed, _STREAM_DELTA_DENSE, version, 0)
            dense = {
                name: (w * (1.0 + DENSE_DRIFT * rng.standard_normal(w.shape))).astype(np.float32)
                for name, w in sorted(reader.dense_state(parent, verify=False).items())
            }
        write_delta(store, version, parent, spec, rows, dense)
        say(f"delta {version} (parent {parent}): {sum(len(ids) for ids, _ in rows.values()):,} rows in {time.perf_counter() - t0:.1f} s")
        written.append(version)
        parent, version = version, version + 1
    return written
