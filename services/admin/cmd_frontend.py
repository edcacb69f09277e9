"""``shardrec frontend serve``: run one Recommend frontend. Its settings (flags,
``$SHARDREC_*``, ``--config FILE``) are ``services.core.config.FrontendConfig``'s;
docs/configuration.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from services.core.config import FRONTEND_SETTINGS

    p = sub.add_parser("frontend", help="Recommend frontend service")
    s = p.add_subparsers(dest="frontend_command", metavar="SUBCOMMAND", required=True)
    serve = s.add_parser("serve", help="serve Recommend over the cluster's shards (or a baseline: --lookup)")
    FRONTEND_SETTINGS.add_arguments(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from services.core.config import FRONTEND_SETTINGS, frontend_config, resolve
    from services.core.logs import setup_logging

    config = frontend_config(resolve(FRONTEND_SETTINGS, args))
    setup_logging("frontend", config.frontend_id, fmt=config.observability.log_format, level=config.observability.log_level)
    if config.workers > 1:  # the supervisor imports no serving code (its workers are fresh interpreters)
        from services.frontend.workers import run_workers

        return run_workers(config)
    from services.frontend.main import run

    return run(config)
