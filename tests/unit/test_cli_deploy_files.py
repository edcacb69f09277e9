"""Every ``shardrec`` subcommand and flag the deploy files use (compose file, Kubernetes
manifests) exists in the CLI's parser. Text-level checks: PyYAML is not a dependency."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from services.admin.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def _commands(text: str) -> list[list[str]]:
    """Every ``shardrec ...`` command line (shell form, up to ``;``, ``>`` or ``&&``) and every
    ``args``/``command`` list that starts with a service group (exec form). Comment lines and
    backslash line continuations are dealt with first."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    text = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in re.findall(r"shardrec ((?:[a-z]+ )+[^\n;>&]*)", text):
        found.append(line.split())
    for flow in re.findall(r'command: \[("(?:shard|frontend)"[^\]]*)\]', text):
        found.append(json.loads(f"[{flow}]"))
    for block in re.findall(r"args:\n((?:\s+- .*\n)+)", text):
        items = [m.strip().strip('"') for m in re.findall(r"^\s+- (.*)$", block, re.MULTILINE)]
        if items and items[0] in ("shard", "frontend"):
            found.append(items)
    return found


def _check(argv: list[str], parser: argparse.ArgumentParser) -> None:
    """The subcommand path and every ``--flag`` of ``argv`` exist."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        assert word in subs[0].choices, f"unknown command {word!r} in {argv}"
        parser = subs[0].choices[word]
    flags = {s for a in parser._actions for s in a.option_strings}
    for arg in argv:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"unknown flag {arg} in {argv}"


@pytest.mark.parametrize("path", [DEPLOY / "compose.yaml", *K8S], ids=lambda p: p.name)
def test_deploy_files_use_existing_commands_and_flags(path: Path) -> None:
    parser = build_parser()
    commands = _commands(path.read_text())
    for argv in commands:
        _check(argv, parser)
    if path.name in ("compose.yaml", "shard-statefulset.yaml", "frontend.yaml", "placement-init-job.yaml"):
        assert commands, f"no shardrec command found in {path.name}"
