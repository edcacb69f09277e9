"""The ``shardrec`` command line. Each command group lives in its own module and imports its
service lazily inside the handler, so ``shardrec --help`` stays light (no torch, no grpc)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Command group modules; each exposes ``register(subparsers)`` and sets ``func`` on its parsers.
GROUPS = (
    "services.admin.cmd_model",
    "services.admin.cmd_checkpoint",
    "services.admin.cmd_placement",
    "services.admin.cmd_rebalance",
    "services.admin.cmd_shard",
    "services.admin.cmd_features",
    "services.admin.cmd_frontend",
    "services.admin.cmd_cluster",
    "services.admin.cmd_config",
    "services.admin.cmd_kv",
    "services.admin.cmd_bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardrec", description="Distributed, embedding-sharded recommendation inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from services.core.errors import ShardrecError

    try:
        return int(func(args) or 0)
    except ShardrecError as e:
        print(f"shardrec: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
