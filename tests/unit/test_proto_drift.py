"""The committed stubs under services/_proto must be exactly what tools/gen_protos.py makes."""

import filecmp
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_protos(tmp_path):
    written = _load_generator().generate(tmp_path)
    assert written, "generator wrote nothing"
    committed = ROOT / "services" / "_proto"
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    stale = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    stale.discard(pathlib.Path("__init__.py"))
    assert fresh == stale, f"stub files differ: missing {sorted(fresh - stale)}, extra {sorted(stale - fresh)}; run `make protos`"
    drifted = [str(rel) for rel in sorted(fresh) if not filecmp.cmp(tmp_path / rel, committed / rel, shallow=False)]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `make protos`"
