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
    import logging

    from services.core.config import SHARD_SETTINGS, resolve, shard_config

    config = shard_config(resolve(SHARD_SETTINGS, args))
    logging.basicConfig(level=config.log.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.embedding_shard.main import run

    return run(config)
