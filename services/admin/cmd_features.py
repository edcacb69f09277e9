"""``shardrec features``: stored user / item features in Redis (docs/features.md).

- ``load --checkpoint URI --redis URL [--prefix P] [--batch N] [--version V] [--features ROOT]``:
  read ``features/users.npz`` and ``features/items.npz`` below the checkpoint root (or below
  ``--features ROOT``), validate them
  against the model manifest of the latest complete version (or ``--version``), encode them as
  fixed-width records and write them with pipelined MSETs of ``--batch`` entities. Nothing of a
  side is written when its rows are invalid. A progress line (entities/s) goes to stderr, a
  summary to stdout. The work is ``services.control.features``.
"""

from __future__ import annotations

import argparse

from services.admin.flags import redis_auth_args, redis_auth_config


def register(subparsers: argparse._SubParsersAction) -> None:
    feats = subparsers.add_parser("features", help="stored user / item features in Redis")
    sub = feats.add_subparsers(dest="features_command", metavar="SUBCOMMAND", required=True)
    load = sub.add_parser("load", help="validate features/{users,items}.npz and write them to Redis")
    load.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    load.add_argument("--redis", required=True, metavar="URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    load.add_argument("--prefix", default="", help="key prefix (the frontend must use the same); default none")
    load.add_argument("--batch", type=int, default=5000, help="entities per MSET (default 5000)")
    load.add_argument("--version", type=int, default=None, help="manifest version to read the model from (default: latest complete)")
    load.add_argument(
        "--features", default=None, metavar="ROOT", help="read features/{users,items}.npz below this folder instead (e.g. another checkpoint root)"
    )
    redis_auth_args(load)
    load.set_defaults(func=_load)


def _load(args: argparse.Namespace) -> int:
    from services.control.features import load_features

    result = load_features(args.checkpoint, args.redis, prefix=args.prefix, batch=args.batch, version=args.version,
                           features=args.features, redis_auth=redis_auth_config(args))  # fmt: skip
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
