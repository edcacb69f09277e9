"""``shardrec shard serve``: run one embedding shard node. Its settings (flags, ``$SHARDREC_*``,
``--config FILE``) are ``services.core.config.ShardConfig``'s; docs/configuration.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import SHARD_SETTINGS

    p = sub.add_parser("shard", help="embedding shard service")
    s = p.add_subparsers(dest="shard_command", metavar="SUBCOMMAND", required=True)
    serve = s.add_parser("serve", help="serve the partitions the shard map assigns to NODE_ID")
    SHARD_SETTINGS.add_arguments(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from services.core.config import SHARD_SETTINGS, resolve, shard_config
    from services.core.logs import setup_logging

    config = shard_config(resolve(SHARD_SETTINGS, args))
    setup_logging("shard", config.node_id, fmt=config.observability.log_format, level=config.observability.log_level)
    from services.embedding_shard.main import run

    return run(config)
