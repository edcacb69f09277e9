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
    (or ``version``) and write them to Redis at ``redis_url`` as
    fixed-width records under ``prefix``, ``batch`` entities per MSET (docs/features.md).
    Both sides are read and validated before anything is written. With ``progress``, a line
    per side (entities/s) goes to stderr. Returns the model name, the version, and per side
    (``"users"``, ``"items"``) its WriteStats and layout."""
    import time

    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.storage import CheckpointStore, absolute_uri
    from services.core.clients import make_redis
    from services.core.features import FeatureLayout, write_feature_rows
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
        rows = load_feature_rows(source, side)
        layout.validate(rows, rows.get(layout.id_key, []))
        sides.append((side, layout, rows))

    tty = sys.stderr.isatty()
    client = make_redis(redis_url, auth=redis_auth)
    out: dict[str, object] = {"model": spec.name, "version": v}
    try:
        for side, layout, rows in sides:
            name = f"{side.value}s"
            last = [0.0]

            def say(done: int, total: int, seconds: float, name: str = name, last: list[float] = last) -> None:
                now = time.monotonic()
                if progress and (done == total or now - last[0] >= (0.5 if tty else 5.0)):
                    last[0] = now
                    rate = done / seconds if seconds > 0 else 0.0
                    line = f"{name}: {done:,}/{total:,} ({rate:,.0f} entities/s)"
                    if tty:  # one line, rewritten in place
                        print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
                    else:
                        print(line, file=sys.stderr, flush=True)

            stats = write_feature_rows(client, layout, rows, prefix, batch=batch, progress=say)
            out[name] = {"stats": stats, "layout": layout}
    finally:
        client.close()
    return out
