"""Model versions on a live cluster: publish a version, roll back to an ancestor, read where
the cluster stands. Only desired state is written (``model/target_version``); shards load the
target in the background and frontends switch when every partition has a ready replica
(docs/checkpoint.md, "Serving a new version"). Nothing here waits on a process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.control.cluster import maybe
from services.control.text import table

if TYPE_CHECKING:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.discovery.cluster_store import ClusterStore


def model_reader(store: "ClusterStore") -> "CheckpointReader":
    """A reader of the checkpoint root the cluster's model pointer names."""
    from services.core.checkpoint.reader import CheckpointReader

    return CheckpointReader(store.read_model().uri)


def publish_version(store: "ClusterStore", reader: "CheckpointReader", version: int) -> str:
    """Verify ``version`` and set it as the target. FailedPreconditionError when it is a delta
    whose parent is not the serving version; CheckpointError when it is incomplete or corrupt.
    Returns a line saying what was published."""
    from services.core.checkpoint import lineage

    serving = store.read_serving_version()
    chain = reader.chain(version)
    for m in chain:
        reader.verify(m.version, full=m.version == version)
    lineage.check_publish([m.version for m in chain], serving)
    m = reader.manifest(version)
    store.write_target_version(version)
    return f"published version {version} ({m.kind}, parent {m.parent}); the cluster serves {serving} until every partition is ready"


def rollback_version(store: "ClusterStore", reader: "CheckpointReader", version: int) -> str:
    """Make ``version``, an ancestor of the serving version, the target again."""
    from services.core.checkpoint import lineage

    serving = store.read_serving_version()
    lineage.check_rollback(version, [m.version for m in reader.chain(serving)])
    reader.verify(version, full=True)
    store.write_target_version(version)
    return f"rolling back from version {serving} to {version}; the next delta must have parent {version}"


def read_status(store: "ClusterStore") -> dict[str, Any]:
    """Target and serving versions, the active map, live nodes and frontends (``checkpoint status``)."""
    smap, _ = store.read_active()
    return {
        "target": maybe(store.read_target_version),
        "serving": maybe(store.read_serving_version),
        "map": smap,
        "nodes": store.live_nodes(),
        "frontends": store.live_frontends(),
    }


def format_status(st: dict[str, Any]) -> str:
    """The report of ``checkpoint status``: readiness per partition, loads, refusals. Pure."""
    target, smap, nodes = st["target"], st["map"], st["nodes"]
    lines = [f"target version {target}, serving version {st['serving']}"]
    rows = [("TABLE", "PARTITION", "READY AT TARGET", "REPLICAS (versions ready)")]
    for name in sorted(smap.tables):
        for p, replicas in enumerate(smap.tables[name].partitions):
            cells, ready = [], 0
            for r in replicas:
                d = nodes.get(r)
                versions = d.versions_ready if d else ()
                ready += target in versions
                cells.append(f"{r}[{','.join(map(str, versions))}]" if d else f"{r}[down]")
            rows.append((name, str(p), f"{ready}/{len(replicas)}", " ".join(cells)))
    lines.append(table(rows))
    for node, d in sorted(nodes.items()):
        if d.loading:
            lines.append(f"{node}: loading version {d.loading}")
        err = d.load_error
        if err is not None:
            lines.append(f"{node}: REFUSED version {err.version}: {err.error}")
    for fid, f in sorted(st["frontends"].items()):
        lines.append(f"frontend {fid}: serving version {f.version}")
    return "\n".join(lines)
