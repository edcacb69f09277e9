"""services/core/config.py is the one module of services/ that reads the environment
(STYLE.md: no env reads deep in code; settings come in through the frozen configs)."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
ONLY = "services/core/config.py"
READS = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(|\bfrom os import environ\b")


def test_only_config_reads_the_environment():
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == ONLY or "/_proto/" in rel:
            continue
        offenders += [f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if READS.search(line)]
    assert not offenders, offenders
