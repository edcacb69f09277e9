"""deploy/ cannot run here (no Docker engine, no Kubernetes): keep what can drift in step.

- the placement spec in the Kubernetes ConfigMap equals deploy/placement/mixed.json;
- every ``$(VAR)`` a manifest expands is defined (ConfigMap shardrec-env or the container's env);
- (test_cli_deploy_files.py) every ``shardrec`` subcommand and flag they use exists in the CLI.

Text-level checks: PyYAML is not a dependency of the project.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def test_k8s_placement_configmap_equals_the_shipped_spec() -> None:
    text = (DEPLOY / "k8s" / "config.yaml").read_text()
    block = text.split("placement.json: |\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    assert json.loads(textwrap.dedent("\n".join(lines))) == json.loads((DEPLOY / "placement" / "mixed.json").read_text())


def test_every_expanded_variable_is_defined() -> None:
    config = (DEPLOY / "k8s" / "config.yaml").read_text()
    defined = set(re.findall(r"^  (SHARDREC_[A-Z_]+):", config, re.MULTILINE))
    assert {"SHARDREC_ZK", "SHARDREC_CLUSTER"} <= defined
    for path in K8S:
        text = path.read_text()
        local = set(re.findall(r"- name: ([A-Z_]+)[^\n]*\n\s+valueFrom:", text))
        used = set(re.findall(r"\$\(([A-Z_]+)\)", text)) | set(re.findall(r"\$\{([A-Z_]+)\}", text))
        missing = used - defined - local - {"HOSTNAME"}
        assert not missing, f"{path.name} expands undefined {sorted(missing)}"
