"""``shardrec rebalance show|plan|apply|status|abort``: move a live cluster between shard maps.

The lifecycle (docs/placement.md, "Rebalancing"): ``plan`` reads the active map, the model's
tables and the load the shards measured, runs the planner and writes a plan file (it changes
nothing). ``apply`` writes the plan's map as the target (compare-and-set), waits until every
partition of the target has a live replica holding it at every version being served and every
node that loads something for it has it (the nodes' znodes say so), then switches the active map
to the target and deletes the target in one ZooKeeper transaction. Shards do the moving: each
loads what the target newly gives it while serving, and drops what no map gives it any more
after its drain period. ``abort`` deletes the target before the switch; ``status`` shows how far
a move has got; ``show`` what each node holds, its memory and its measured load.

Every step is idempotent and the switch is atomic, so a CLI killed at any point leaves a valid
cluster: ``apply`` with the same plan resumes, ``abort`` gives up.

Handlers run on the CLI's main thread; kazoo, the reader and the planner are imported inside
them, so ``shardrec --help`` stays light. Watch callbacks only record and set an Event.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence, TextIO

from services.admin.cmd_placement import zk_args
from services.control.text import human_bytes, table

if TYPE_CHECKING:
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.placement import ShardMap
    from services.core.planner import Move, NodeSummary
    from services.core.rebalance import Progress, RebalancePlan
    from services.core.types import TableSpec

DEFAULT_NODE_MEMORY_BYTES = 64 << 30
DEFAULT_REPLICATE_MAX_BYTES = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="move a live cluster to a new shard map (plan, apply, status, abort)")
    s = p.add_subparsers(dest="rebalance_command", metavar="SUBCOMMAND", required=True)

    show = s.add_parser("show", help="per node: partitions held, memory, measured load, live or not")
    zk_args(show)
    show.set_defaults(func=_show)

    plan = s.add_parser(
        "plan",
        help="plan a new shard map and write it to a file (changes nothing)",
        description="Plan the target shard map from the active one, the model's tables and the load the shards "
        "measured; print the moves, the bytes to load and each node's memory and load before and after. Tables "
        "not named by --set keep their sharding, partitions and replicas (only replicas move) unless --rebalance.",
    )
    plan.add_argument("--add-nodes", type=int, default=0, metavar="N", help="add N nodes (ids shard-<k>, the smallest k free)")
    plan.add_argument("--remove-node", action="append", default=[], metavar="ID", help="remove a node (repeatable)")
    plan.add_argument(
        "--set", action="append", default=[], metavar="TABLE=SHARDING",
        help="pin a table: TABLE=replicated[:R], TABLE=table_wise[:R] or TABLE=row_wise:P[:R] (R an integer or 'all'; repeatable)",
    )
    plan.add_argument("--rebalance", action="store_true", help="let the planner reshape every table not pinned, for memory and load")
    plan.add_argument("--out", required=True, help="plan file to write (JSON)")
    plan.add_argument("--node-memory-bytes", type=int, default=DEFAULT_NODE_MEMORY_BYTES, help="embedding bytes each node may hold (default 64 GiB)")
    plan.add_argument("--replicate-max-bytes", type=int, default=DEFAULT_REPLICATE_MAX_BYTES, help="with --rebalance: a table at most this big is replicated (default 1 MiB)")
    plan.add_argument("--min-replicas", type=int, default=2, help="with --rebalance: replicas of every partition at least (default 2)")
    plan.add_argument("--load-tolerance", type=float, default=0.2, help="aim: every node's lookups/s within mean x (1 +- tol) (default 0.2)")
    zk_args(plan)
    plan.set_defaults(func=_plan)

    apply = s.add_parser("apply", help="move the live cluster to a plan's map (resumes a move in progress)")
    apply.add_argument("plan", help="plan file written by `rebalance plan`")
    apply.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    apply.add_argument("--timeout-s", type=float, default=600.0, help="give up waiting after this long (the target stays; 0 = wait forever)")
    zk_args(apply)
    apply.set_defaults(func=_apply)

    status = s.add_parser("status", help="progress of the rebalance in progress, and partitions still draining")
    zk_args(status)
    status.set_defaults(func=_status)

    abort = s.add_parser("abort", help="give up the rebalance in progress (before the switch): delete the target map")
    zk_args(abort)
    abort.set_defaults(func=_abort)


# -- ZooKeeper and the model -------------------------------------------------------------------


@contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[tuple[Any, "ShardMapStore"]]:
    from services.core.clients import make_kazoo
    from services.core.config import ZkConfig
    from services.core.discovery.shard_map_store import ShardMapStore
    from services.core.discovery.zk_paths import ZkPaths

    client = make_kazoo(ZkConfig(hosts=args.zk, cluster=args.cluster))
    try:
        yield client, ShardMapStore(client, ZkPaths(args.cluster))
    finally:
        client.stop()
        client.close()


def _maybe(read: Callable[[], Any]) -> Any:
    from services.core.errors import NotFoundError

    try:
        return read()
    except NotFoundError:
        return None


def model_tables(store: "ShardMapStore") -> list["TableSpec"]:
    """The tables of the model the cluster serves (from its checkpoint's manifest)."""
    from services.core.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(store.read_model()["uri"])
    version = _maybe(store.read_serving_version) or reader.latest_version()
    return list(reader.manifest(version).model.tables)


def read_progress(store: "ShardMapStore", active: "ShardMap", target: "ShardMap", tables: Sequence["TableSpec"],
                  nodes: Mapping[str, Mapping[str, Any]] | None = None,
                  frontends: Mapping[str, Mapping[str, Any]] | None = None) -> "Progress":
    from services.core.rebalance import progress, required_versions

    nodes = store.live_nodes() if nodes is None else nodes
    frontends = store.live_frontends() if frontends is None else frontends
    versions = required_versions(_maybe(store.read_serving_version), _maybe(store.read_target_version), frontends, nodes)
    return progress(active, target, tables, nodes, versions)


# -- show ----------------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    with _cluster(args) as (_client, store):
        smap, _ = store.read_active()
        target = store.read_target()
        live = store.live_nodes()
        tables = model_tables(store)
    print(format_show(args.cluster, smap, None if target is None else target[0], live, tables))
    return 0


def format_show(cluster: str, smap: "ShardMap", target: "ShardMap | None", live: Mapping[str, Mapping[str, Any]],
                tables: Sequence["TableSpec"]) -> str:
    """Pure: every node of the maps or alive, with what it holds, its memory and its load; then
    per table its placement and measured load."""
    from services.core.placement import bytes_per_node
    from services.core.rebalance import measured_load

    lines = [f"cluster {cluster!r}: active shard map version {smap.version}, "
             + (f"rebalancing to version {target.version}" if target else "no rebalance in progress")]
    owned = bytes_per_node(smap, tables)
    rows = [("NODE", "LIVE", "IN MAP", "MEMORY", "OWNS", "LOAD ids/s", "HELD")]
    nodes = list(smap.nodes) + [n for n in (target.nodes if target else ()) if n not in smap.nodes]
    nodes += sorted(set(live) - set(nodes))
    for node in nodes:
        d = live.get(node)
        where = ("active" if node in smap.nodes else "") + (" target" if target and node in target.nodes else "")
        owns = human_bytes(owned[node]) if node in owned else "-"
        if d is None:
            rows.append((node, "no", where.strip() or "-", "-", owns, "-", "-"))
            continue
        held = d.get("held") if isinstance(d.get("held"), dict) else {}
        load = sum(float(h.get("ids_per_s", 0.0)) for h in held.values())
        rows.append((node, "yes", where.strip() or "-", human_bytes(int(d.get("memory_bytes", 0))), owns, f"{load:.1f}",
                     " ".join(sorted(held)) or "-"))
    lines.append(table(rows))
    loads = measured_load(live)
    by_name = {t.name: t for t in tables}
    rows = [("TABLE", "SHARDING", "P", "R", "BYTES", "LOAD ids/s")]
    for name in sorted(smap.tables):
        tp = smap.tables[name]
        size = by_name[name].size_bytes if name in by_name else 0
        rows.append((name, tp.sharding.value, str(tp.num_partitions), str(max(len(r) for r in tp.partitions)),
                     human_bytes(size), f"{loads.get(name, 0.0):.1f}"))
    lines += ["", table(rows)]
    return "\n".join(lines)


# -- plan ----------------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    from services.core.planner import PlannerConfig, TableLoad, diff, summarize
    from services.core.rebalance import PlanRequest, RebalancePlan, measured_load, parse_set, plan_target

    request = PlanRequest(args.add_nodes, tuple(args.remove_node), tuple(parse_set(x) for x in args.set), args.rebalance)
    with _cluster(args) as (_client, store):
        smap, _ = store.read_active()
        target = store.read_target()
        live = store.live_nodes()
        tables = model_tables(store)
    loads = measured_load(live)
    config = PlannerConfig(
        replicate_max_bytes=args.replicate_max_bytes, min_replicas=args.min_replicas, load_tolerance=args.load_tolerance
    )
    new = plan_target(smap, tables, loads, request, node_memory_bytes=args.node_memory_bytes, config=config)
    table_loads = [TableLoad(t, loads.get(t.name, 0.0)) for t in tables]
    print(format_plan(smap, new, diff(smap, new, tables), summarize(smap, table_loads), summarize(new, table_loads)))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RebalancePlan(args.cluster, smap.version, new, request.to_json(), created).save(args.out)
    print(f"\nwrote {args.out} (made against active map version {smap.version}); apply it with: shardrec rebalance apply {args.out}")
    if target is not None:
        print(f"note: a rebalance to map version {target[0].version} is in progress; finish or abort it first", file=sys.stderr)
    return 0


def format_plan(old: "ShardMap", new: "ShardMap", moves: Sequence["Move"], before: Mapping[str, "NodeSummary"],
                after: Mapping[str, "NodeSummary"]) -> str:
    """Pure: the moves, the bytes to load and free, and per node memory and load before -> after."""
    added = [n for n in new.nodes if n not in old.nodes]
    removed = [n for n in old.nodes if n not in new.nodes]
    lines = [f"plan: shard map version {old.version} -> {new.version}, {len(new.nodes)} nodes"
             + (f" (+{' +'.join(added)})" if added else "") + (f" (-{' -'.join(removed)})" if removed else "")]
    if not moves:
        lines.append("nothing moves")
    else:
        rows = [("MOVE", "PARTITION", "NODE", "BYTES")]
        rows += [(m.kind.value, f"{m.table}/{m.partition}of{m.num_partitions}", m.node_id, human_bytes(m.size_bytes)) for m in moves]
        lines.append(table(rows))
        adds = [m for m in moves if m.kind.value == "add"]
        drops = [m for m in moves if m.kind.value == "drop"]
        lines.append(
            f"to load: {len(adds)} partition(s), {human_bytes(sum(m.size_bytes for m in adds))}; "
            f"to free: {len(drops)} partition(s), {human_bytes(sum(m.size_bytes for m in drops))}"
        )
    rows = [("NODE", "MEMORY BEFORE", "AFTER", "LOAD BEFORE (ids/s)", "AFTER")]
    for node in list(old.nodes) + added:
        b, a = before.get(node), after.get(node)
        rows.append((
            node,
            human_bytes(b.memory_bytes) if b else "-", human_bytes(a.memory_bytes) if a else "-",
            f"{b.lookups_per_s:.1f}" if b else "-", f"{a.lookups_per_s:.1f}" if a else "-",
        ))
    lines += ["", table(rows)]
    return "\n".join(lines)


# -- apply ---------------------------------------------------------------------------------------


class _ClusterWatch:
    """The live nodes and frontends and the target map, kept by watches; ``changed`` is set on
    every event. Callbacks run on watch threads and only record."""

    def __init__(self, client: Any, store: "ShardMapStore") -> None:
        from services.core.discovery.shard_map_store import MembersWatch

        self.changed = threading.Event()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.frontends: dict[str, dict[str, Any]] = {}
        self.nodes_seen = threading.Event()
        self.target: "ShardMap | None" = None
        self._watches = [
            MembersWatch(client, store.paths.nodes, self._on_nodes),
            MembersWatch(client, store.paths.frontends, self._on_frontends),
            store.watch_target(self._on_target),
            store.watch_serving_version(lambda _v: self.changed.set()),
            store.watch_target_version(lambda _v: self.changed.set()),
        ]

    def _on_nodes(self, members: dict[str, dict[str, Any]]) -> None:
        self.nodes = members
        self.nodes_seen.set()
        self.changed.set()

    def _on_frontends(self, members: dict[str, dict[str, Any]]) -> None:
        self.frontends = members
        self.changed.set()

    def _on_target(self, smap: "ShardMap | None") -> None:
        self.target = smap
        self.changed.set()

    def cancel(self) -> None:
        for w in self._watches:
            w.cancel()


def _confirm(question: str, out: TextIO) -> bool:
    print(f"{question} [y/N] ", end="", file=out, flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _apply(args: argparse.Namespace) -> int:
    from services.core.errors import ConfigError
    from services.core.rebalance import RebalancePlan

    plan = RebalancePlan.load(args.plan)
    if plan.cluster != args.cluster:
        raise ConfigError(f"{args.plan} was made for cluster {plan.cluster!r}, not {args.cluster!r}")
    with _cluster(args) as (client, store):
        return apply_plan(client, store, plan, yes=args.yes, timeout_s=args.timeout_s)


def apply_plan(client: Any, store: "ShardMapStore", plan: "RebalancePlan", *, yes: bool, timeout_s: float,
               out: TextIO | None = None) -> int:
    """Write the plan's target (or find it already written), wait until it is ready, switch.
    Idempotent: run again after a crash, it resumes where the cluster is."""
    out = out or sys.stdout
    from services.core.errors import FailedPreconditionError
    from services.core.planner import diff
    from services.core.rebalance import same_map

    active, active_zv = store.read_active()
    if same_map(active, plan.target):
        print(f"already applied: the active shard map is version {active.version}", file=out)
        return 0
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
    if not yes and not _confirm(("resume " if found else "apply ") + what + "?", out):
        print("not applied", file=out)
        return 1
    if found is None:
        target_zv = store.write_target(plan.target, None)
        print(f"wrote the target shard map (version {plan.target.version}); shards load what it gives them", file=out)
    else:
        target_zv = found[1]
        print(f"resuming: the target shard map (version {plan.target.version}) is already written", file=out)
    watch = _ClusterWatch(client, store)
    try:
        prog = _wait_ready(store, watch, active, plan.target, tables, timeout_s, out)
    finally:
        watch.cancel()
    if prog is None:
        return 1
    store.promote_target(plan.target, active_zv, target_zv)
    print(f"switched: the active shard map is version {plan.target.version} ({prog.line()}); "
          "old owners drop what they no longer own after their drain", file=out)
    return 0


def _wait_ready(store: "ShardMapStore", watch: _ClusterWatch, active: "ShardMap", target: "ShardMap",
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
        line = f"[{time.monotonic() - t0:5.1f}s] {prog.line()}"
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
            print(f"\ntimed out after {timeout_s:g}s: {prog.line()}", file=out)
            for a in prog.adds:
                if not a.ready:
                    print(f"  {a.pid} on {a.node_id}: {a.state}{' - ' + a.detail if a.detail else ''}", file=out)
            print("the target stays in place: run `shardrec rebalance apply` again to keep waiting, or "
                  "`shardrec rebalance abort`", file=out)
            return None
        watch.changed.wait(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))


# -- status and abort ------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    with _cluster(args) as (_client, store):
        active, _ = store.read_active()
        found = store.read_target()
        nodes = store.live_nodes()
        prog = None
        if found is not None:
            prog = read_progress(store, active, found[0], model_tables(store), nodes)
    print(format_status(active, None if found is None else found[0], prog, nodes))
    return 0


def format_status(active: "ShardMap", target: "ShardMap | None", prog: "Progress | None",
                  nodes: Mapping[str, Mapping[str, Any]]) -> str:
    """Pure: the move in progress (partitions ready, bytes, each load's state) and what nodes
    still drain."""
    lines = [f"active shard map version {active.version}"]
    if target is None or prog is None:
        lines.append("no rebalance in progress")
    else:
        lines.append(f"rebalancing to version {target.version}: {prog.line()}")
        lines.append(f"required model versions: {sorted(prog.versions)}; ready to switch: {'yes' if prog.done else 'no'}")
        if prog.adds:
            rows = [("PARTITION", "NODE", "BYTES", "STATE", "DETAIL")]
            rows += [(str(a.pid), a.node_id, human_bytes(a.size_bytes), a.state, a.detail) for a in prog.adds]
            lines.append(table(rows))
    for node, d in sorted(nodes.items()):
        draining = d.get("partitions_draining") or []
        if draining:
            lines.append(f"{node}: draining {' '.join(draining)}")
        err = d.get("partition_error")
        if err:
            lines.append(f"{node}: cannot load {err.get('partition')}: {err.get('error')}")
    return "\n".join(lines)


def _abort(args: argparse.Namespace) -> int:
    with _cluster(args) as (_client, store):
        active, _ = store.read_active()
        found = store.read_target()
        if found is None:
            print(f"no rebalance in progress (active shard map version {active.version}): nothing to abort")
            return 0
        store.clear_target(found[1])
    print(f"aborted the rebalance to shard map version {found[0].version}; the active map stays version {active.version}; "
          "nodes drop what they loaded for it after their drain")
    return 0
