"""``shardrec checkpoint import`` on the command line: two TorchRec exports imported, then
``checkpoint delta`` between them; a distributed checkpoint refused (the library itself is
tested in test_torchrec_import.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from services.admin import cmd_checkpoint
from services.core.checkpoint.reader import CheckpointReader
from services.core.errors import CheckpointError
from tests.unit.test_torchrec_import import EBC, FIXTURE, MAP, fixture_tensors, save


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardrec")
    cmd_checkpoint.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_two_exports_imported_then_diffed_give_a_delta_that_reproduces_the_second(tmp_path, capsys):
    second = fixture_tensors()
    second[f"{EBC}t_items.weight"][[0, 17, 199]] += 1.0
    second[f"{EBC}t_tags.weight"][5, 3] = -0.5
    second["over_arch.model.1.bias"] = second["over_arch.model.1.bias"] + 0.25
    export_b = save(tmp_path / "b.safetensors", second)
    for src, root in ((FIXTURE / "dlrm.pt", "a"), (export_b, "b")):
        assert _run(["checkpoint", "import", "--torchrec", str(src), "--config", str(MAP), "--out", str(tmp_path / root)]) == 0
    assert "base 1 of model 'torchrec_fixture' written to" in capsys.readouterr().out
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(["checkpoint", "delta", "--from", f"{a}/versions/1", "--to", f"{b}/versions/1", "--out", str(a)]) == 0
    out = capsys.readouterr().out
    assert "delta 2 (parent 1)" in out and "dense weights: changed" in out
    reader = CheckpointReader(a)
    assert reader.manifest(2).delta_tables == ("t_items", "t_tags")
    for t in reader.manifest(2).model.tables:
        np.testing.assert_array_equal(reader.rows_at(2, t.name, np.arange(t.rows)), second[f"{EBC}{t.name}.weight"])
    np.testing.assert_array_equal(reader.dense_state(2)["top_mlp.4.bias"], second["over_arch.model.1.bias"])


def test_a_distributed_checkpoint_is_refused(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning):  # "assuming the intent is to save in a single process"
        dcp.save({"t": torch.zeros(2, 2)}, checkpoint_id=str(tmp_path / "dcp"))
    with pytest.raises(CheckpointError, match="distributed checkpoint .* out of scope.*dcp_to_torch_save"):
        _run(["checkpoint", "import", "--torchrec", str(tmp_path / "dcp"), "--config", str(MAP), "--out", str(tmp_path / "o")])
