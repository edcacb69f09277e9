"""``shardrec features``: stored user / item features in Redis (docs/features.md).

- ``load --checkpoint URI --redis URL [--prefix P] [--batch N] [--version V]``: read
  ``features/users.npz`` and ``features/items.npz`` below the checkpoint root, validate them
  against the model manifest of the latest complete version (or ``--version``), encode them as
  fixed-width records and write them with pipelined MSETs of ``--batch`` entities. Nothing of a
  side is written when its rows are invalid. A progress line (entities/s) goes to stderr, a
  summary to stdout.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    feats = subparsers.add_parser("features", help="stored user / item features in Redis")
    sub = feats.add_subparsers(dest="features_command", metavar="SUBCOMMAND", required=True)
    load = sub.add_parser("load", help="validate features/{users,items}.npz and write them to Redis")
    load.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    load.add_argument("--redis", required=True, metavar="URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    load.add_argument("--prefix", default="", help="key prefix (the frontend must use the same); default none")
    load.add_argument("--batch", type=int, default=5000, help="entities per MSET (default 5000)")
    load.add_argument("--version", type=int, default=None, help="manifest version to read the model from (default: latest complete)")
    load.set_defaults(func=_load)


def load_features(
    checkpoint: str,
    redis_url: str,
    *,
    prefix: str = "",
    batch: int = 5000,
    version: int | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """What ``shardrec features load`` does; returns, per side, the WriteStats and layout.

    Both sides are read and validated before anything is written.
    """
    import time

    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_redis
    from services.core.features import FeatureLayout, write_feature_rows
    from services.core.synth import load_feature_rows
    from services.core.types import FeatureSide

    if batch < 1:
        from services.core.errors import ConfigError

        raise ConfigError(f"--batch must be >= 1, got {batch}")
    reader = CheckpointReader(checkpoint)
    v = reader.latest_version() if version is None else version
    spec = reader.manifest(v).model
    sides = []
    for side in (FeatureSide.USER, FeatureSide.ITEM):
        layout = FeatureLayout(spec, side)
        rows = load_feature_rows(reader.store, side)
        layout.validate(rows, rows.get(layout.id_key, []))
        sides.append((side, layout, rows))

    tty = sys.stderr.isatty()
    client = make_redis(redis_url)
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


def _load(args: argparse.Namespace) -> int:
    result = load_features(args.checkpoint, args.redis, prefix=args.prefix, batch=args.batch, version=args.version)
    print(f"model {result['model']!r} version {result['version']} -> {args.redis} (prefix {args.prefix!r})")
    for name in ("users", "items"):
        entry = result[name]
        stats, layout = entry["stats"], entry["layout"]  # type: ignore[index]
        rate = stats.entities / stats.seconds if stats.seconds > 0 else 0.0
        print(
            f"  {name}: {stats.entities:,} records of {layout.record_bytes} B "
            f"({stats.record_bytes / 2**20:,.1f} MiB) in {stats.seconds:.2f} s ({rate:,.0f}/s), "
            f"keys {layout.key(args.prefix, 0).decode()[:-1]}<id>"
        )
    return 0
