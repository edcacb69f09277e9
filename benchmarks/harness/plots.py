"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- ``latency_cdf``: HDR-style latency by percentile (x: 1/(1-p) on a log axis labelled 50%, 90%,
  99%, ...; y: ms, log), one line per system.
- ``sweep_plot``: p99 and throughput versus offered rate (open-loop runs), one line per system,
  the SLO and each saturation point marked.
- ``bar_table``: p50, p99, throughput, CPU and wire bytes per request, one bar per system.

Every function takes a result document (``BenchResult.to_dict()`` / ``load_json``) or a list of
them (their systems are plotted together) and writes ``path``; ``latency_cdf`` also takes
``{label: LatencyHistogram or HDR blob}``. matplotlib is imported on first use, so importing the
harness stays cheap.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.harness.histogram import LatencyHistogram

_PERCENTILE_TICKS = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _systems(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    docs = [results] if isinstance(results, Mapping) else list(results)
    out: list[dict] = []
    for d in docs:
        out.extend(d["systems"])
    return out


def _run_label(system: str, run: Mapping[str, Any]) -> str:
    load = f"{run['offered_rps']:g} rps" if run["mode"] == "open" else f"c={run['concurrency']}"
    return f"{system} @ {load}" + (f" ({run['label']})" if run.get("label") else "")


def representative_runs(system: Mapping[str, Any], *, all_runs: bool = False) -> list[tuple[str, dict]]:
    """The runs that stand for a system in a comparison, with labels: its only run; else its
    sweep's saturation run; else every run (``all_runs``: every run always)."""
    runs = system["runs"]
    name = system["name"]
    if not runs:
        return []
    if len(runs) == 1 and not all_runs:
        return [(name, runs[0])]
    sw = system.get("sweep")
    if sw and not all_runs and sw.get("saturation_rps") is not None:
        for p in sw["points"]:
            if p["offered_rps"] == sw["saturation_rps"] and p.get("run_index") is not None:
                return [(f"{name} @ {p['offered_rps']:,.0f} rps (saturation)", runs[p["run_index"]])]
    return [(_run_label(name, r), r) for r in runs]


def _plain_log_labels(axis) -> None:
    """Label a log axis 0.5, 1, 2, 5, 10 ... instead of 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _sweep_runs(system: Mapping[str, Any]) -> list[dict]:
    """A system's open-loop runs by offered rate: its sweep's points when it has a sweep."""
    runs = system["runs"]
    sw = system.get("sweep")
    if sw:
        picked = [runs[p["run_index"]] for p in sw["points"] if p.get("run_index") is not None]
    else:
        picked = [r for r in runs if r["mode"] == "open"]
    return sorted(picked, key=lambda r: r["offered_rps"])


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return p


def latency_cdf(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    all_runs: bool = False,
    service_time: bool = False,
) -> pathlib.Path:
    """Latency by percentile, one line per system (see ``representative_runs``).
    ``service_time``: plot the latency from the actual send instead of the intended one."""
    plt = _pyplot()
    series: list[tuple[str, LatencyHistogram]] = []
    if isinstance(results, Mapping) and "systems" not in results:
        for label, h in results.items():
            series.append((str(label), h if isinstance(h, LatencyHistogram) else LatencyHistogram.decode(h)))
    else:
        key = "service_histogram" if service_time else "histogram"
        for s in _systems(results):  # type: ignore[arg-type]
            for label, run in representative_runs(s, all_runs=all_runs):
                series.append((label, LatencyHistogram.decode(run[key])))
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 100.0
    for label, h in series:
        pts = h.cdf_points()
        if not pts:
            continue
        n = h.count
        xs = [1.0 / (1.0 - p / 100.0) if p < 100.0 else float(max(n, 10)) for p, _ in pts]
        ys = [max(v, 1e-3) for _, v in pts]
        ax.step(xs, ys, where="post", label=f"{label} (n={n:,})")
        top = max(top, max(xs))
    ticks = [t for t in _PERCENTILE_TICKS if 1.0 / (1.0 - t / 100.0) <= top * 1.01]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([1.0 / (1.0 - t / 100.0) for t in ticks])
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlim(1.0, top * 1.1)
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)" + (", from actual send" if service_time else ", from intended send"))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "Recommend latency by percentile")
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def sweep_plot(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    slo_p99_ms: float | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """p99 (top) and throughput (bottom) versus offered rate, one line per system (its sweep's
    points, or every open-loop run when it has no sweep); the SLO (from the sweeps, or
    ``slo_p99_ms``) and saturation points marked."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    hi = 0.0
    for s in _systems(results):
        runs = _sweep_runs(s)
        if not runs:
            continue
        x = [r["offered_rps"] for r in runs]
        hi = max(hi, max(x), max(r["throughput_rps"] for r in runs))
        (line,) = ax1.plot(x, [max(r["latency_ms"]["p99_ms"], 1e-3) for r in runs], marker="o", label=s["name"])
        ax2.plot(x, [r["throughput_rps"] for r in runs], marker="o", color=line.get_color(), label=s["name"])
        sw = s.get("sweep")
        if sw:
            slo_p99_ms = slo_p99_ms if slo_p99_ms is not None else sw["slo_p99_ms"]
            if sw.get("saturation_rps") is not None:
                ax1.axvline(sw["saturation_rps"], color=line.get_color(), linestyle=":", alpha=0.7)
                ax2.axvline(sw["saturation_rps"], color=line.get_color(), linestyle=":", alpha=0.7)
    if slo_p99_ms is not None:
        ax1.axhline(slo_p99_ms, color="red", linestyle="--", alpha=0.6, label=f"SLO p99 {slo_p99_ms:g} ms")
    if hi > 0:
        ax2.plot([0, hi], [0, hi], color="gray", linestyle="--", alpha=0.5, label="served = offered")
    ax1.set_yscale("log")
    _plain_log_labels(ax1.yaxis)
    ax1.set_ylabel("p99 latency (ms)")
    ax2.set_ylabel("throughput (requests/s)")
    ax2.set_xlabel("offered rate (requests/s)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title(title or "p99 and throughput versus offered rate")
    return _save(fig, path)


_BARS: tuple[tuple[str, str, Any], ...] = (
    ("p50 (ms)", "p50", lambda r: r["latency_ms"]["p50_ms"]),
    ("p99 (ms)", "p99", lambda r: r["latency_ms"]["p99_ms"]),
    ("throughput (req/s)", "tput", lambda r: r["throughput_rps"]),
    ("CPU per request (ms)", "cpu", lambda r: None if r.get("cpu_seconds_per_request") is None else r["cpu_seconds_per_request"] * 1e3),
    ("wire bytes per request, user", "wire_user", lambda r: (r.get("wire_bytes_per_request") or {}).get("user")),
    ("wire bytes per request, total", "wire_total", lambda r: (r.get("wire_bytes_per_request") or {}).get("total")),
)


def bar_table(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> pathlib.Path:
    """One panel per metric (p50, p99, throughput, CPU/request, wire bytes/request user and
    total), one bar per system (its representative run), values written on the bars."""
    plt = _pyplot()
    rows: list[tuple[str, dict]] = []
    for s in _systems(results):
        reps = representative_runs(s)
        if reps:
            rows.append((s["name"] if len(reps) == 1 else reps[0][0], reps[0][1]))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    names = [n for n, _ in rows]
    for ax, (label, _, get) in zip(axes.flat, _BARS):
        vals = [get(r) for _, r in rows]
        heights = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(range(len(rows)), heights, color=[f"C{i}" for i in range(len(rows))])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:,.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or "Comparison (one bar per system)")
    fig.tight_layout()
    return _save(fig, path)
