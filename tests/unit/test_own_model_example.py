"""The tutorial's example (``docs/examples/own_model.py``, docs/your-model.md) without a cluster:
its writer imports nothing of shardrec (numpy, safetensors, json and hashlib, as an outside
user writes the format of docs/checkpoint.md), what it writes passes every check of the reader
and of ``features load``, and its own numpy forward pass is the reference path's.
(tests/e2e/test_own_model.py runs the whole example against a cluster.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.core.checkpoint.reader import CheckpointReader
from services.core.features import FeatureLayout
from services.core.reference import ReferenceRecommender
from services.core.synth import load_feature_rows
from services.core.types import FeatureSide

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "own_model.py"


def load_example():
    spec = importlib.util.spec_from_file_location("own_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Versions 1 and 2 and the feature files, written by the example in a fresh interpreter
    that then checks no ``services`` module was ever imported."""
    root = tmp_path_factory.mktemp("own") / "ckpt"
    code = (
        "import importlib.util, pathlib, sys\n"
        f"spec = importlib.util.spec_from_file_location('own_model', {str(EXAMPLE)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"root = pathlib.Path({str(root)!r})\n"
        "m.write_checkpoint(root); m.write_delta(root)\n"
        "leaked = sorted(n for n in sys.modules if n == 'services' or n.startswith('services.'))\n"
        "assert not leaked, f'the writer imported {leaked}'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_the_hand_written_versions_and_features_pass_every_check(written: Path) -> None:
    reader = CheckpointReader(str(written))
    assert reader.latest_version() == 2
    for version in (1, 2):
        reader.verify(version, full=True)
    assert (reader.manifest(1).kind, reader.manifest(2).kind, reader.manifest(2).parent) == ("base", "delta", 1)
    spec = reader.manifest(2).model
    for side in FeatureSide:
        layout = FeatureLayout(spec, side)
        rows = load_feature_rows(written, side)
        layout.validate(rows, rows[layout.id_key])


def test_the_examples_forward_pass_is_the_reference_path(written: Path) -> None:
    example = load_example()
    tables, dense = example.trained_arrays()
    users, items = example.stored_features()
    for version in (1, 2):
        if version == 2:
            tables, dense, _ = example.retrained(tables, dense)
        reference = ReferenceRecommender(str(written), version)
        for user, candidates in example.REQUESTS:
            mine = example.trainer_scores(tables, dense, users, items, user, candidates)
            np.testing.assert_allclose(reference.scores(user, candidates), mine, rtol=1e-5, atol=1e-6)
