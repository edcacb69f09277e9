"""``shardrec features``: stored user / item features in Redis (docs/features.md).

- ``load --checkpoint URI --redis URL [--prefix P] [--batch N] [--version V]``: read
  ``features/users.npz`` and ``features/items.npz`` below the checkpoint root, validate them
  against the model manifest of the latest complete version (or ``--version``), encode them as
  fixed-width records and write them as a new generation with pipelined MSETs of ``--batch``
  entities, then switch the store's marker to it and delete the generation it replaced.
  Nothing is written when the rows are invalid. A progress line (entities/s) goes to stderr, a
  summary to stdout. The work is ``services.control.features``.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    feats = subparsers.add_parser("features", help="stored user / item features in Redis")
    sub = feats.add_subparsers(dest="features_command", metavar="SUBCOMMAND", required=True)
    load = sub.add_parser("load", help="validate features/{users,items}.npz and write them to Redis")
    load.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    load.add_argument("--redis", required=True, metavar="URL",
                      help="Redis URL, e.g. redis://127.0.0.1:6379/0 or redis+sentinel://host:port[,host:port...]/master[/db]")
    load.add_argument("--prefix", default="", help="key prefix (the frontend must use the same); default none")
    load.add_argument("--batch", type=int, default=5000, help="entities per MSET (default 5000)")
    load.add_argument("--version", type=int, default=None, help="manifest version to read the model from (default: latest complete)")
    load.set_defaults(func=_load)


def _load(args: argparse.Namespace) -> int:
    from services.control.features import load_features

    result = load_features(args.checkpoint, args.redis, prefix=args.prefix, batch=args.batch, version=args.version)
    load, keys = result["load"], result["keys"]
    replaced = "none" if load.replaced is None else f"generation {load.replaced.generation}"  # type: ignore[attr-defined]
    print(f"model {result['model']!r} version {result['version']} -> {args.redis} (prefix {args.prefix!r}): "
          f"generation {load.marker.generation} live (marker {keys.marker}), replaced {replaced}, "  # type: ignore[attr-defined]
          f"{load.deleted_keys:,} old keys deleted")  # type: ignore[attr-defined]  # fmt: skip
    prefix = keys.generation_prefix(load.marker.generation)  # type: ignore[attr-defined]
    for name in ("users", "items"):
        entry = result[name]
        stats, layout = entry["stats"], entry["layout"]  # type: ignore[index]
        rate = stats.entities / stats.seconds if stats.seconds > 0 else 0.0
        print(
            f"  {name}: {stats.entities:,} records of {layout.record_bytes} B "
            f"({stats.record_bytes / 2**20:,.1f} MiB) in {stats.seconds:.2f} s ({rate:,.0f}/s), "
            f"keys {layout.key(prefix, 0).decode()[:-1]}<id>"
        )
    return 0
