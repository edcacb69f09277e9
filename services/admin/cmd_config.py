"""``shardrec config show frontend|shard [FLAGS...]``: the settings ``frontend serve`` or ``shard
serve`` would run with, given the same flags (and this environment and ``--config`` file), as
TOML with where each value came from; secrets masked. The settings are validated as at start
(docs/configuration.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import FRONTEND_SETTINGS, SHARD_SETTINGS

    p = sub.add_parser("config", help="the settings of the service processes")
    s = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = s.add_parser("show", help="the effective settings of a process and where each came from (flags, environment, file, default)")
    which = show.add_subparsers(dest="process", metavar="PROCESS", required=True)
    for table, what in ((FRONTEND_SETTINGS, "frontend serve"), (SHARD_SETTINGS, "shard serve")):
        q = which.add_parser(table.process, help=f"the settings '{what}' would run with, given the same flags")
        table.add_arguments(q)
        q.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from services.core.config import FRONTEND_SETTINGS, SHARD_SETTINGS, frontend_config, resolve, shard_config

    table, build = (FRONTEND_SETTINGS, frontend_config) if args.process == "frontend" else (SHARD_SETTINGS, shard_config)
    resolved = resolve(table, args)
    build(resolved)  # the checks of the start: a bad file or a conflict fails here too
    print(f"# {table.process} serve: flags > environment > --config file > defaults (docs/configuration.md)")
    for line in resolved.lines():
        print(line)
    return 0
