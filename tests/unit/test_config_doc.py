"""docs/configuration.md is what ``tools/gen_config_doc.py`` builds from the settings'
declarations (run the tool after changing a setting)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_configuration_doc_is_current():
    spec = importlib.util.spec_from_file_location("gen_config_doc", ROOT / "tools" / "gen_config_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == tool.render(), "docs/configuration.md is stale: run python tools/gen_config_doc.py"
