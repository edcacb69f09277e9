"""What a local cluster serves (docs/local-cluster.md, "Your own checkpoint"): a checkpoint
given by URI, described in one line; the placement spec the planner writes for it when none is
given; which feature files it has. The demo model of a preset is ``config.existing_model``'s.

Main thread only; reads checkpoints, writes one spec file, starts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.core.checkpoint.storage import CheckpointStore
from services.core.types import FeatureSide

SPEC_FILE = "placement.json"  # below the workdir: the planner's spec, when none is given


def describe_checkpoint(uri: str) -> tuple[int, str]:
    """The latest complete version of the checkpoint at ``uri`` and a line naming its model.
    CheckpointError (naming the root) when no complete version is readable."""
    from services.core.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(uri)
    version = reader.latest_version()
    model = reader.manifest(version).model
    tables = ", ".join(f"{t.name} {t.rows:,}x{t.dim}" for t in model.tables)
    return version, (
        f"model {model.name!r} version {version}: {len(model.tables)} tables ({tables}), "
        f"{len(model.sparse_features)} sparse and {len(model.dense_features)} dense features"
    )


def write_planned_spec(uri: str, nodes: int, path: Path) -> str:
    """Write the planner's placement spec for the latest model of ``uri`` on ``nodes`` nodes to
    ``path`` (``control.placement.planned_spec``); returns a line saying how each table is placed."""
    from services.control.placement import planned_spec
    from services.core.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(uri)
    spec = planned_spec(reader.manifest(reader.latest_version()).model.tables, nodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    shapes = []
    for name, t in sorted(spec.tables.items()):
        parts = f" x{t.partitions} partitions" if t.partitions > 1 else ""
        shapes.append(f"{name} {t.sharding.value}{parts} (replicas {t.replicas})")
    return ", ".join(shapes)


def feature_files(root: str | Path) -> list[str]:
    """Which of ``features/users.npz`` and ``features/items.npz`` exist below ``root``."""
    from services.core.synth import feature_file

    store = CheckpointStore(root)
    return [rel for rel in (feature_file(side) for side in FeatureSide) if store.exists(rel)]
