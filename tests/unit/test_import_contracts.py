"""The import contracts of pyproject.toml ([tool.importlinter]) hold: each is checked by
import-linter's own CLI (``lint-imports --contract ID``), so a broken one fails here naming the
import chain."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]

# Contracts the code breaks today, each to be removed from here when the change named lands
# (strict: the test fails as soon as the contract holds, so the marker cannot outlive it).
BROKEN_TODAY = {
}

LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_every_contract_has_an_id():
    ids = [c.get("id") for c in CONTRACTS]
    assert all(ids) and len(set(ids)) == len(ids), ids
    assert set(BROKEN_TODAY) <= set(ids)


@pytest.mark.parametrize(
    "contract_id",
    [
        pytest.param(c["id"], marks=pytest.mark.xfail(strict=True, reason=BROKEN_TODAY[c["id"]]))
        if c["id"] in BROKEN_TODAY
        else c["id"]
        for c in CONTRACTS
    ],
)
def test_import_contract_holds(contract_id: str):
    proc = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-logo", "--no-cache", "--contract", contract_id],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
