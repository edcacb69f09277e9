"""Live rebalancing, the ZooKeeper side: plan against the live cluster, apply a plan (write the
target, wait until it is ready, switch), read how far a move has got, abort. The pure parts
(planning, the plan file, progress from the nodes' znodes) are ``services.core.rebalance``;
docs/placement.md ("Rebalancing") tells the lifecycle.

Every step is idempotent and the switch is atomic, so a caller killed at any point leaves a
valid cluster: ``apply_plan`` with the same plan resumes, ``abort_rebalance`` gives up.
Call from one thread (the CLI's or a test's main thread); watch callbacks only record and set
an Event. Heavy modules are imported inside the functions.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence, TextIO

from services.control.cluster import maybe
from services.control.text import human_bytes

if TYPE_CHECKING:
    from services.core.discovery.cluster_store import ClusterStore
    from services.core.discovery.records import FrontendRecord, NodeRecord
    from services.core.placement import ShardMap
    from services.core.placement import Move, NodeSummary, PlannerConfig
    from services.core.rebalance import PlanRequest, Progress, RebalancePlan
    from services.core.types import TableSpec

DEFAULT_NODE_MEMORY_BYTES = 64 << 30
DEFAULT_REPLICATE_MAX_BYTES = 1 << 20


def model_tables(store: "ClusterStore") -> list["TableSpec"]:
    """The tables of the model the cluster serves (from its checkpoint's manifest)."""
    from services.core.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(store.read_model().uri)
    version = maybe(store.read_serving_version) or reader.latest_version()
    return list(reader.manifest(version).model.tables)


def read_progress(store: "ClusterStore", active: "ShardMap", target: "ShardMap", tables: Sequence["TableSpec"],
                  nodes: Mapping[str, "NodeRecord"] | None = None,
                  frontends: Mapping[str, "FrontendRecord"] | None = None) -> "Progress":
    """Where the move from ``active`` to ``target`` stands (``core.rebalance.progress``), from
    the given live nodes and frontends or, when None, the ones ZooKeeper has now."""
    from services.core.rebalance import progress, required_versions

    nodes = store.live_nodes() if nodes is None else nodes
    frontends = store.live_frontends() if frontends is None else frontends
    versions = required_versions(maybe(store.read_serving_version), maybe(store.read_target_version), frontends, nodes)
    return progress(active, target, tables, nodes, versions)


def progress_line(prog: "Progress") -> str:
    """One line: partitions ready, KiB loaded, and the first loads still waited for."""
    waiting = [a for a in prog.adds if not a.ready]
    head = (
        f"{prog.partitions_ready}/{prog.partitions_total} partitions ready, "
        f"{_kib(prog.bytes_ready)}/{_kib(prog.bytes_total)} KiB loaded ({len(prog.adds) - len(waiting)}/{len(prog.adds)} loads)"
    )
    if waiting:
        head += "; waiting for " + ", ".join(f"{a.pid}@{a.node_id} ({a.state})" for a in waiting[:4])
        if len(waiting) > 4:
            head += f" and {len(waiting) - 4} more"
    return head


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


# -- reading the cluster -------------------------------------------------------------------------


@dataclass(frozen=True)
class Overview:
    """What ``rebalance show`` and ``plan`` start from: the active map, the target of a move in
    progress (or None), the live nodes' znodes and the model's tables."""

    active: "ShardMap"
    target: "ShardMap | None"
    nodes: Mapping[str, "NodeRecord"]
    tables: Sequence["TableSpec"]


def read_overview(store: "ClusterStore") -> Overview:
    smap, _ = store.read_active()
    found = store.read_target()
    return Overview(smap, None if found is None else found[0], store.live_nodes(), model_tables(store))


@dataclass(frozen=True)
class PlanResult:
    """A plan, the active map it was made against, and what it does: the moves, and per node
    memory and load before and after."""

    plan: "RebalancePlan"
    active: "ShardMap"
    moves: Sequence["Move"]
    before: Mapping[str, "NodeSummary"]
    after: Mapping[str, "NodeSummary"]
    in_progress: "ShardMap | None"  # the target of a move not finished yet, if any


def plan_rebalance(store: "ClusterStore", request: "PlanRequest", *, node_memory_bytes: int = DEFAULT_NODE_MEMORY_BYTES,
                   config: "PlannerConfig | None" = None) -> PlanResult:
    """Plan the target map for ``request`` from the active map, the model's tables and the load
    the shards measured (``core.rebalance.plan_target``). Changes nothing."""
    import datetime

    from services.core.placement import PlannerConfig, TableLoad, diff, summarize
    from services.core.rebalance import RebalancePlan, measured_load, plan_target

    config = config or PlannerConfig(replicate_max_bytes=DEFAULT_REPLICATE_MAX_BYTES)
    view = read_overview(store)
    smap, tables = view.active, view.tables
    loads = measured_load(view.nodes)
    new = plan_target(smap, tables, loads, request, node_memory_bytes=node_memory_bytes, config=config)
    table_loads = [TableLoad(t, loads.get(t.name, 0.0)) for t in tables]
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    plan = RebalancePlan(store.paths.cluster, smap.version, new, request.to_json(), created)
    return PlanResult(plan, smap, diff(smap, new, tables), summarize(smap, table_loads), summarize(new, table_loads), view.target)


@dataclass(frozen=True)
class RebalanceStatus:
    """The active map, the move in progress (target and its progress, or None) and the nodes."""

    active: "ShardMap"
    target: "ShardMap | None"
    progress: "Progress | None"
    nodes: Mapping[str, "NodeRecord"]


def read_status(store: "ClusterStore") -> RebalanceStatus:
    active, _ = store.read_active()
    found = store.read_target()
    nodes = store.live_nodes()
    if found is None:
        return RebalanceStatus(active, None, None, nodes)
    return RebalanceStatus(active, found[0], read_progress(store, active, found[0], model_tables(store), nodes), nodes)


def abort_rebalance(store: "ClusterStore") -> tuple["ShardMap", "ShardMap | None"]:
    """Delete the target map of a move in progress (before the switch). Returns the active map
    and the target given up (None when no move was in progress)."""
    active, _ = store.read_active()
    found = store.read_target()
    if found is None:
        return active, None
    store.clear_target(found[1])
    return active, found[0]


# -- apply ---------------------------------------------------------------------------------------


class ClusterWatch:
    """The live nodes and frontends and the target map, kept by watches; ``changed`` is set on
    every event. Callbacks run on watch threads and only record."""

    def __init__(self, store: "ClusterStore") -> None:
        self.changed = threading.Event()
        self.nodes: dict[str, "NodeRecord"] = {}
        self.frontends: dict[str, "FrontendRecord"] = {}
        self.nodes_seen = threading.Event()
        self.target: "ShardMap | None" = None
        self._watches = [
            store.watch_nodes(self._on_nodes),
            store.watch_frontends(self._on_frontends),
            store.watch_target(self._on_target),
            store.watch_serving_version(lambda _v: self.changed.set()),
            store.watch_target_version(lambda _v: self.changed.set()),
        ]

    def _on_nodes(self, members: dict[str, "NodeRecord"]) -> None:
        self.nodes = members
        self.nodes_seen.set()
        self.changed.set()

    def _on_frontends(self, members: dict[str, "FrontendRecord"]) -> None:
        self.frontends = members
        self.changed.set()

    def _on_target(self, smap: "ShardMap | None") -> None:
        self.target = smap
        self.changed.set()

    def cancel(self) -> None:
        for w in self._watches:
            w.cancel()


def apply_plan(store: "ClusterStore", plan: "RebalancePlan", *, timeout_s: float,
               out: TextIO | None = None, confirm: Callable[[str], bool] | None = None) -> bool:
    """Write the plan's target (or find it already written), wait until it is ready, switch;
    progress lines go to ``out`` (default stdout). ``confirm``, when given, is asked first
    and may decline. Idempotent: run again after a crash, it resumes where the cluster is.

    True when the active map is the plan's target on return (switched now or before); False
    when declined, aborted meanwhile or not ready within ``timeout_s`` (0 = wait forever; the
    target stays). FailedPreconditionError for a stale plan or another move in progress."""
    out = out or sys.stdout
    from services.core.errors import FailedPreconditionError
    from services.core.placement import diff
    from services.core.rebalance import same_map

    active, active_zv = store.read_active()
    if same_map(active, plan.target):
        print(f"already applied: the active shard map is version {active.version}", file=out)
        return True
    if active.version != plan.base_map_version:
        raise FailedPreconditionError(
            f"stale plan: it was made against shard map version {plan.base_map_version}, the active map is version "
            f"{active.version}; run `shardrec rebalance plan` again"
        )
    tables = model_tables(store)
    found = store.read_target()
    if found is not None and not same_map(found[0], plan.target):
        raise FailedPreconditionError(
            f"another rebalance is in progress (target shard map version {found[0].version}, not this plan's); "
            "finish it with its own plan, or `shardrec rebalance abort`"
        )
    moves = diff(active, plan.target, tables)
    adds = [m for m in moves if m.kind.value == "add"]
    what = (f"shard map version {active.version} -> {plan.target.version}: {len(adds)} partition load(s), "
            f"{human_bytes(sum(m.size_bytes for m in adds))}, {len(moves) - len(adds)} drop(s)")
    if confirm is not None and not confirm(("resume " if found else "apply ") + what + "?"):
        print("not applied", file=out)
        return False
    if found is None:
        target_zv = store.write_target(plan.target, None)
        print(f"wrote the target shard map (version {plan.target.version}); shards load what it gives them", file=out)
    else:
        target_zv = found[1]
        print(f"resuming: the target shard map (version {plan.target.version}) is already written", file=out)
    watch = ClusterWatch(store)
    try:
        prog = wait_ready(store, watch, active, plan.target, tables, timeout_s, out)
    finally:
        watch.cancel()
    if prog is None:
        return False
    store.promote_target(plan.target, active_zv, target_zv)
    print(f"switched: the active shard map is version {plan.target.version} ({progress_line(prog)}); "
          "old owners drop what they no longer own after their drain", file=out)
    return True


def wait_ready(store: "ClusterStore", watch: ClusterWatch, active: "ShardMap", target: "ShardMap",
               tables: Sequence["TableSpec"], timeout_s: float, out: TextIO) -> "Progress | None":
    """Block until the move is ready (its Progress) or give up (None, with the reason printed)."""
    from services.core.rebalance import same_map

    t0 = time.monotonic()
    deadline = t0 + timeout_s if timeout_s > 0 else None
    tty = out.isatty()
    last = ""
    watch.nodes_seen.wait(10.0)
    while True:
        watch.changed.clear()
        if watch.target is None or not same_map(watch.target, target):
            print(f"\nthe target shard map was removed or replaced (aborted?); the active map stays version {active.version}", file=out)
            return None
        prog = read_progress(store, active, target, tables, watch.nodes, watch.frontends)
        line = f"[{time.monotonic() - t0:5.1f}s] {progress_line(prog)}"
        if tty:
            print("\r" + line.ljust(len(last)), end="", file=out, flush=True)
        elif line.split("] ", 1)[1] != last.split("] ", 1)[-1]:
            print(line, file=out, flush=True)
        last = line
        if prog.done:
            if tty:
                print(file=out)
            return prog
        if deadline is not None and time.monotonic() >= deadline:
            print(f"\ntimed out after {timeout_s:g}s: {progress_line(prog)}", file=out)
            for a in prog.adds:
                if not a.ready:
                    print(f"  {a.pid} on {a.node_id}: {a.state}{' - ' + a.detail if a.detail else ''}", file=out)
            print("the target stays in place: run `shardrec rebalance apply` again to keep waiting, or "
                  "`shardrec rebalance abort`", file=out)
            return None
        watch.changed.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
