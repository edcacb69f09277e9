"""``shardrec checkpoint``: inspect and verify checkpoints (format v1, docs/checkpoint.md).

- ``verify --checkpoint URI [--version N]``: full check of one version (latest complete by
  default): COMPLETE marker and manifest hash, every file's size and sha256, every table's .npy
  header and the dense weights against the model spec. Prints OK, or the error and exits 1.
- ``show --checkpoint URI``: every version folder with its kind, parent, files and tables.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    ckpt = subparsers.add_parser("checkpoint", help="inspect and verify checkpoints")
    sub = ckpt.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND", required=True)
    verify = sub.add_parser("verify", help="check a version's marker, sizes, sha256 and shapes (reads every byte)")
    verify.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    verify.add_argument("--version", type=int, default=None, help="version to verify (default: the latest complete one)")
    verify.set_defaults(func=_verify)
    show = sub.add_parser("show", help="list versions: kind, parent, files, tables")
    show.add_argument("--checkpoint", required=True, metavar="URI", help="checkpoint root: a folder or file:// URI")
    show.set_defaults(func=_show)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _verify(args: argparse.Namespace) -> int:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    try:
        reader = CheckpointReader(args.checkpoint)
        version = reader.latest_version() if args.version is None else args.version
        manifest = reader.verify(version, full=True)
        if manifest.kind == "base":
            for table in manifest.model.table_names:
                reader.open_table(version, table, verify=False)  # sha256 done above; checks the header
            reader.dense_state(version, verify=False)
    except CheckpointError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    total = sum(f.size_bytes for f in manifest.files)
    print(f"OK {reader.store.uri} version {version} ({manifest.kind}): {len(manifest.files)} files, {_mib(total)}, sha256 verified")
    return 0


def _show(args: argparse.Namespace) -> int:
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    reader = CheckpointReader(args.checkpoint)
    versions = reader.store.list_versions()
    print(f"checkpoint {reader.store.uri}: {len(versions)} version folder(s)")
    for v in versions:
        try:
            m = reader.manifest(v)
        except CheckpointError as e:
            print(f"version {v}: REFUSED: {e}")
            continue
        parent = "-" if m.parent is None else m.parent
        total = sum(f.size_bytes for f in m.files)
        print(
            f"version {v}: {m.kind}, parent {parent}, model {m.model.name!r}, "
            f"{len(m.files)} files, {_mib(total)}, created {m.created_at or '?'}"
        )
        for t in m.model.tables:
            print(f"  table {t.name}: {t.rows:,} x {t.dim} {t.dtype}")
    for rel in ("features/users.npz", "features/items.npz"):
        if reader.store.exists(rel):
            print(f"{rel}: {_mib(reader.store.size_bytes(rel))}")
    return 0
