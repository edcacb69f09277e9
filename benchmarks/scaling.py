"""``shardrec bench scaling``: how cost grows with candidates per request, shard nodes, table
size, and with micro-batching on versus off. Each point is one ``bench compare`` (low-load and
CPU runs, no sweep) of shardrec and the monolith; the summary holds p50/p99 and CPU per request
per system and point, and ``scaling_<dimension>.png`` plots them.

    candidates   10, 100, 1000 candidates per request (demo model, 3 nodes)
    nodes        1, 2, 4 shard nodes, every table row-wise over the nodes (1 node: table-wise)
    table-size   the demo model (1M users) and the large one (10M users, 8M items; > 4 GiB)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO

from benchmarks.compare import CompareConfig, compare

DIMENSIONS = {
    "candidates": (10, 100, 1000),
    "nodes": (1, 2, 4),
    "table-size": ("demo", "large"),
}


def node_spec(nodes: int, folder: Path) -> Path:
    """A placement for ``nodes`` nodes: every table row-wise over all of them (or one node)."""
    spec = {"default": {"sharding": "table_wise"}} if nodes == 1 else {
        "default": {"sharding": "row_wise", "partitions": nodes, "replicas": 1},
        "tables": {"age_buckets": {"sharding": "replicated", "replicas": "all"}},
    }  # fmt: skip
    path = folder / f"spec-{nodes}-nodes.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def point_config(base: CompareConfig, dimension: str, value, folder: Path) -> CompareConfig:
    out = folder / f"{dimension}-{value}"
    if dimension == "candidates":
        return replace(base, candidates=int(value), out_dir=out)
    if dimension == "nodes":
        cluster = replace(base.cluster, nodes=int(value), spec=node_spec(int(value), folder))
        return replace(base, cluster=cluster, out_dir=out)
    if dimension == "table-size":
        return replace(base, cluster=replace(base.cluster, preset=str(value)), out_dir=out)
    raise ValueError(f"unknown dimension {dimension!r} (known: {', '.join(DIMENSIONS)})")


def summarize(doc: dict) -> dict:
    """system -> {run label -> p50, p99, cpu ms/request, wire bytes/request}."""
    out: dict = {}
    for s in doc["systems"]:
        for r in s["runs"]:
            cpu = r.get("cpu_seconds_per_request")
            out.setdefault(s["name"], {})[r["label"]] = {
                "p50_ms": r["latency_ms"]["p50_ms"],
                "p99_ms": r["latency_ms"]["p99_ms"],
                "cpu_ms_per_request": None if cpu is None else round(cpu * 1e3, 3),
                "wire_bytes_per_request": r.get("wire_bytes_per_request"),
            }
    return out


def plot(summary: dict, dimension: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    values = list(summary["points"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    systems = sorted({s for p in summary["points"].values() for s in p})
    for system in systems:
        for ax, label, key in ((axes[0], "low-load", "p50_ms"), (axes[1], "cpu", "cpu_ms_per_request")):
            ys = [summary["points"][v].get(system, {}).get(label, {}).get(key) for v in values]
            ax.plot([str(v) for v in values], ys, marker="o", label=system)
    axes[0].set_ylabel("p50 latency at low load (ms)")
    axes[1].set_ylabel("CPU per request, all processes (ms)")
    for ax in axes:
        ax.set_xlabel(dimension)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"shardrec cost versus {dimension}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scaling(base: CompareConfig, dimension: str, values=None, out: IO[str] = sys.stdout) -> dict:
    values = tuple(values or DIMENSIONS[dimension])
    folder = base.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"dimension": dimension, "points": {}}
    for value in values:
        out.write(f"\n=== {dimension} = {value} ===\n")
        doc = compare(point_config(replace(base, sweep=False), dimension, value, folder), out)
        summary["points"][str(value)] = summarize(doc)
    (folder / f"scaling_{dimension}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, dimension, folder / f"scaling_{dimension}.png")
    out.write(f"\n{dimension:>12} {'system':<18} {'p50 ms':>8} {'p99 ms':>8} {'cpu ms/req':>11}\n")
    for value, systems in summary["points"].items():
        for system, runs in systems.items():
            low, cpu = runs.get("low-load", {}), runs.get("cpu", {})
            out.write(f"{value:>12} {system:<18} {low.get('p50_ms', 0):8.2f} {low.get('p99_ms', 0):8.2f} {cpu.get('cpu_ms_per_request') or 0:11.3f}\n")
    out.write(f"wrote {folder / f'scaling_{dimension}.json'} and scaling_{dimension}.png\n")
    return summary
