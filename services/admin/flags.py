"""Flags shared by several commands: Redis AUTH (docs/security.md), declared once on
``services.core.config.RedisAuth``."""

from __future__ import annotations

import argparse


def redis_auth_args(p: argparse.ArgumentParser) -> None:
    from services.core.config import REDIS_AUTH_SETTINGS

    REDIS_AUTH_SETTINGS.add_arguments(p, config_file=False)


def redis_auth_config(args: argparse.Namespace):  # noqa: ANN201 - RedisAuth
    from services.core.config import REDIS_AUTH_SETTINGS, resolve

    return REDIS_AUTH_SETTINGS.build(resolve(REDIS_AUTH_SETTINGS, args))
