"""``shardrec cluster top``: a live terminal view of a running local cluster, read from the
/metrics endpoints its state file names (docs/observability.md, "cluster top").

Every ``interval_s`` each endpoint is scraped; rates and quantiles are over the last interval
(the difference of two scrapes, as Prometheus' ``rate`` and ``histogram_quantile`` would say).
``frame`` is pure (two scrapes in, the rows out); ``render`` draws them with rich.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.core import metrics as m
from services.localcluster.state import ROLE_FRONTEND, ROLE_SHARD, read_state

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """Prometheus text format -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(address: str, timeout_s: float = 2.0) -> Samples | None:
    """The samples of ``http://address/metrics``, or None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as r:
            return parse(r.read().decode())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, w) in lab for k, w in labels.items()))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == name and label in d and all(d.get(k) == w for k, w in labels.items()):
            out[d[label]] = out.get(d[label], 0.0) + v
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative ``{le: count}`` (linear within a bucket); None
    without observations."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return items[-1][0]


def _hist(before: Samples, after: Samples, name: str, **labels: str) -> tuple[float, float | None, float | None]:
    """(count delta, p50, p99) of a histogram between two scrapes, summed over other labels."""
    a = by_label(after, name + "_bucket", "le", **labels)
    b = by_label(before, name + "_bucket", "le", **labels)
    delta = {float(le): v - b.get(le, 0.0) for le, v in a.items()}
    n = total(after, name + "_count", **labels) - total(before, name + "_count", **labels)
    return n, quantile(0.5, delta), quantile(0.99, delta)


@dataclass
class FrontendRow:
    process: str
    qps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, float]  # status code -> per second
    sheds: dict[str, float]  # reason -> per second
    in_flight: float
    queued: float
    limit: float
    model_version: int
    map_version: int
    feature_store: str


@dataclass
class NodeRow:
    """A shard node as the frontends see it (summed over them) and as it serves."""

    node: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    outstanding: float | None = None
    ejected: bool = False
    served_rps: float | None = None
    serving_version: int | None = None
    ready: list[int] = field(default_factory=list)
    held: int | None = None  # partitions
    held_bytes: float | None = None


@dataclass
class Frame:
    interval_s: float
    frontends: list[FrontendRow] = field(default_factory=list)
    nodes: list[NodeRow] = field(default_factory=list)
    down: list[str] = field(default_factory=list)


def frame(procs: dict[str, tuple[str, Samples | None, Samples | None]], interval_s: float) -> Frame:
    """Rows of one frame from ``{process: (role, scrape before, scrape after)}``. Pure."""
    f = Frame(interval_s)
    rows: dict[str, NodeRow] = {}
    for proc, (role, before, after) in sorted(procs.items()):
        if after is None or before is None:
            f.down.append(proc)
            continue
        rate = lambda n, **kw: (total(after, n, **kw) - total(before, n, **kw)) / interval_s  # noqa: E731
        if role == ROLE_FRONTEND:
            n, p50, p99 = _hist(before, after, m.RECOMMEND_LATENCY)
            codes = [c for c in by_label(after, m.RECOMMEND_LATENCY + "_count", "code") if c != "OK"]
            errors = {c: rate(m.RECOMMEND_LATENCY + "_count", code=c) for c in codes}
            state = next((s for s, v in by_label(after, m.FEATURE_STORE_STATE, "state").items() if v == 1), "?")
            f.frontends.append(FrontendRow(
                proc, n / interval_s, _ms(p50), _ms(p99), {c: r for c, r in errors.items() if r > 0},
                {r: v for r in m.SHED_REASONS if (v := rate(m.SHED + "_total", reason=r)) > 0},
                total(after, m.IN_FLIGHT), total(after, m.QUEUE_DEPTH), total(after, m.ADMISSION_LIMIT),
                int(total(after, m.MODEL_VERSION)), int(total(after, m.SHARD_MAP_VERSION)), state,
            ))  # fmt: skip
            for node in by_label(after, m.LOOKUP_RPCS + "_total", "node"):
                row = rows.setdefault(node, NodeRow(node))
                _c, q50, q99 = _hist(before, after, m.LOOKUP_LATENCY, node=node)
                row.rps = (row.rps or 0.0) + rate(m.LOOKUP_RPCS + "_total", node=node)
                row.p50_ms, row.p99_ms = _ms(q50), _ms(q99)
                row.outstanding = (row.outstanding or 0) + total(after, m.LOOKUP_OUTSTANDING, node=node)
                row.ejected = row.ejected or total(after, m.NODE_EJECTED, node=node) > 0
        elif role == ROLE_SHARD:
            row = rows.setdefault(proc, NodeRow(proc))
            row.served_rps = rate(m.SHARD_LOOKUP_LATENCY + "_count")
            row.serving_version = int(total(after, m.SHARD_SERVING_VERSION))
            row.ready = sorted(int(v) for v in by_label(after, m.SHARD_VERSION_READY, "version"))
            row.held_bytes = total(after, m.SHARD_PARTITION_BYTES)
            row.held = sum(1 for (n, _lab) in after if n == m.SHARD_PARTITION_BYTES)
    f.nodes = [rows[k] for k in sorted(rows)]
    return f


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _num(v, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def render(fr: Frame, title: str):  # noqa: ANN201 - a rich renderable
    from rich.console import Group
    from rich.table import Table

    fe = Table(title=f"{title}: frontends (last {fr.interval_s:.1f}s)", title_justify="left")
    for col in ("FRONTEND", "QPS", "P50 MS", "P99 MS", "ERRORS/S", "SHEDS/S", "IN FLIGHT", "QUEUED", "LIMIT", "VERSION", "MAP", "FEATURES"):
        fe.add_column(col, justify="left" if col in ("FRONTEND", "ERRORS/S", "SHEDS/S", "FEATURES") else "right")
    for r in fr.frontends:
        fe.add_row(r.process, _num(r.qps), _num(r.p50_ms), _num(r.p99_ms),
                   " ".join(f"{c}={v:.1f}" for c, v in sorted(r.errors.items())) or "0",
                   " ".join(f"{c}={v:.1f}" for c, v in sorted(r.sheds.items())) or "0",
                   _num(r.in_flight, "{:.0f}"), _num(r.queued, "{:.0f}"), _num(r.limit, "{:.0f}"),
                   str(r.model_version), str(r.map_version), r.feature_store)  # fmt: skip
    nodes = Table(title="shard nodes (Lookup as the frontends see it, and as the node serves it)", title_justify="left")
    for col in ("NODE", "LOOKUPS/S", "P50 MS", "P99 MS", "OUTSTANDING", "EJECTED", "SERVED/S", "VERSION", "READY", "PARTITIONS", "MIB"):
        nodes.add_column(col, justify="left" if col in ("NODE", "EJECTED", "READY") else "right")
    for r in fr.nodes:
        nodes.add_row(r.node, _num(r.rps), _num(r.p50_ms), _num(r.p99_ms), _num(r.outstanding, "{:.0f}"),
                      "yes" if r.ejected else "no", _num(r.served_rps), _num(r.serving_version, "{}"),
                      ",".join(map(str, r.ready)) or "-", _num(r.held, "{}"),
                      _num(None if r.held_bytes is None else r.held_bytes / 2**20))  # fmt: skip
    parts = [fe, nodes]
    if fr.down:
        parts.append(f"not answering: {', '.join(fr.down)}")
    return Group(*parts)


def cluster_top(workdir: Path, *, interval_s: float = 2.0, once: bool = False, out=None) -> int:
    """Draw frames until interrupted (``once``: print one and return). 2 when there is no
    cluster, 1 when no process serves /metrics."""
    from rich.console import Console

    console = Console(file=out) if out is not None else Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # a script's frame: no column cut short
    state = read_state(workdir)
    if state is None:
        console.print(f"no local cluster in {workdir}; start one with `shardrec cluster up`")
        return 2
    procs = {
        name: (p.role, addr)
        for p in state.processes
        for i, addr in enumerate(p.metrics_endpoints)
        for name in [p.name if len(p.metrics_endpoints) == 1 else f"{p.name}/w{i}"]
    }
    if not procs:
        console.print("no process of this cluster serves /metrics")
        return 1
    title = f"cluster {state.cluster!r}"
    before = {name: scrape(addr) for name, (_, addr) in procs.items()}
    t0 = time.monotonic()

    def next_frame() -> Frame:
        nonlocal before, t0
        time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))  # the refresh period of the view
        after = {name: scrape(addr) for name, (_, addr) in procs.items()}
        now = time.monotonic()
        fr = frame({n: (procs[n][0], before[n], after[n]) for n in procs}, now - t0)
        before, t0 = after, now
        return fr

    if once:
        console.print(render(next_frame(), title))
        return 0
    from rich.live import Live

    with Live(render(next_frame(), title), console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(render(next_frame(), title), refresh=True)
        except KeyboardInterrupt:
            return 0
