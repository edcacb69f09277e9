"""The pure parts of core (types, config, placement, checkpoint format, ZooKeeper paths and
records) and the light CLI commands import neither torch nor grpc nor a ZooKeeper or Redis
client, each checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PLACEMENT = REPO_ROOT / "services" / "core" / "placement"

PURE_CORE = (
    "services.core.types",
    "services.core.errors",
    "services.core.config",
    "services.core.settings",
    "services.core.checkpoint.manifest",
    "services.core.checkpoint.storage",
    "services.core.checkpoint.delta",
    "services.core.checkpoint.reader",
    "services.core.checkpoint.writer",
    "services.core.checkpoint.staging",
    "services.core.discovery.zk_paths",
    "services.core.discovery.records",
    "services.core.rpc.readiness",
    "services.core.placement",
    *sorted(f"services.core.placement.{p.stem}" for p in PLACEMENT.glob("*.py") if p.stem != "__init__"),
)
HEAVY = ("torch", "grpc", "kazoo", "redis")

# Imports each module in turn; the first that brings in a heavy package is named.
CHECK = """
import importlib, sys
heavy = set(sys.argv[1].split(","))
for name in sys.argv[2:]:
    importlib.import_module(name)
    bad = sorted(heavy & {m.split(".")[0] for m in sys.modules})
    assert not bad, f"{name} imports {bad}"
"""


def test_pure_core_modules_import_no_torch_grpc_kazoo_or_redis():
    assert len(PURE_CORE) > 12, "the placement package's modules are listed"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, ",".join(HEAVY), *PURE_CORE], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
