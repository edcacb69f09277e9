"""Stored features into Redis (``shardrec features load``; docs/features.md)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.config import RedisAuth


def load_features(
    checkpoint: str,
    redis_url: str,
    *,
    prefix: str = "",
    batch: int = 5000,
    version: int | None = None,
    progress: bool = True,
    features: str | None = None,
    redis_auth: "RedisAuth | None" = None,
) -> dict[str, object]:
    """Validate ``features/{users,items}.npz`` of ``checkpoint`` (or of the root ``features``,
    e.g. another checkpoint's) against the model of the checkpoint's latest complete version
    (or ``version``) and write them to Redis at ``redis_url`` as a new generation of
    fixed-width records under ``prefix``, ``batch`` entities per MSET, then switch the store's
    marker to it (the marker's ``source`` names the root the rows came from) and delete the
    generation it replaced (docs/features.md). Both sides are read and validated before
    anything is written. With ``progress``, a line per side (entities/s) goes to stderr.
    Returns the model name, the version, the LoadResult (``"load"``: marker, replaced marker,
    keys deleted), the store's keys (``"keys"``) and per side (``"users"``, ``"items"``) its
    WriteStats and layout. LoadBusyError while another load of the store runs."""
    import time

    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.storage import CheckpointStore, absolute_uri
    from services.core.clients import make_redis
    from services.core.feature_store import StoreKeys, load_generation
    from services.core.features import FeatureLayout
    from services.core.synth import load_feature_rows
    from services.core.types import FeatureSide

    if batch < 1:
        from services.core.errors import ConfigError

        raise ConfigError(f"--batch must be >= 1, got {batch}")
    reader = CheckpointReader(absolute_uri(checkpoint))
    source = reader.store if features is None else CheckpointStore(absolute_uri(features))
    v = reader.latest_version() if version is None else version
    spec = reader.manifest(v).model
    sides = []
    for side in (FeatureSide.USER, FeatureSide.ITEM):
        layout = FeatureLayout(spec, side)
        sides.append((layout, load_feature_rows(source, side)))  # validated by load_generation

    tty = sys.stderr.isatty()
    last = {"users": 0.0, "items": 0.0}

    def say(name: str, done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if progress and (done == total or now - last[name] >= (0.5 if tty else 5.0)):
            last[name] = now
            rate = done / seconds if seconds > 0 else 0.0
            line = f"{name}: {done:,}/{total:,} ({rate:,.0f} entities/s)"
            if tty:  # one line, rewritten in place
                print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)

    keys = StoreKeys.of(prefix, sides[0][0], sides[1][0])
    client = make_redis(redis_url, auth=redis_auth)
    try:
        result = load_generation(client, keys, sides, source=source.uri, version=v, batch=batch, progress=say)
    finally:
        client.close()
    assert result is not None
    out: dict[str, object] = {"model": spec.name, "version": v, "load": result, "keys": keys}
    for (layout, _rows), name, stats in zip(sides, ("users", "items"), result.written):
        out[name] = {"stats": stats, "layout": layout}
    return out


def feature_store_status(
    checkpoint: str, redis_url: str, *, prefix: str = "", version: int | None = None, redis_auth: "RedisAuth | None" = None
) -> dict[str, object]:
    """What ``shardrec features status`` prints: for the model of ``checkpoint`` (latest
    complete version, or ``version``) under ``prefix``, the store's keys, its live marker (None:
    the store is lost or was never loaded), the generations that may have records, and how long
    a load in progress still holds the lock (None: no load runs)."""
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_redis
    from services.core.feature_store import StoreKeys, read_marker
    from services.core.features import FeatureLayout
    from services.core.types import FeatureSide

    reader = CheckpointReader(checkpoint)
    spec = reader.manifest(reader.latest_version() if version is None else version).model
    keys = StoreKeys.of(prefix, FeatureLayout(spec, FeatureSide.USER), FeatureLayout(spec, FeatureSide.ITEM))
    client = make_redis(redis_url, timeout_s=5.0, auth=redis_auth)
    try:
        lock_ms = int(client.pttl(keys.lock))
        return {
            "keys": keys,
            "marker": read_marker(client, keys),
            "generations": sorted(int(g) for g in client.smembers(keys.generations)),
            "lock_ms": lock_ms if lock_ms >= 0 else None,
        }
    finally:
        client.close()
