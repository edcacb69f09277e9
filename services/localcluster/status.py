"""``shardrec cluster status`` and ``cluster down``, by state file: what runs, what ZooKeeper
says, and stopping everything a launcher left (docs/local-cluster.md)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Mapping

from services.control.text import node_cells, table
from services.core.errors import ShardrecError
from services.localcluster.console import Progress
from services.localcluster.demo import call_instructions
from services.localcluster.processes import process_alive, stop_processes, stop_recorded
from services.localcluster.state import STATE_FILE, ClusterState, read_state, remove_state, state_path

if TYPE_CHECKING:
    from services.core.discovery.records import FrontendRecord, ModelPointer, NodeRecord


@dataclass(frozen=True)
class ZkView:
    """What ZooKeeper says about a cluster (read by ``cluster status``)."""

    model: "ModelPointer | None"
    serving_version: int | None
    map_version: int | None
    map_nodes: tuple[str, ...]
    partitions_of: Mapping[str, tuple[str, ...]]
    nodes: Mapping[str, "NodeRecord"]
    frontends: Mapping[str, "FrontendRecord"]


def format_processes(state: ClusterState, alive: Mapping[str, bool]) -> str:
    """One row per process of the state file: name, pid, running or not, address, log. Pure."""
    rows = [("PROCESS", "PID", "STATE", "ADDRESS", "LOG")]
    for p in state.processes:
        rows.append((p.name, str(p.pid), "running" if alive.get(p.name) else "NOT RUNNING", p.address or "-", p.log or "-"))
    return table(rows, indent="  ")


def format_zk_view(view: ZkView) -> str:
    """Live nodes with their partitions and versions, the map version, live frontends. Pure."""
    model = view.model
    lines = [
        f"  model {'?' if model is None else model.name!r} at {'?' if model is None else model.uri}, serving version "
        f"{'-' if view.serving_version is None else view.serving_version}, active shard map version "
        f"{'-' if view.map_version is None else view.map_version}"
    ]
    rows = [("NODE", "LIVE", "ADDRESS", "READY", "SERVING", "MAP", "PARTITIONS")]
    for node in list(view.map_nodes) + sorted(set(view.nodes) - set(view.map_nodes)):
        d = view.nodes.get(node)
        parts = " ".join(d.partitions) if d else " ".join(view.partitions_of.get(node, ()))
        if d is None:
            rows.append((node, "no", "-", "-", "-", "-", f"(owns {parts or '-'})"))
        else:
            rows.append((node, "yes", *node_cells(d), parts or "-"))
    lines.append(table(rows, indent="  "))
    if view.frontends:
        lines.append(
            "  frontends: "
            + ", ".join(f"{fid} ({f.address or '?'}, version {'?' if f.version is None else f.version})"
                        for fid, f in sorted(view.frontends.items()))
        )
    else:
        lines.append("  frontends: (none live)")
    return "\n".join(lines)


def read_zk_view(zk_hosts: str, cluster: str, connect_timeout_s: float = 5.0, auth_file: str = "") -> ZkView:
    """Read a cluster's view from ZooKeeper. UnavailableError when it does not answer."""
    from services.control.cluster import maybe, open_cluster

    with open_cluster(zk_hosts, cluster, session_timeout_s=5.0, connect_timeout_s=connect_timeout_s, auth_file=auth_file) as (
        _client, store,
    ):  # fmt: skip
        found = maybe(store.read_active)
        smap = found[0] if found else None
        return ZkView(
            model=maybe(store.read_model),
            serving_version=maybe(store.read_serving_version),
            map_version=None if smap is None else smap.version,
            map_nodes=() if smap is None else tuple(smap.nodes),
            partitions_of={} if smap is None else {n: tuple(str(k) for k in smap.partitions_of(n)) for n in smap.nodes},
            nodes=store.live_nodes(),
            frontends=store.live_frontends(),
        )


def cluster_status(workdir: Path, workdir_arg: str, out: IO[str]) -> int:
    """Print the processes of the state file and the ZooKeeper view. 0 when every process
    runs, 1 when some do not, 2 when there is no state file."""
    state = read_state(workdir)
    if state is None:
        print(f"no local cluster in {workdir} (no {STATE_FILE}); start one with `shardrec cluster up`", file=out)
        return 2
    alive = {p.name: process_alive(p) for p in state.processes}
    launcher = ""
    if state.launcher is not None and process_alive(state.launcher):
        launcher = f", still starting (launcher pid {state.launcher.pid})"
    print(f"local cluster {state.cluster!r} from {state.mode!r}, started {state.created_at}, workdir {state.workdir}{launcher}", file=out)
    print(format_processes(state, alive), file=out)
    print(file=out)
    if state.zk and alive.get("zookeeper"):
        try:
            view = read_zk_view(state.zk, state.cluster, auth_file=state.zk_auth)
        except ShardrecError as e:
            print(f"ZooKeeper {state.zk}: not readable: {e}", file=out)
        else:
            print(f"ZooKeeper {state.zk}, /shardrec/{state.cluster}:", file=out)
            print(format_zk_view(view), file=out)
    else:
        print("ZooKeeper is not running: no cluster view", file=out)
    print(file=out)
    print(call_instructions(state, workdir_arg), file=out)
    return 0 if state.processes and all(alive.values()) else 1


def cluster_down(workdir: Path, grace_s: float, out: IO[str]) -> int:
    """Stop the launcher still starting the cluster (if any), then every process of the state
    file in reverse order; remove the state file. 0 when nothing is left running (also when
    there was no cluster), 1 otherwise."""
    state = read_state(workdir)
    progress = Progress(out)
    if state is None:
        progress.line(f"no local cluster in {workdir} (no {STATE_FILE}): nothing to stop")
        return 0
    if state.launcher is not None and process_alive(state.launcher):
        with progress.step(f"stopping the launcher ({state.mode}, pid {state.launcher.pid})"):
            # It stops its children itself; its group may be the user's shell job: leave that alone.
            stop_processes([state.launcher], grace_s + 30.0, groups=False)
        state = read_state(workdir) or replace(state, processes=[])
    ok = stop_recorded(state, grace_s, progress)
    if ok:
        remove_state(workdir)
        progress.line(f"cluster {state.cluster!r} stopped; logs kept in {Path(state.workdir) / 'logs'}")
        return 0
    progress.line(f"some processes could not be stopped; {state_path(workdir)} kept")
    return 1
