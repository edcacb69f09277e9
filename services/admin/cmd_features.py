"""``shardrec features``: stored user / item features in Redis (docs/features.md).

- ``load --checkpoint URI --redis URL [--prefix P] [--batch N] [--version V] [--features ROOT]``:
  read ``features/users.npz`` and ``features/items.npz`` below the checkpoint root (or below
  ``--features ROOT``), validate them
  against the model manifest of the latest complete version (or ``--version``), encode them as
  fixed-width records and write them as a new generation with pipelined MSETs of ``--batch``
  entities, then switch the store's marker to it and delete the generation it replaced.
  Nothing is written when the rows are invalid. A progress line (entities/s) goes to stderr, a
  summary to stdout. The work is ``services.control.features``.
- ``status --checkpoint URI --redis URL [--prefix P] [--version V]``: the store's marker (live
  generation, entity counts, when and from where it was loaded) or that it is lost, the
  generations that may have records, and a load in progress. Exit code 3 when it is lost.
"""

from __future__ import annotations

import argparse

from services.admin.flags import redis_auth_args, redis_auth_config


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
    load.add_argument(
        "--features", default=None, metavar="ROOT", help="read features/{users,items}.npz below this folder instead (e.g. another checkpoint root)"
    )
    redis_auth_args(load)
    load.set_defaults(func=_load)
    status = sub.add_parser("status", help="the feature store's live generation, or that it is lost")
    status.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI (for the model's layouts)")
    status.add_argument("--redis", required=True, metavar="URL", help="Redis URL (redis:// or redis+sentinel://)")
    status.add_argument("--prefix", default="", help="key prefix (as loaded); default none")
    status.add_argument("--version", type=int, default=None, help="manifest version to read the model from (default: latest complete)")
    redis_auth_args(status)
    status.set_defaults(func=_status)


def _load(args: argparse.Namespace) -> int:
    from services.control.features import load_features

    result = load_features(args.checkpoint, args.redis, prefix=args.prefix, batch=args.batch, version=args.version,
                           features=args.features, redis_auth=redis_auth_config(args))  # fmt: skip
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


def _status(args: argparse.Namespace) -> int:
    import time

    from services.control.features import feature_store_status

    st = feature_store_status(args.checkpoint, args.redis, prefix=args.prefix, version=args.version, redis_auth=redis_auth_config(args))
    keys, marker = st["keys"], st["marker"]
    print(f"feature store {keys.marker} at {args.redis}")  # type: ignore[attr-defined]
    if marker is None:
        print("  LOST: no marker (Redis restarted without its data, was flushed, or the features were never loaded); "
              "frontends answer UNAVAILABLE until a frontend's feature sync or 'shardrec features load' reloads it")  # fmt: skip
    else:
        m = marker
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.loaded_at))  # type: ignore[attr-defined]
        print(f"  generation {m.generation}: {m.users:,} users, {m.items:,} items, loaded {when} "  # type: ignore[attr-defined]
              f"from {m.source or '?'} version {m.version} (load {m.load_id})")  # type: ignore[attr-defined]  # fmt: skip
    print(f"  generations with records: {st['generations'] or 'none'}")
    if st["lock_ms"] is not None:
        print(f"  a load is in progress (its lock expires in {st['lock_ms']} ms unless renewed)")
    return 0 if marker is not None else 3
