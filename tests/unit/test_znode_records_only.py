"""Znode JSON is written and parsed only in ``services/core/discovery/records.py``: no other
module of services/ indexes a dict by a znode field's name (``d["address"]``,
``d.get("versions_ready")``) or builds a dict literal with one, and no other module of
services/core/discovery/ uses ``json``. Everyone else reads and writes the typed records.

The field names are every key the records write. Other JSON documents share a few of them
(``name``, ``version``, ``partitions``, ...): those files are allowed below by file and by
field, each with its reason, so a new znode parser in them is still caught for other fields.
Code only: names in strings and comments are not indexing."""

from __future__ import annotations

import ast
import pathlib

from services.core.discovery.records import (
    FrontendRecord,
    HeldPartition,
    LoadError,
    ModelPointer,
    NodeRecord,
    PartitionError,
    VersionRecord,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECORDS = "services/core/discovery/records.py"
DISCOVERY = "services/core/discovery/"

# Every key of every znode's JSON, from the records themselves (nested objects included).
_FULL_NODE = NodeRecord(held={"t/0of1": HeldPartition()}, load_error=LoadError(1), partition_error=PartitionError("t/0of1"),
                        instance_id="i")
ZNODE_FIELDS = frozenset(
    set(_FULL_NODE.to_dict()) | set(HeldPartition().to_dict()) | set(LoadError(1).to_dict())
    | set(PartitionError("p").to_dict()) | set(FrontendRecord(instance_id="i").to_dict()) | set(ModelPointer("u").to_dict())
    | {"version"}  # VersionRecord
)

# file -> (fields it may use as dict keys, why: the JSON there is not a znode's)
ALLOWED: dict[str, tuple[frozenset[str], str]] = {
    "services/core/placement/shardmap.py": (frozenset({"version", "partitions"}), "the ShardMap's own codec (to_json/from_json)"),
    "services/core/placement/spec.py": (frozenset({"partitions"}), "the placement spec file"),
    "services/core/checkpoint/manifest.py": (frozenset({"name", "version"}), "checkpoint manifests"),
    "services/core/checkpoint/torchrec_map.py": (frozenset({"name"}), "the TorchRec import MAP file"),
    "services/core/features.py": (frozenset({"name"}), "the features spec of a model's manifest"),
    "services/localcluster/state.py": (frozenset({"name", "pid", "address"}), "the local cluster's state file"),
    "services/control/features.py": (frozenset({"version"}), "the summary `features load` returns"),
    "services/admin/cmd_features.py": (frozenset({"version"}), "prints that summary"),
    "services/admin/cmd_rebalance.py": (frozenset({"partitions"}), "--set builds a placement spec entry"),
    "services/frontend/lookup/baselines/redis_kv.py": (frozenset({"version"}), "the redis-kv baseline's meta key in Redis"),
    "services/frontend/lookup/baselines/redis_kv_store.py": (frozenset({"version"}), "the redis-kv baseline's meta key in Redis"),
    "services/core/rpc/errors.py": (frozenset({"error"}), "Google's JSON error body of the REST endpoint"),
    "services/frontend/http.py": (frozenset({"error"}), "Google's JSON error body of the REST endpoint"),
    "services/frontend/openapi.py": (frozenset({"name", "version", "error"}), "the OpenAPI document"),
}


def znode_keys_used(source: str) -> list[tuple[int, str, str]]:
    """(line, how, field) for every ``x["field"]``, ``x.get("field")`` (``pop``,
    ``setdefault``) and ``{"field": ...}`` in ``source`` whose field is a znode field."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys = [(node.slice.value, "[]")]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault") and node.args and isinstance(node.args[0], ast.Constant)):
            keys = [(node.args[0].value, f".{node.func.attr}()")]
        elif isinstance(node, ast.Dict):
            keys = [(k.value, "{}") for k in node.keys if isinstance(k, ast.Constant)]
        else:
            continue
        found += [(node.lineno, how, key) for key, how in keys if isinstance(key, str) and key in ZNODE_FIELDS]
    return sorted(found)


def json_uses(source: str) -> list[int]:
    """Lines that import ``json`` (or anything from it)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == "json" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "json":
            lines.append(node.lineno)
    return lines


def test_the_finder_sees_code_not_strings():
    src = ('a = d["address"]\nb = d.get("versions_ready", [])\nc = {"held": {}, "other": 1}\n'
           'e = d["other"]\nprint("d[\'address\']")  # d["held"]\n')
    assert znode_keys_used(src) == [(1, "[]", "address"), (2, ".get()", "versions_ready"), (3, "{}", "held")]
    assert json_uses("import json\nfrom json import loads\nimport jsonschema\n") == [1, 2]


def test_the_fields_are_the_znode_fields():
    assert {"address", "versions_ready", "held", "ids_per_s", "load_error", "uri", "frontend_id", "version"} <= ZNODE_FIELDS
    assert VersionRecord(1).to_bytes() == b'{"version":1}'


def test_znode_json_is_parsed_and_written_only_in_records():
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("services/_proto/") or rel == RECORDS:
            continue
        source = path.read_text(encoding="utf-8")
        if rel.startswith(DISCOVERY):
            offenders += [f"{rel}:{line}: imports json" for line in json_uses(source)]
        allowed = ALLOWED.get(rel, (frozenset(), ""))[0]
        offenders += [f"{rel}:{line}: {how} {key!r}" for line, how, key in znode_keys_used(source) if key not in allowed]
    assert not offenders, f"read and write znodes through the records of {RECORDS}:\n" + "\n".join(offenders)


def test_every_allowance_is_still_needed():
    """An allowance a file no longer uses is removed, so the list stays the truth."""
    stale = []
    for rel, (fields, _why) in ALLOWED.items():
        path = ROOT / rel
        used = {key for _line, _how, key in znode_keys_used(path.read_text(encoding="utf-8"))} if path.exists() else set()
        stale += [f"{rel}: {key!r}" for key in sorted(fields - used)]
    assert not stale, "allowed but not used any more:\n" + "\n".join(stale)
