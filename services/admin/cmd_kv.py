"""``shardrec bench load-kv``: write a checkpoint's embedding rows into Redis for the ``redis-kv``
baseline (``shardrec frontend serve --lookup redis-kv``).

- ``load-kv --checkpoint URI --redis URL [--prefix kv:] [--version V] [--tables a,b]
  [--batch-rows N]``: one key per row (``{prefix}{table}:`` + the row as big-endian uint32), the
  raw float32 row as the value, pipelined MSETs of ``--batch-rows`` rows, then a meta key that
  the frontend checks at startup (``services.frontend.lookup.baselines.redis_kv_store``). A progress line (rows/s)
  goes to stderr, a summary to stdout. The demo preset (1.5M rows x 256 B) takes ~4 s and
  ~575 MiB of Redis memory on a 2-core machine.

The ``bench`` command group may hold other subcommands registered by other modules:
``bench_subcommands`` returns the group's subparsers, creating the group only when it is not
there yet, so every module that adds a ``bench`` subcommand should go through it.
"""

from __future__ import annotations

import argparse
import sys


def bench_subcommands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of the ``shardrec bench`` group, created on first use."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks and the comparison baselines' setup")
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = bench_subcommands(subparsers)
    load = sub.add_parser("load-kv", help="write a checkpoint's embedding rows into Redis for the redis-kv baseline")
    load.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    load.add_argument("--redis", required=True, metavar="URL", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    load.add_argument("--prefix", default="kv:", help="key prefix (the frontend's --kv-prefix; default 'kv:')")
    load.add_argument("--version", type=int, default=None, help="checkpoint version (default: latest complete)")
    load.add_argument("--tables", default="", help="comma-separated tables to load (default: every table)")
    load.add_argument("--batch-rows", type=int, default=20000, help="rows per MSET (default 20000)")
    load.set_defaults(func=_load_kv)


def _load_kv(args: argparse.Namespace) -> int:
    import time

    from services.core.clients import make_redis
    from services.frontend.lookup.baselines.redis_kv_store import load_rows_into_redis

    tty = sys.stderr.isatty()
    last = [0.0]

    def say(table: str, done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= (0.5 if tty else 5.0):
            last[0] = now
            rate = done / seconds if seconds > 0 else 0.0
            line = f"{table}: {done:,}/{total:,} rows ({rate:,.0f} rows/s)"
            if tty:
                print(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)

    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    stats = load_rows_into_redis(
        args.checkpoint, args.redis, args.prefix, version=args.version, batch_rows=args.batch_rows, tables=tables or None, progress=say
    )
    client = make_redis(args.redis)
    try:
        used = client.info("memory").get("used_memory_human", "?")
    finally:
        client.close()
    print(
        f"model {stats.model!r} version {stats.version} -> {args.redis} (prefix {args.prefix!r}): "
        f"{stats.rows:,} rows, {stats.value_bytes / 2**20:,.1f} MiB of rows + {stats.key_bytes / 2**20:,.1f} MiB of keys "
        f"in {stats.seconds:.2f} s ({stats.rows_per_s:,.0f} rows/s); Redis used_memory {used}"
    )
    for name, t in stats.tables.items():
        print(f"  {name}: {int(t['rows']):,} rows in {t['seconds']:.2f} s")
    return 0
