"""Every flag and argument of every ``shardrec`` command has help text (the parser walked)."""

from __future__ import annotations

import argparse

from services.admin.cli import build_parser


def _actions(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_flag_has_help_text():
    found = list(_actions(build_parser(), "shardrec"))
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in found if not (a.help or "").strip()]
    assert len(found) > 200 and not missing, missing
