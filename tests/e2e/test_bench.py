"""One tiny end-to-end `shardrec bench compare` against a real local cluster: it starts the
systems, drives them, writes a valid result and plots, and leaves nothing running."""

from __future__ import annotations

import json
import re

import psutil

from benchmarks.harness import validate
from services.localcluster.state import read_state


def test_tiny_compare_writes_result_and_plots(tmp_path, spawn):
    out = tmp_path / "out"
    proc = spawn(
        "bench", "compare", "--preset", "small", "--workdir", str(tmp_path / "work"), "--out", str(out),
        "--systems", "monolith,shardrec", "--duration-s", "1.5", "--warmup-s", "0.5", "--low-rate", "30",
        "--cpu-rate", "60", "--prime-s", "0.5", "--sweep-start", "40", "--sweep-steps", "2", "--sweep-duration-s", "1",
        "--runs", "1", name="bench",
    )  # fmt: skip
    assert proc.wait(240) == 0, proc.log_text()[-4000:]
    doc = json.loads((out / "compare.json").read_text())
    validate(doc)
    systems = {s["name"]: s for s in doc["systems"]}
    assert set(systems) == {"monolith", "shardrec"}
    for s in systems.values():
        low = s["runs"][0]
        assert low["label"] == "low-load" and low["ok"] > 0 and low["error_share"] == 0
        assert low["cpu_seconds_per_request"] > 0
        assert s["sweep"] is not None and s["sweep"]["points"]
    wire = systems["shardrec"]["runs"][1]["wire_bytes_per_request"]
    assert wire["user"] > 0 and wire["item"] > 0
    assert any(t["target"].startswith("latency gap to monolith") for t in doc["targets"])
    for png in ("latency_cdf.png", "sweep.png"):
        assert (out / png).stat().st_size > 1000
    assert read_state(tmp_path / "work") is None, "the cluster's state file was left behind"
    pids = {int(m) for m in re.findall(r"\(pid (\d+)\)", proc.log_text())}
    assert len(pids) >= 6, "expected ZooKeeper, Redis, 3 shards and 2 frontends in the output"
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"
