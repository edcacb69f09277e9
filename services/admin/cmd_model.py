"""``shardrec model``: the demo model.

``shardrec model synth --out DIR --preset small|demo|large [--seed N] [--version N]
[--deltas K [--drift F]]`` writes a synthetic base version and the stored feature rows, then K
drift deltas on top of it (``services.core.synth``); ``shardrec model drift --out DIR --preset P
--deltas K`` adds K more on top of the latest version of an existing root. Heavy modules are imported inside the
handler so ``shardrec --help`` stays light.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.core.checkpoint.storage import CheckpointStore

# Spelled here so registering the parser imports nothing heavy; a test keeps it equal to
# ``services.core.synth.PRESETS``.
PRESET_NAMES = ("small", "demo", "large")


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="the demo model: synthesize checkpoints and feature rows")
    sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    synth = sub.add_parser(
        "synth",
        help="write a synthetic demo model (base version + features/) below a checkpoint root",
        description="Write base version N of the demo model and features/users.npz, features/items.npz. "
        "Deterministic per seed. Refuses to overwrite a complete version.",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="checkpoint root: a folder or file:// URI")
    synth.add_argument("--preset", required=True, choices=PRESET_NAMES, help="sizes: small (tests), demo (~0.4 GiB), large (>4 GiB)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--version", type=int, default=1, help="version number to write (default 1)")
    synth.add_argument(
        "--deltas", type=int, default=0, metavar="K",
        help="then write K drift deltas, each on the previous version (default 0)",
    )
    synth.add_argument(
        "--drift", type=float, default=0.01, metavar="F",
        help="fraction of every table's rows each delta changes, hot rows more often (default 0.01)",
    )
    synth.set_defaults(func=_synth)
    drift = sub.add_parser(
        "drift",
        help="write K drift deltas on top of the latest version of an existing demo-model checkpoint",
        description="What a trainer publishing small updates would write: each delta changes a fraction of "
        "every table's rows (hot rows more often) and every other one the dense weights.",
    )
    drift.add_argument("--out", required=True, metavar="DIR", help="checkpoint root holding a demo model")
    drift.add_argument("--preset", required=True, choices=PRESET_NAMES, help="the preset the root was synthesized with")
    drift.add_argument("--deltas", type=int, default=1, metavar="K", help="how many deltas (default 1)")
    drift.add_argument("--drift", type=float, default=0.01, metavar="F", help="fraction of rows each delta changes (default 0.01)")
    drift.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    drift.set_defaults(func=_drift)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _synth(args: argparse.Namespace) -> int:
    from services.core import synth
    from services.core.checkpoint.storage import CheckpointStore

    store = CheckpointStore(args.out)
    progress = (lambda line: print(f"  ... {line}", file=sys.stderr, flush=True)) if args.preset == "large" else None
    t0 = time.perf_counter()
    manifest = synth.synthesize(store, args.preset, seed=args.seed, version=args.version, progress=progress)
    elapsed = time.perf_counter() - t0
    spec = manifest.model
    print(f"model {spec.name!r} preset {args.preset} seed {args.seed}: version {manifest.version} written to {store.uri}")
    width = max(len(t.name) for t in spec.tables)
    for t in spec.tables:
        print(f"  {t.name:<{width}}  {t.rows:>12,} x {t.dim}  {_mib(t.size_bytes):>12}")
    features = sum(store.size_bytes(synth.feature_file(side)) for side in ("user", "item"))
    version_bytes = sum(f.size_bytes for f in manifest.files)
    print(
        f"  {len(spec.tables)} tables, {sum(t.rows for t in spec.tables):,} rows; "
        f"version {_mib(version_bytes)} + features {_mib(features)} in {elapsed:.1f} s"
    )
    print(f"  path: {store.local_path('versions')}/{manifest.version}")
    if args.deltas:
        _synth_deltas(args, store, manifest.version, progress)
    return 0


def _drift(args: argparse.Namespace) -> int:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.checkpoint.storage import CheckpointStore

    store = CheckpointStore(args.out)
    _synth_deltas(args, store, CheckpointReader(store).latest_version(), None)
    return 0


def _synth_deltas(
    args: argparse.Namespace, store: CheckpointStore, parent: int, progress: Callable[[str], None] | None
) -> None:
    from services.core import synth_deltas
    from services.core.checkpoint.manifest import DENSE_FILE
    from services.core.checkpoint.reader import CheckpointReader

    t0 = time.perf_counter()
    versions = synth_deltas.synthesize_deltas(store, args.preset, args.deltas, args.drift, args.seed, parent, progress=progress)
    reader = CheckpointReader(store)
    print(f"{len(versions)} drift deltas (drift {args.drift}) in {time.perf_counter() - t0:.1f} s:")
    for v in versions:
        m = reader.manifest(v)
        changed = sum(len(reader.delta_rows(v, t)[0]) for t in m.delta_tables)
        dense = ", dense weights replaced" if m.lists(DENSE_FILE) else ""
        print(f"  version {v} (delta of {m.parent}): {changed:,} rows in {len(m.delta_tables)} tables, {_mib(m.size_bytes)}{dense}")
