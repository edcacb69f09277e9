"""``shardrec checkpoint``: inspect, verify, produce and retire checkpoint versions (format v1,
docs/checkpoint.md).

- ``verify --checkpoint URI [--version N]``: full check of one version (latest complete by
  default): COMPLETE marker and manifest hash, every file's size and sha256, every table's .npy
  header (a delta's ids and rows too), the dense weights against the model spec and, for a
  delta, the manifests of its whole chain. Prints OK, or the error and exits 1.
- ``show --checkpoint URI``: every version folder with its kind, parent, files and tables; for
  a delta the tables it changes, rows per table and whether it replaces the dense weights.
- ``delta --from ROOT/versions/V --to PATH --out ROOT [--version N]``: a new delta N of ROOT on V
  holding exactly what differs from the ``--to`` version (``services.core.checkpoint.delta``).
- ``compact --checkpoint ROOT --version V [--as N]``: a new base N equal to version V.
- ``gc --checkpoint ROOT --keep K [--protect V ...]``: delete old versions no kept chain needs.
- ``import --torchrec STATE_DICT --config MAP --out ROOT``: a TorchRec DLRM state dict as a new
  base (``services.core.checkpoint.torchrec_import``, docs/import.md).
"""

from __future__ import annotations

import argparse
import sys

_ROOT_HELP = "checkpoint root: a folder or file:// URI"


def register(subparsers: argparse._SubParsersAction) -> None:
    ckpt = subparsers.add_parser("checkpoint", help="inspect, verify, diff, compact and garbage-collect checkpoints")
    sub = ckpt.add_subparsers(dest="checkpoint_command", metavar="SUBCOMMAND", required=True)
    verify = sub.add_parser("verify", help="check a version's marker, sizes, sha256 and shapes (reads every byte)")
    verify.add_argument("--checkpoint", required=True, metavar="URI", help=_ROOT_HELP)
    verify.add_argument("--version", type=int, default=None, help="version to verify (default: the latest complete one)")
    verify.set_defaults(func=_verify)
    show = sub.add_parser("show", help="list versions: kind, parent, files, tables, a delta's changed rows")
    show.add_argument("--checkpoint", required=True, metavar="URI", help=_ROOT_HELP)
    show.set_defaults(func=_show)
    delta = sub.add_parser(
        "delta",
        help="write a delta of ROOT holding what differs between two versions",
        description="Diff --from (a complete version of --out) against --to (a version folder of any checkpoint "
        "root, base or delta) and write the changed rows and, if they differ, the dense weights as a new delta "
        "of --out whose parent is the --from version. Both must have the same model spec.",
    )
    delta.add_argument("--from", dest="from_path", required=True, metavar="PATH", help="ROOT/versions/<V>: the parent of the new delta")
    delta.add_argument("--to", dest="to_path", required=True, metavar="PATH", help="<root>/versions/<V> of any checkpoint root: the target")
    delta.add_argument("--out", required=True, metavar="ROOT", help="the checkpoint root the delta is written to")
    delta.add_argument("--version", type=int, default=None, help="version of the new delta (default: the next free one)")
    delta.set_defaults(func=_delta)
    compact = sub.add_parser("compact", help="write a new base equal to a (delta) version")
    compact.add_argument("--checkpoint", required=True, metavar="ROOT", help=_ROOT_HELP)
    compact.add_argument("--version", type=int, required=True, help="the version to compact (base or delta)")
    compact.add_argument("--as", dest="as_version", type=int, default=None, help="version of the new base (default: the next free one)")
    compact.set_defaults(func=_compact)
    gc = sub.add_parser(
        "gc",
        help="delete old versions that no kept or protected version's chain needs",
        description="Keep the K newest complete versions, every --protect version and every version their "
        "chains need; delete the other folders older than the oldest kept version.",
    )
    gc.add_argument("--checkpoint", required=True, metavar="ROOT", help=_ROOT_HELP)
    gc.add_argument("--keep", type=int, required=True, metavar="K", help="how many newest complete versions to keep (>= 1)")
    gc.add_argument("--protect", type=int, nargs="*", default=[], metavar="V", help="versions to keep too (e.g. the one being served)")
    gc.set_defaults(func=_gc)
    imp = sub.add_parser(
        "import",
        help="write a TorchRec DLRM state dict as a new base version (docs/import.md)",
        description="Read an unsharded torchrec.models.dlrm.DLRM state dict (safetensors or torch.save) table by table "
        "and write it as a base version of --out; MAP (TOML, or .json) says what the state dict does not.",
    )
    imp.add_argument("--torchrec", required=True, metavar="STATE_DICT", help="a .safetensors or torch.save file (not a DCP folder)")
    imp.add_argument("--config", required=True, metavar="MAP", help="features, tables, sides, pooling, mappings, dense features")
    imp.add_argument("--out", required=True, metavar="ROOT", help=_ROOT_HELP)
    imp.add_argument("--version", type=int, default=None, help="version of the new base (default: the next free one)")
    imp.add_argument("--features", default=None, metavar="ROOT", help="copy features/users.npz and/or items.npz from this folder")
    imp.set_defaults(func=_import)
    from services.admin import cmd_publish

    cmd_publish.register(sub)  # publish, rollback, status: the cluster side of versions


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _verify(args: argparse.Namespace) -> int:
    from services.core.checkpoint.manifest import DENSE_FILE, KIND_BASE
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    try:
        reader = CheckpointReader(args.checkpoint)
        version = reader.latest_version() if args.version is None else args.version
        manifest = reader.verify(version, full=True)
        if manifest.kind == KIND_BASE:
            for table in manifest.model.table_names:
                reader.open_table(version, table, verify=False)  # sha256 done above; checks the header
        if manifest.lists(DENSE_FILE):
            reader.dense_state(version, verify=False)
    except CheckpointError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    kind = manifest.kind if manifest.parent is None else f"{manifest.kind} of {manifest.parent}"
    print(
        f"OK {reader.store.uri} version {version} ({kind}): {len(manifest.files)} files, "
        f"{_mib(manifest.size_bytes)}, sha256 verified"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from services.core.checkpoint.manifest import DENSE_FILE
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.errors import CheckpointError

    reader = CheckpointReader(args.checkpoint)
    versions = reader.store.list_versions()
    print(f"checkpoint {reader.store.uri}: {len(versions)} version folder(s)")
    for v in versions:
        try:
            m = reader.manifest(v)
            changed = {t: len(reader.delta_rows(v, t)[0]) for t in m.delta_tables}
        except CheckpointError as e:
            print(f"version {v}: REFUSED: {e}")
            continue
        parent = "-" if m.parent is None else m.parent
        print(
            f"version {v}: {m.kind}, parent {parent}, model {m.model.name!r}, "
            f"{len(m.files)} files, {_mib(m.size_bytes)}, created {m.created_at or '?'}"
        )
        if m.parent is None:
            for t in m.model.tables:
                print(f"  table {t.name}: {t.rows:,} x {t.dim} {t.dtype}")
            continue
        for t in m.model.tables:
            if t.name in changed:
                print(f"  table {t.name}: {changed[t.name]:,} of {t.rows:,} rows changed")
        if not changed:
            print("  no table changed")
        print(f"  dense weights: {'replaced' if m.lists(DENSE_FILE) else 'from the parent'}")
    for rel in ("features/users.npz", "features/items.npz"):
        if reader.store.exists(rel):
            print(f"{rel}: {_mib(reader.store.size_bytes(rel))}")
    return 0


def _delta(args: argparse.Namespace) -> int:
    from services.core.checkpoint.delta import diff_versions, same_root, split_version_path
    from services.core.checkpoint.storage import CheckpointStore
    from services.core.errors import CheckpointError

    out = CheckpointStore(args.out)
    from_root, parent = split_version_path(args.from_path)
    to_root, to_version = split_version_path(args.to_path)
    if not same_root(from_root, out):
        raise CheckpointError(f"--from {args.from_path} must be a version of --out {args.out} (the delta's parent)")
    summary = diff_versions(out, parent, to_root, to_version, version=args.version)
    m = summary.manifest
    print(f"delta {m.version} (parent {parent}) written to {out.uri}: equal to {to_root.uri} version {to_version}")
    width = max(len(t) for t in summary.rows_changed)
    for t in m.model.tables:
        print(f"  {t.name:<{width}}  {summary.rows_changed[t.name]:>12,} of {t.rows:,} rows changed")
    print(f"  dense weights: {'changed' if summary.dense_changed else 'unchanged'}")
    print(f"  {len(m.files)} files, {summary.size_bytes:,} bytes ({_mib(summary.size_bytes)}) written")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from services.core.checkpoint.delta import compact_version

    m = compact_version(args.checkpoint, args.version, args.as_version)
    print(f"base {m.version} written to {args.checkpoint}: equal to version {args.version}, {_mib(m.size_bytes)}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from services.core.checkpoint.delta import collect_garbage

    deleted = collect_garbage(args.checkpoint, args.keep, args.protect)
    if deleted:
        print(f"deleted {len(deleted)} version(s) from {args.checkpoint}: {', '.join(map(str, deleted))}")
    else:
        print(f"nothing to delete in {args.checkpoint}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from services.core.checkpoint.torchrec_import import import_torchrec

    summary = import_torchrec(
        args.torchrec, args.config, args.out, version=args.version, features=args.features, progress=lambda line: print(f"  {line}")
    )
    m = summary.manifest
    print(
        f"base {m.version} of model {m.model.name!r} written to {args.out}: {len(m.model.tables)} tables, "
        f"{len(m.model.sparse_features)} sparse and {len(m.model.dense_features)} dense features, {_mib(m.size_bytes)}"
    )
    for rel, what in summary.features.items():
        print(f"  {rel}: {what}")
    return 0
