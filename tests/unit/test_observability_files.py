"""deploy/'s alert rules and dashboard (docs/observability.md, "Alerts"): the rules pass
Prometheus's own ``promtool check rules`` (the Debian prometheus package, which ``make setup``
installs), the dashboard is valid JSON whose every panel queries Prometheus, and each file names
only metrics the code registers (tests/e2e/test_observability.py checks them in a real scrape)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_telemetry import families, registries

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "shardrec-dashboard.json"
ALERTS = {"ShardrecSLOBurnFast", "ShardrecSLOBurnSlow", "ShardrecShardDown", "ShardrecShardEjected",
          "ShardrecPartitionWithoutReplica", "ShardrecVersionStuck", "ShardrecVersionRefused",
          "ShardrecFeatureStoreLost", "ShardrecShedding"}  # fmt: skip


def test_alert_rules_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the prometheus Debian package (`make setup` does)", pytrace=False)
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout
    assert set(re.findall(r"- alert: (\w+)", RULES.read_text())) == ALERTS


def test_dashboard_queries_prometheus_for_every_panel():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["panels"] and all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in doc["panels"])
    assert all(p["datasource"]["type"] == "prometheus" for p in doc["panels"])


def test_rules_and_dashboard_name_registered_metrics():
    fr, sr = registries()
    registered = {**families(fr), **families(sr)}
    names = set()
    for fam, kind in registered.items():
        names.add(fam)
        if kind == "histogram":
            names |= {fam + s for s in ("_bucket", "_count", "_sum")}
    used = set(re.findall(r"\bshardrec_[a-z0-9_]+", RULES.read_text() + DASHBOARD.read_text()))
    assert used and not used - names, sorted(used - names)
