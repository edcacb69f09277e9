"""Write docs/openapi.json: the OpenAPI document the frontend's REST endpoint serves at
``/openapi.json`` (``services.frontend.openapi.document``). ``tests/unit/test_openapi.py`` fails
when the committed file differs from what the code builds.

Usage: python tools/gen_openapi.py [OUT]   (default: docs/openapi.json)
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def render() -> str:
    from services.frontend.openapi import document

    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "openapi.json"
    out.write_text(render())
    print(f"wrote {out}")
