"""``shardrec checkpoint delta|show|verify|compact|gc`` as commands, on real files: what they
print, their refusals and exit codes."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest

from services.admin import cmd_checkpoint
from services.core.checkpoint.reader import CheckpointReader
from services.core.checkpoint.writer import write_base, write_delta
from services.core.errors import CheckpointError
from tests.support.tiny_checkpoint import tiny_dense, tiny_tables
from tests.unit.test_checkpoint_tools import SPEC, _rows, live  # noqa: F401  (live: a fixture)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardrec")
    cmd_checkpoint.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_delta_show_verify_compact_gc(live, tmp_path, capsys):
    tables = tiny_tables(SPEC)
    tables["items"][[3, 4]] = 0.5
    write_base(tmp_path / "export", 1, SPEC, tables, tiny_dense(SPEC, 1))
    assert _run(["checkpoint", "delta", "--from", f"{live}/versions/1", "--to", f"file://{tmp_path}/export/versions/1", "--out", str(live)]) == 0
    out = capsys.readouterr().out
    assert f"delta 2 (parent 1) written to {live}" in out
    assert re.search(r"items +2 of 37 rows changed", out) and re.search(r"users +0 of 50 rows changed", out)
    assert "dense weights: changed" in out and "bytes" in out

    assert _run(["checkpoint", "show", "--checkpoint", str(live)]) == 0
    shown = capsys.readouterr().out
    assert "version 2: delta, parent 1" in shown and "table items: 2 of 37 rows changed" in shown
    assert "table users" not in shown.split("version 2:")[1] and "dense weights: replaced" in shown

    assert _run(["checkpoint", "verify", "--checkpoint", str(live)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {live} version 2 (delta of 1)")

    assert _run(["checkpoint", "compact", "--checkpoint", str(live), "--version", "2"]) == 0
    assert f"base 3 written to {live}: equal to version 2" in capsys.readouterr().out
    np.testing.assert_array_equal(CheckpointReader(live).open_table(3, "items"), tables["items"])

    assert _run(["checkpoint", "gc", "--checkpoint", str(live), "--keep", "1", "--protect", "2"]) == 0
    assert "nothing to delete" in capsys.readouterr().out
    assert _run(["checkpoint", "gc", "--checkpoint", str(live), "--keep", "1"]) == 0
    assert f"deleted 2 version(s) from {live}: 1, 2" in capsys.readouterr().out


def test_cli_delta_refuses_a_from_outside_the_out_root(live, tmp_path):
    write_base(tmp_path / "export", 1, SPEC, tiny_tables(SPEC), tiny_dense(SPEC))
    with pytest.raises(CheckpointError, match="must be a version of --out"):
        _run(["checkpoint", "delta", "--from", f"{tmp_path}/export/versions/1", "--to", f"{tmp_path}/export/versions/1", "--out", str(live)])


def test_cli_verify_fails_on_a_broken_delta(live, capsys):
    write_delta(live, 2, 1, SPEC, {"users": (np.array([1, 30]), _rows(1, 2))})
    path = live / "versions/2/tables/users.ids.npy"
    path.write_bytes(path.read_bytes()[:-8])
    assert _run(["checkpoint", "verify", "--checkpoint", str(live), "--version", "2"]) == 1
    assert "FAILED" in (err := capsys.readouterr().err) and "tables/users.ids.npy: size" in err
