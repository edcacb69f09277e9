"""The ``redis-kv`` baseline's store side: how embedding rows sit in Redis, and the loader
(``shardrec bench load-kv``) that writes them. The lookup is ``redis_kv.RedisKvLookupClient``.

Layout in Redis (one key per row, as teams that pick this design do)::

    key    {prefix}{table}:<row>   <row> = big-endian uint32 (uint64 when the table has more
                                   than 2**32 rows): 4 bytes, so ``kv:items:`` + 4 B = 13 B
    value  the row's raw float32 little-endian bytes, ``dim * 4`` B (256 B at dim 64)
    meta   {prefix}__meta__        JSON: model, version, dim, tables {name: rows}, key format;
                                   written LAST by the loader, so a partial load has no meta

``load_rows_into_redis`` writes every row of every table (or of ``tables``) with pipelined
MSETs of ``batch_rows`` rows; keys and values are built vectorized (a uint8 key matrix; the
memory-mapped table chunk viewed as one ``V{dim*4}`` item per row).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.core.errors import ConfigError
from services.core.types import Version

KV_FORMAT = "shardrec.redis-kv/v1"
META_SUFFIX = "__meta__"
DEFAULT_PREFIX = "kv:"
ROW_DTYPE = np.dtype("<f4")


# -- keys ---------------------------------------------------------------------------------------


def row_key_width(num_rows: int) -> int:
    """Bytes of the row number in a key: 4 (big-endian uint32) or 8 when rows exceed 2**32."""
    return 4 if num_rows <= 1 << 32 else 8


def row_key_matrix(prefix: str, table: str, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """Keys of ``rows`` of ``table`` as one uint8 matrix ``[n, len(head) + width]``: each line is
    ``{prefix}{table}:`` + the row as big-endian uint32 (uint64 when rows exceed 2**32)."""
    head = f"{prefix}{table}:".encode()
    width = row_key_width(num_rows)
    n, h = len(rows), len(head)
    m = np.empty((n, h + width), dtype=np.uint8)
    m[:, :h] = np.frombuffer(head, dtype=np.uint8)
    m[:, h:] = np.asarray(rows).astype(">u4" if width == 4 else ">u8").view(np.uint8).reshape(n, width)
    return m


def row_keys(prefix: str, table: str, rows: np.ndarray, num_rows: int) -> list[bytes]:
    """Keys of ``rows`` of ``table`` (see ``row_key_matrix``), one bytes object each::

        row_keys("kv:", "items", np.array([1, 258]), 500_000)
        -> [b"kv:items:\x00\x00\x00\x01", b"kv:items:\x00\x00\x01\x02"]
    """
    m = row_key_matrix(prefix, table, rows, num_rows)
    return m.view(f"V{m.shape[1]}").ravel().tolist()


def bulk_args(keys: np.ndarray) -> np.ndarray:
    """Fixed-width keys ``uint8 [n, w]`` as RESP bulk strings ``$w\r\n<key>\r\n``, one line
    each (``uint8 [n, len("$w\r\n") + w + 2]``): the arguments of a packed command."""
    n, w = keys.shape
    head = b"$%d\r\n" % w
    out = np.empty((n, len(head) + w + 2), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head) : len(head) + w] = keys
    out[:, -2:] = np.frombuffer(b"\r\n", dtype=np.uint8)
    return out


def meta_key(prefix: str) -> bytes:
    return f"{prefix}{META_SUFFIX}".encode()


# -- loading ------------------------------------------------------------------------------------


@dataclass
class KvLoadStats:
    """What one ``load_rows_into_redis`` wrote: rows, key and value bytes, seconds, per table."""

    model: str = ""
    version: Version = 0
    rows: int = 0
    key_bytes: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    tables: dict[str, dict[str, float]] = field(default_factory=dict)  # table -> rows, seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def load_rows_into_redis(
    checkpoint_uri: str,
    redis_url: str,
    prefix: str = DEFAULT_PREFIX,
    *,
    version: Version | None = None,
    batch_rows: int = 20000,
    chunks_per_round_trip: int = 2,
    tables: Sequence[str] | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> KvLoadStats:
    """Write every row of every table (or of ``tables``) of ``version`` (default: latest
    complete) into Redis at ``redis_url`` under ``prefix``; see the module docstring for keys.

    The meta key is deleted first and written last, merged with a meta of the same model,
    version and dim already there (so tables may be loaded in several runs). Table files are
    checksummed before their rows are written. ``progress(table, done, total, seconds)`` is
    called after each round trip. Blocking: call from a plain thread, not an event loop.
    """
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_redis

    if batch_rows < 1 or chunks_per_round_trip < 1:
        raise ConfigError(f"batch_rows and chunks_per_round_trip must be >= 1, got {batch_rows}, {chunks_per_round_trip}")
    reader = CheckpointReader(checkpoint_uri)
    v = reader.latest_version() if version is None else version
    spec = reader.manifest(v).model
    names = list(spec.table_names) if not tables else list(tables)
    unknown = [t for t in names if t not in spec.table_names]
    if unknown:
        raise ConfigError(f"model {spec.name!r} has no table(s) {unknown} (tables: {list(spec.table_names)})")
    stats = KvLoadStats(model=spec.name, version=v)
    client = make_redis(redis_url)
    t_all = time.perf_counter()
    try:
        old = read_meta(client.get(meta_key(prefix)))
        client.delete(meta_key(prefix))
        for name in names:
            t_spec = spec.table(name)
            table = reader.open_table(v, name, verify=True)
            t0 = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            queued = 0
            for start in range(0, t_spec.rows, batch_rows):
                stop = min(t_spec.rows, start + batch_rows)
                keys = row_keys(prefix, name, np.arange(start, stop, dtype=np.int64), t_spec.rows)
                # zero-copy: the memory-mapped chunk viewed as one void item per row; tolist()
                # makes the one bytes object per row that redis-py sends
                values = np.ascontiguousarray(table[start:stop]).view(f"V{t_spec.dim * 4}").ravel().tolist()
                flat: list[Any] = [None] * (2 * len(keys))
                flat[0::2] = keys
                flat[1::2] = values
                pipe.execute_command("MSET", *flat)
                stats.key_bytes += len(keys) * len(keys[0])  # one width per table
                stats.value_bytes += (stop - start) * t_spec.dim * 4
                queued += 1
                if queued == chunks_per_round_trip or stop == t_spec.rows:
                    pipe.execute()
                    queued = 0
                    if progress is not None:
                        progress(name, stop, t_spec.rows, time.perf_counter() - t0)
            seconds = time.perf_counter() - t0
            stats.rows += t_spec.rows
            stats.tables[name] = {"rows": t_spec.rows, "seconds": seconds}
        kept = {}
        if old and (old.get("model"), old.get("version"), old.get("dim")) == (spec.name, v, spec.dense_arch.embedding_dim):
            kept = dict(old.get("tables", {}))
        kept.update({n: spec.table(n).rows for n in names})
        meta = {
            "format": KV_FORMAT,
            "model": spec.name,
            "version": v,
            "dim": spec.dense_arch.embedding_dim,
            "dtype": "float32 little-endian",
            "key": "{prefix}{table}: + row as big-endian uint32 (uint64 when rows > 2**32)",
            "tables": kept,
            "checkpoint": str(checkpoint_uri),
        }
        client.set(meta_key(prefix), json.dumps(meta, sort_keys=True).encode())
    finally:
        client.close()
    stats.seconds = time.perf_counter() - t_all
    return stats


def read_meta(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == KV_FORMAT else None
