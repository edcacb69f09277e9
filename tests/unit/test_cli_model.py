"""``shardrec model synth|drift`` and ``shardrec checkpoint verify|show`` as commands: what they
print and their exit codes; the CLI stays light (no torch, no grpc at import)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from services.admin import cmd_checkpoint, cmd_model
from services.core import synth


def test_cli_preset_choices_match_presets():
    assert tuple(cmd_model.PRESET_NAMES) == tuple(synth.PRESETS)


def _parser() -> argparse.ArgumentParser:
    """The shardrec parser with only this module's command groups (as cli.build_parser does)."""
    parser = argparse.ArgumentParser(prog="shardrec")
    sub = parser.add_subparsers(dest="command")
    cmd_model.register(sub)
    cmd_checkpoint.register(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_model_synth_then_checkpoint_verify_and_show(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _run(["model", "synth", "--out", str(out), "--preset", "small", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "preset small seed 3" in text and "users" in text and "7 tables" in text and str(out / "versions") in text
    assert _run(["checkpoint", "verify", "--checkpoint", f"file://{out}"]) == 0
    assert capsys.readouterr().out.startswith(f"OK file://{out} version 1")
    assert _run(["checkpoint", "show", "--checkpoint", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "version 1: base, parent -" in shown and "table items: 5,000 x 16 float32" in shown

    path = out / "versions/1/tables/tags.npy"
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    assert _run(["checkpoint", "verify", "--checkpoint", str(out), "--version", "1"]) == 1
    assert "FAILED" in (err := capsys.readouterr().err) and "tables/tags.npy: sha256" in err


def test_cli_model_synth_with_deltas(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _run(["model", "synth", "--out", str(out), "--preset", "small", "--deltas", "2", "--drift", "0.05"]) == 0
    text = capsys.readouterr().out
    assert "2 drift deltas (drift 0.05)" in text
    assert "version 2 (delta of 1): 370 rows in 7 tables" in text and "dense weights replaced" in text
    assert "version 3 (delta of 2): 370 rows in 7 tables" in text
    assert _run(["checkpoint", "verify", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {out} version 3 (delta of 2)")


def test_cli_main_dispatches_to_model_synth(tmp_path, capsys):
    for sibling in ("services.admin.cmd_placement", "services.admin.cmd_shard"):
        pytest.importorskip(sibling, reason="cli.main imports every command group")
    from services.admin.cli import main

    assert main(["model", "synth", "--out", str(tmp_path), "--preset", "small"]) == 0
    assert main(["checkpoint", "verify", "--checkpoint", str(tmp_path)]) == 0


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys, services.core.synth, services.core.checkpoint.reader, services.core.checkpoint.delta, services.admin.cmd_model, "
        "services.admin.cmd_checkpoint; bad = {'torch', 'grpc'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
