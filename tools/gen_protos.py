"""Generate services/_proto from protos/ (python, grpc and .pyi stubs).

Generated imports are rewritten from ``shardrec.v1`` to ``services._proto.shardrec.v1`` so the
stubs live inside our import root. ``tests/unit/test_proto_drift.py`` runs this into a temporary
folder and fails when the committed stubs differ.

Usage: python tools/gen_protos.py [OUT_DIR]   (default: services/_proto)
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = pathlib.Path("shardrec") / "v1"
IMPORT_RE = re.compile(r"^from shardrec\.v1 import", re.MULTILINE)


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # dev dependency, imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for pkg in (out_dir / "shardrec", out_dir / PACKAGE_DIR):
        init = pkg / "__init__.py"
        init.write_text("")
        written.append(init)
    for path in sorted((out_dir / PACKAGE_DIR).glob("*_pb2*.py*")):
        text = IMPORT_RE.sub("from services._proto.shardrec.v1 import", path.read_text())
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services" / "_proto"
    for p in generate(target):
        print(p.relative_to(target))
