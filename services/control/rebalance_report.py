"""The reports of ``shardrec rebalance show|plan|status``, as text. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.control.rebalance import progress_line
from services.control.text import human_bytes, table

if TYPE_CHECKING:
    from services.control.rebalance import Overview, PlanResult, RebalanceStatus


def format_show(cluster: str, view: "Overview") -> str:
    """Every node of the maps or alive, with what it holds, its memory and its load; then per
    table its placement and measured load (``rebalance show``)."""
    from services.core.placement import bytes_per_node
    from services.core.rebalance import measured_load

    smap, target, live, tables = view.active, view.target, view.nodes, view.tables
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
        load = sum(h.ids_per_s for h in d.held.values())
        rows.append((node, "yes", where.strip() or "-", human_bytes(d.memory_bytes), owns, f"{load:.1f}",
                     " ".join(sorted(d.held)) or "-"))
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


def format_plan(result: "PlanResult") -> str:
    """The moves, the bytes to load and free, and per node memory and load before -> after
    (``rebalance plan``)."""
    old, new, moves, before, after = result.active, result.plan.target, result.moves, result.before, result.after
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


def format_status(status: "RebalanceStatus") -> str:
    """The move in progress (partitions ready, bytes, each load's state) and what nodes still
    drain (``rebalance status``)."""
    active, target, prog, nodes = status.active, status.target, status.progress, status.nodes
    lines = [f"active shard map version {active.version}"]
    if target is None or prog is None:
        lines.append("no rebalance in progress")
    else:
        lines.append(f"rebalancing to version {target.version}: {progress_line(prog)}")
        lines.append(f"required model versions: {sorted(prog.versions)}; ready to switch: {'yes' if prog.done else 'no'}")
        if prog.adds:
            rows = [("PARTITION", "NODE", "BYTES", "STATE", "DETAIL")]
            rows += [(str(a.pid), a.node_id, human_bytes(a.size_bytes), a.state, a.detail) for a in prog.adds]
            lines.append(table(rows))
    for node, d in sorted(nodes.items()):
        if d.partitions_draining:
            lines.append(f"{node}: draining {' '.join(d.partitions_draining)}")
        err = d.partition_error
        if err is not None:
            lines.append(f"{node}: cannot load {err.partition}: {err.error}")
    return "\n".join(lines)
