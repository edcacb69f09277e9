"""The benchmark result: one JSON document per ``shardrec bench`` invocation.

Schema ``shardrec.bench/v1`` (``validate`` enforces it)::

    {
      "schema": "shardrec.bench/v1",
      "created_unix": 1767000000.0, "created": "2026-01-01T00:00:00Z",
      "command": ["shardrec", "bench", ...],
      "machine": {"hostname", "cpu_count", "cpus_allowed", "cpu_model", "memory_bytes", "platform",
                  "python", "torch", "grpcio", "numpy", "load_avg"},
      "workload": {...RequestMix.params()...},
      "notes": "",
      "systems": [
        {"name": "shardrec", "description": {...}, "sweep": null | SWEEP, "runs": [RUN, ...]}
      ]
    }

    RUN = {
      "label": str | null, "mode": "open" | "closed", "offered_rps": float | null,
      "concurrency": int | null, "load": {...}, "deadline_s", "warmup_s", "duration_s", "started_unix",
      "scheduled", "sent", "ok", "completed_in_window", "throughput_rps", "error_share",
      "errors": {"DEADLINE_EXCEEDED": n, ...}, "error_samples": {status: first message},
      "client_overloaded": int,
      "latency_ms": {count, p50_ms, p90_ms, p95_ms, p99_ms, p999_ms, max_ms, mean_ms, min_ms},
      "histogram": "HISTFAAA...",            # HDR blob of latency_ms (us), LatencyHistogram.decode
      "service_latency_ms": {...}, "service_histogram": "HISTFAAA...",  # from the actual send
      "send_lag_ms": {...},                  # actual send - intended (open loop)
      "cpu": null | {"seconds", "by_process", "exited", "missing"},
      "cpu_seconds_per_request": float | null,
      "requests_in_window": int, "requests_in_window_source": "frontend" | "client",
      "wire_bytes_per_request": null | {"user", "item", "total", ...},
      "counters_delta": null | {name: int}
    }

    SWEEP = {"slo_p99_ms", "max_error_share", "factor", "stop_reason",
             "saturation_rps": float | null, "saturation_throughput_rps": float | null,
             "points": [{"offered_rps", "p99_ms", "error_share", "throughput_rps", "ok", "refine",
                         "run_index": int | null}]}   # run_index: into the system's runs

Per-request figures divide by the frontend's own ``requests_batched`` delta when the counters
were read, else by the client's successful completions inside the window
(``requests_in_window_source`` says which).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.harness.cpu import REQUESTS_COUNTER, CpuMeter, wire_bytes_per_request
from benchmarks.harness.driver import RunStats
from benchmarks.harness.histogram import SUMMARY_PERCENTILES, LatencyHistogram
from benchmarks.harness.sweep import SweepResult

SCHEMA = "shardrec.bench/v1"
LATENCY_KEYS = ("count", *(k for k, _ in SUMMARY_PERCENTILES), "max_ms", "mean_ms", "min_ms")


class SchemaError(ValueError):
    """A result document that does not follow ``shardrec.bench/v1``; the message names the
    field (``systems[0].runs[1].latency_ms.p99_ms``) and what was wrong."""


# -- machine -------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    mod = sys.modules.get(dist)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict:
    """The machine the run is on (torch's version is read from package metadata; torch is
    not imported here)."""
    try:
        import psutil

        memory = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - informative only
        memory = None
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count() or 0,
        "cpus_allowed": allowed,
        "cpu_model": _cpu_model(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "grpcio": _version("grpcio"),
        "numpy": _version("numpy"),
        "load_avg": load,
    }


# -- records -------------------------------------------------------------------------------


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(float(x), nd)


def run_record(
    stats: RunStats,
    *,
    label: str | None = None,
    cpu: CpuMeter | Mapping[str, Any] | float | None = None,
    counters_delta: Mapping[str, int] | None = None,
) -> dict:
    """The JSON record of one run. ``cpu``: the ``CpuMeter`` of the window (or its
    ``to_dict()``, or plain seconds). ``counters_delta``: ``CounterMeter.delta``."""
    if isinstance(cpu, CpuMeter):
        cpu_d: dict | None = cpu.to_dict()
    elif isinstance(cpu, Mapping):
        cpu_d = dict(cpu)
    elif cpu is not None:
        cpu_d = {"seconds": float(cpu), "by_process": {}, "exited": [], "missing": []}
    else:
        cpu_d = None
    delta = dict(counters_delta) if counters_delta is not None else None
    if delta and delta.get(REQUESTS_COUNTER):
        n, source = int(delta[REQUESTS_COUNTER]), "frontend"
    else:
        n, source = stats.completed_in_window, "client"
    return {
        "label": label,
        "mode": stats.mode,
        "offered_rps": stats.offered_rps,
        "concurrency": stats.concurrency,
        "load": dict(stats.load),
        "deadline_s": stats.deadline_s,
        "warmup_s": stats.warmup_s,
        "duration_s": stats.duration_s,
        "started_unix": round(stats.started_unix, 3),
        "scheduled": stats.scheduled,
        "sent": stats.sent,
        "ok": stats.ok,
        "completed_in_window": stats.completed_in_window,
        "throughput_rps": round(stats.throughput_rps, 3),
        "error_share": stats.error_share,
        "errors": stats.errors_with_overload(),
        "error_samples": dict(stats.error_samples),
        "client_overloaded": stats.client_overloaded,
        "latency_ms": stats.histogram.summary(),
        "histogram": stats.histogram.encode(),
        "service_latency_ms": stats.service_histogram.summary(),
        "service_histogram": stats.service_histogram.encode(),
        "send_lag_ms": stats.send_lag.summary(),
        "cpu": cpu_d,
        "cpu_seconds_per_request": _r(cpu_d["seconds"] / n, 9) if cpu_d is not None and n else None,
        "requests_in_window": n,
        "requests_in_window_source": source,
        "wire_bytes_per_request": (
            {k: round(v, 1) for k, v in w.items()} if delta and (w := wire_bytes_per_request(delta)) else None
        ),
        "counters_delta": delta,
    }


def _as_run(result: Any) -> dict:
    if isinstance(result, RunStats):
        return run_record(result)
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError(f"a sweep point's result must be a RunStats or a run record, got {type(result).__name__}")


class BenchResult:
    """Builds one result document: systems in the order added, each with its runs and an
    optional sweep. ``to_dict()`` validates."""

    def __init__(
        self,
        *,
        workload: Mapping[str, Any],
        command: Sequence[str] | None = None,
        machine: Mapping[str, Any] | None = None,
        notes: str = "",
        created_unix: float | None = None,
    ) -> None:
        self.created_unix = time.time() if created_unix is None else created_unix
        self.command = list(sys.argv if command is None else command)
        self.machine = dict(machine_info() if machine is None else machine)
        self.workload = dict(workload)
        self.notes = notes
        self._systems: dict[str, dict] = {}

    def system(self, name: str, *, description: Mapping[str, Any] | None = None) -> dict:
        """The system's record (created on first use)."""
        s = self._systems.get(name)
        if s is None:
            s = self._systems[name] = {"name": name, "description": dict(description or {}), "sweep": None, "runs": []}
        elif description:
            s["description"].update(description)
        return s

    def add_run(self, system: str, run: RunStats | Mapping[str, Any]) -> int:
        """Append a run (a RunStats or a ``run_record``); returns its index."""
        runs = self.system(system)["runs"]
        runs.append(_as_run(run))
        return len(runs) - 1

    def add_sweep(self, system: str, sweep: SweepResult) -> dict:
        """Append every sweep point's result as a run and record the sweep."""
        d = sweep.to_dict()
        for point, pd in zip(sweep.points, d["points"]):
            pd["run_index"] = self.add_run(system, point.result) if point.result is not None else None
        self.system(system)["sweep"] = d
        return d

    def to_dict(self) -> dict:
        d = {
            "schema": SCHEMA,
            "created_unix": round(self.created_unix, 3),
            "created": _dt.datetime.fromtimestamp(self.created_unix, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": self.command,
            "machine": self.machine,
            "workload": self.workload,
            "notes": self.notes,
            "systems": [json.loads(json.dumps(s)) for s in self._systems.values()],
        }
        validate(d)
        return d

    def write_json(self, path: str | os.PathLike) -> pathlib.Path:
        return write_json(self.to_dict(), path)


def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
    """Validate and write ``result`` (atomically: a temp file renamed into place)."""
    validate(result)
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def load_json(path: str | os.PathLike) -> dict:
    """Read and validate a result file."""
    d = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    validate(d)
    return d


# -- validation ----------------------------------------------------------------------------


def _fail(where: str, what: str, got: Any) -> None:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise SchemaError(f"{where}: {what}, got {shown}")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(d: Mapping, key: str, where: str, *, nullable: bool = False, minimum: float | None = 0.0) -> None:
    if key not in d:
        _fail(f"{where}.{key}", "missing", None)
    x = d[key]
    if x is None and nullable:
        return
    if not _is_num(x) or (minimum is not None and x < minimum):
        _fail(f"{where}.{key}", f"expected a number{'' if minimum is None else f' >= {minimum:g}'}", x)


def _int(d: Mapping, key: str, where: str, *, nullable: bool = False, minimum: int = 0) -> None:
    if key not in d:
        _fail(f"{where}.{key}", "missing", None)
    x = d[key]
    if x is None and nullable:
        return
    if not isinstance(x, int) or isinstance(x, bool) or x < minimum:
        _fail(f"{where}.{key}", f"expected an integer >= {minimum}", x)


def _typed(d: Mapping, key: str, where: str, types: type | tuple[type, ...], *, nullable: bool = False) -> Any:
    if key not in d:
        _fail(f"{where}.{key}", "missing", None)
    x = d[key]
    if x is None and nullable:
        return None
    if not isinstance(x, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        _fail(f"{where}.{key}", f"expected {names}", x)
    return x


def _latency(d: Mapping, key: str, where: str) -> Mapping:
    lat = _typed(d, key, where, dict)
    w = f"{where}.{key}"
    for k in LATENCY_KEYS:
        (_int if k == "count" else _num)(lat, k, w)
    if lat["count"]:
        qs = [lat[k] for k, _ in SUMMARY_PERCENTILES] + [lat["max_ms"]]
        if any(a > b for a, b in zip(qs, qs[1:])):
            _fail(w, "percentiles must not decrease (p50 <= p90 <= ... <= max)", qs)
    return lat


def _validate_run(run: Any, where: str) -> None:
    if not isinstance(run, dict):
        _fail(where, "expected an object", run)
    _typed(run, "label", where, str, nullable=True)
    mode = _typed(run, "mode", where, str)
    if mode not in ("open", "closed"):
        _fail(f"{where}.mode", "expected 'open' or 'closed'", mode)
    if mode == "open":
        _num(run, "offered_rps", where, minimum=1e-12)
    else:
        _int(run, "concurrency", where, minimum=1)
    _typed(run, "load", where, dict)
    for k in ("deadline_s", "duration_s"):
        _num(run, k, where, minimum=1e-12)
    for k in ("warmup_s", "started_unix", "throughput_rps"):
        _num(run, k, where)
    for k in ("scheduled", "sent", "ok", "completed_in_window", "client_overloaded", "requests_in_window"):
        _int(run, k, where)
    if run["ok"] > run["sent"]:
        _fail(f"{where}.ok", f"more successful calls than sent ({run['sent']})", run["ok"])
    _num(run, "error_share", where)
    if run["error_share"] > 1:
        _fail(f"{where}.error_share", "expected a share in [0, 1]", run["error_share"])
    for k in ("errors", "counters_delta"):
        m = _typed(run, k, where, dict, nullable=(k == "counters_delta"))
        for name, n in (m or {}).items():
            if not isinstance(name, str) or not isinstance(n, int) or isinstance(n, bool):
                _fail(f"{where}.{k}[{name!r}]", "expected a name -> integer", n)
            if k == "errors" and n < 0:
                _fail(f"{where}.{k}[{name!r}]", "expected a count >= 0", n)
    samples = _typed(run, "error_samples", where, dict)
    for name, msg in samples.items():
        if not isinstance(msg, str):
            _fail(f"{where}.error_samples[{name!r}]", "expected a message", msg)
    lat = _latency(run, "latency_ms", where)
    if lat["count"] != run["ok"]:
        _fail(f"{where}.latency_ms.count", f"must equal ok ({run['ok']})", lat["count"])
    _latency(run, "service_latency_ms", where)
    _latency(run, "send_lag_ms", where)
    for key, summary in (("histogram", "latency_ms"), ("service_histogram", "service_latency_ms")):
        blob = _typed(run, key, where, str)
        try:
            h = LatencyHistogram.decode(blob)
        except ValueError as e:
            _fail(f"{where}.{key}", str(e), blob)
        if h.count != run[summary]["count"]:
            _fail(f"{where}.{key}", f"holds {h.count} values but {summary}.count is {run[summary]['count']}", blob)
    cpu = _typed(run, "cpu", where, dict, nullable=True)
    if cpu is not None:
        _num(cpu, "seconds", f"{where}.cpu")
        _typed(cpu, "by_process", f"{where}.cpu", dict)
    _num(run, "cpu_seconds_per_request", where, nullable=True)
    src = _typed(run, "requests_in_window_source", where, str)
    if src not in ("frontend", "client"):
        _fail(f"{where}.requests_in_window_source", "expected 'frontend' or 'client'", src)
    wire = _typed(run, "wire_bytes_per_request", where, dict, nullable=True)
    if wire is not None:
        for k in ("user", "item", "total"):
            _num(wire, k, f"{where}.wire_bytes_per_request")


def _validate_sweep(sw: Any, where: str, n_runs: int) -> None:
    if not isinstance(sw, dict):
        _fail(where, "expected an object or null", sw)
    _num(sw, "slo_p99_ms", where, minimum=1e-12)
    _num(sw, "max_error_share", where)
    _num(sw, "factor", where, minimum=1.0)
    _typed(sw, "stop_reason", where, str)
    _num(sw, "saturation_rps", where, nullable=True)
    _num(sw, "saturation_throughput_rps", where, nullable=True)
    points = _typed(sw, "points", where, list)
    ok_rates = []
    for j, p in enumerate(points):
        w = f"{where}.points[{j}]"
        if not isinstance(p, dict):
            _fail(w, "expected an object", p)
        _num(p, "offered_rps", w, minimum=1e-12)
        _num(p, "p99_ms", w)
        _num(p, "error_share", w)
        _num(p, "throughput_rps", w, nullable=True)
        _typed(p, "ok", w, bool)
        _typed(p, "refine", w, bool)
        _int(p, "run_index", w, nullable=True)
        if p["run_index"] is not None and p["run_index"] >= n_runs:
            _fail(f"{w}.run_index", f"no such run (the system has {n_runs})", p["run_index"])
        if p["ok"]:
            ok_rates.append(p["offered_rps"])
    expect = max(ok_rates) if ok_rates else None
    if sw["saturation_rps"] != expect:
        _fail(f"{where}.saturation_rps", f"must be the highest rate that met the SLO ({expect})", sw["saturation_rps"])


def validate(result: Any) -> None:
    """Raise ``SchemaError`` unless ``result`` is a valid ``shardrec.bench/v1`` document."""
    if not isinstance(result, Mapping):
        _fail("result", "expected an object", result)
    if result.get("schema") != SCHEMA:
        _fail("schema", f"expected {SCHEMA!r}", result.get("schema"))
    _num(result, "created_unix", "result")
    _typed(result, "created", "result", str)
    cmd = _typed(result, "command", "result", list)
    if not all(isinstance(c, str) for c in cmd):
        _fail("command", "expected a list of strings", cmd)
    machine = _typed(result, "machine", "result", dict)
    _int(machine, "cpu_count", "machine")
    _typed(result, "workload", "result", dict)
    _typed(result, "notes", "result", str)
    systems = _typed(result, "systems", "result", list)
    if not systems:
        _fail("systems", "expected at least one system", systems)
    seen = set()
    for i, s in enumerate(systems):
        w = f"systems[{i}]"
        if not isinstance(s, dict):
            _fail(w, "expected an object", s)
        name = _typed(s, "name", w, str)
        if not name or name in seen:
            _fail(f"{w}.name", "expected a non-empty name used once", name)
        seen.add(name)
        _typed(s, "description", w, dict)
        runs = _typed(s, "runs", w, list)
        for j, run in enumerate(runs):
            _validate_run(run, f"{w}.runs[{j}]")
        if s.get("sweep") is not None:
            _validate_sweep(s["sweep"], f"{w}.sweep", len(runs))
        elif "sweep" not in s:
            _fail(f"{w}.sweep", "missing (null when there is no sweep)", None)


# -- text ----------------------------------------------------------------------------------


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: Mapping[str, Any]) -> str:
    """One line per run: load, throughput, latency percentiles, errors, CPU and wire bytes per
    request; then each sweep's saturation point."""
    head = (
        f"{'system':<14} {'load':>12} {'tput/s':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8}"
        f" {'err%':>6} {'cpu ms/req':>10} {'wire B/req user':>15} {'item':>9} {'total':>9}"
    )
    lines = [head, "-" * len(head)]
    for s in result["systems"]:
        for run in s["runs"]:
            load = f"{run['offered_rps']:g} rps" if run["mode"] == "open" else f"c={run['concurrency']}"
            lat = run["latency_ms"]
            wire = run.get("wire_bytes_per_request") or {}
            cpu = run.get("cpu_seconds_per_request")
            lines.append(
                f"{s['name']:<14} {load:>12} {run['throughput_rps']:>9.1f} {lat['p50_ms']:>8.2f} {lat['p90_ms']:>8.2f}"
                f" {lat['p99_ms']:>8.2f} {lat['p999_ms']:>8.2f} {lat['max_ms']:>8.2f} {100 * run['error_share']:>6.2f}"
                f" {_fmt(None if cpu is None else cpu * 1e3, '10.3f'):>10} {_fmt(wire.get('user'), '15,.0f'):>15}"
                f" {_fmt(wire.get('item'), '9,.0f'):>9} {_fmt(wire.get('total'), '9,.0f'):>9}"
            )
    sweeps = [(s["name"], s["sweep"]) for s in result["systems"] if s.get("sweep")]
    for name, sw in sweeps:
        sat = sw["saturation_rps"]
        lines.append(
            f"{name}: saturation (p99 <= {sw['slo_p99_ms']:g} ms) "
            + (f"{sat:,.0f} rps offered, {_fmt(sw['saturation_throughput_rps'], ',.0f')} rps served" if sat else "not reached")
            + f" [{sw['stop_reason']}]"
        )
    return "\n".join(lines)
