#!/usr/bin/env python3
"""Bring your own model, end to end: the script docs/your-model.md walks through.

1. Arrays from a trainer (random here, seeded) become a shardrec checkpoint, written by hand
   with numpy, safetensors, json and hashlib only (the format of docs/checkpoint.md): no
   ``services`` import in any writer below.
2. ``shardrec cluster up --checkpoint ckpt`` serves it (a relative path, from --workdir).
3. Recommend calls; every served score is checked against this file's own numpy forward pass.
4. A delta (changed rows and new dense weights) is written by hand and published with
   ``shardrec checkpoint publish 2``; the same calls are checked again at version 2.
5. ``shardrec cluster down`` (skipped with --keep).

    python docs/examples/own_model.py --workdir /tmp/own-model

Everything lands in --workdir: ``ckpt/`` (the checkpoint), ``cluster/`` (the local cluster's
logs and state file) and ``served.json`` (every request and the scores served, per version).
Exit 0 when every served score equals the trainer's within rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

# ---------------------------------------------------------------------------------------------
# The model, as a trainer would describe it (docs/checkpoint.md, "Model spec")
# ---------------------------------------------------------------------------------------------

DIM = 8
TABLES = {"users": 300, "items": 400, "categories": 12}  # name -> rows
SPARSE = [  # interaction order
    {"name": "user_id", "table": "users", "side": "user", "pooling": "sum", "max_bag_len": 1, "mapping": "modulo", "source": "entity_id"},
    {"name": "user_history", "table": "items", "side": "user", "pooling": "mean", "max_bag_len": 5, "mapping": "identity", "source": "stored"},
    {"name": "item_id", "table": "items", "side": "item", "pooling": "sum", "max_bag_len": 1, "mapping": "identity", "source": "entity_id"},
    {"name": "item_category", "table": "categories", "side": "item", "pooling": "sum", "max_bag_len": 1, "mapping": "identity", "source": "stored"},
]
DENSE = [{"name": "user_age", "side": "user", "default": 0.5}, {"name": "item_ctr", "side": "item", "default": 0.02}]
BOTTOM_MLP, TOP_MLP = [16, DIM], [16, 1]
MODEL = {
    "name": "my_model",
    "tables": [{"name": t, "rows": rows, "dim": DIM, "dtype": "float32"} for t, rows in TABLES.items()],
    "sparse_features": SPARSE,
    "dense_features": DENSE,
    "dense_arch": {"kind": "dlrm", "num_dense": len(DENSE), "embedding_dim": DIM, "num_sparse": len(SPARSE),
                   "bottom_mlp": BOTTOM_MLP, "top_mlp": TOP_MLP},
}  # fmt: skip
STORED_USERS = 250  # users 250..299 have no stored row: they get the defaults
STORED_ITEMS = 390  # items 390..399 likewise


def dense_shapes() -> dict[str, tuple[int, ...]]:
    """The names and shapes of dense.safetensors (docs/checkpoint.md, "Dense weights")."""
    f = len(SPARSE)
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, widths, fan_in in (("bottom_mlp", BOTTOM_MLP, len(DENSE)), ("top_mlp", TOP_MLP, DIM + (f + 1) * f // 2)):
        for i, width in enumerate(widths):
            shapes[f"{prefix}.{2 * i}.weight"] = (width, fan_in)
            shapes[f"{prefix}.{2 * i}.bias"] = (width,)
            fan_in = width
    return shapes


# ---------------------------------------------------------------------------------------------
# "The trainer": arrays
# ---------------------------------------------------------------------------------------------


def trained_arrays(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Embedding tables float32 [rows, DIM] and dense weights, as a trainer hands them over."""
    rng = np.random.default_rng(seed)
    tables = {t: rng.normal(0.0, 0.5, (rows, DIM)).astype(np.float32) for t, rows in TABLES.items()}
    dense = {k: (rng.normal(0.0, 1.0, s) / np.sqrt(s[-1])).astype(np.float32) for k, s in dense_shapes().items()}
    return tables, dense


def stored_features(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """features/users.npz and features/items.npz (docs/checkpoint.md, "Feature files")."""
    rng = np.random.default_rng(seed + 1)
    history_lengths = rng.integers(0, 6, STORED_USERS).astype(np.int32)
    users = {
        "user_id": np.arange(STORED_USERS, dtype=np.int64),
        "user_history.values": rng.integers(0, TABLES["items"], int(history_lengths.sum())).astype(np.int64),
        "user_history.lengths": history_lengths,
        "user_age": rng.uniform(0.2, 1.4, STORED_USERS).astype(np.float32),
    }
    items = {
        "item_id": np.arange(STORED_ITEMS, dtype=np.int64),
        "item_category.values": rng.integers(0, TABLES["categories"], STORED_ITEMS).astype(np.int64),
        "item_category.lengths": np.ones(STORED_ITEMS, dtype=np.int32),
        "item_ctr": rng.uniform(0.0, 0.2, STORED_ITEMS).astype(np.float32),
    }
    return users, items


def retrained(tables: dict[str, np.ndarray], dense: dict[str, np.ndarray], seed: int = 1):
    """One more training round: some rows of every table change, and every dense weight.
    Returns the new arrays and, per table, the changed row ids (sorted)."""
    rng = np.random.default_rng(seed)
    new_tables, changed = {}, {}
    for t, table in tables.items():
        ids = np.unique(np.concatenate([np.arange(min(10, len(table))), rng.integers(0, len(table), len(table) // 10)]))
        new = table.copy()
        new[ids] = rng.normal(0.0, 0.5, (len(ids), DIM)).astype(np.float32)
        new_tables[t], changed[t] = new, ids.astype(np.int64)
    new_dense = {k: (w * 1.1 + rng.normal(0.0, 0.05, w.shape)).astype(np.float32) for k, w in dense.items()}
    return new_tables, new_dense, changed


# ---------------------------------------------------------------------------------------------
# The writer: numpy + safetensors + json + hashlib (docs/checkpoint.md, "Writing a version by hand")
# ---------------------------------------------------------------------------------------------


def _write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _entry(folder: Path, rel: str) -> dict:
    h = hashlib.sha256()
    with open(folder / rel, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"path": rel, "size_bytes": (folder / rel).stat().st_size, "sha256": h.hexdigest()}


def write_version(root: Path, version: int, parent: int | None, arrays: dict[str, np.ndarray], dense: dict[str, np.ndarray] | None) -> None:
    """Write ``versions/<version>`` below ``root``: a base (``parent`` None: ``arrays`` holds
    ``tables/<t>.npy`` of every table) or a delta (``tables/<t>.ids.npy`` and ``.rows.npy`` of
    the changed tables; ``dense`` None keeps the parent's weights). Staged in a folder readers
    ignore, COMPLETE last, then renamed into place."""
    stage = root / "versions" / f"{version}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "tables").mkdir(parents=True)
    for rel, array in arrays.items():
        _write(stage / rel, lambda f, a=array: np.save(f, a))
    if dense is not None:
        _write(stage / "dense.safetensors", lambda f: f.write(safetensors_bytes(dense)))
    manifest = {
        "format": "shardrec.checkpoint/v1",
        "version": version,
        "kind": "base" if parent is None else "delta",
        "parent": parent,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "model": MODEL,
        "files": [_entry(stage, rel) for rel in sorted([*arrays, *(["dense.safetensors"] if dense is not None else [])])],
    }
    data = json.dumps(manifest, indent=2).encode()
    _write(stage / "manifest.json", lambda f: f.write(data))
    _write(stage / "COMPLETE", lambda f: f.write(hashlib.sha256(data).hexdigest().encode() + b"\n"))  # LAST
    os.rename(stage, root / "versions" / str(version))


def write_checkpoint(root: Path, seed: int = 0) -> None:
    """Version 1 (a base) and the feature files of the trainer's arrays."""
    tables, dense = trained_arrays(seed)
    write_version(root, 1, None, {f"tables/{t}.npy": a for t, a in tables.items()}, dense)
    users, items = stored_features(seed)
    (root / "features").mkdir(exist_ok=True)
    for name, rows in (("users", users), ("items", items)):
        _write(root / "features" / f"{name}.npz", lambda f, r=rows: np.savez(f, **r))


def write_delta(root: Path, seed: int = 0) -> None:
    """Version 2, a delta on 1: the retrained rows and dense weights."""
    tables, dense = trained_arrays(seed)
    new_tables, new_dense, changed = retrained(tables, dense)
    arrays = {}
    for t, ids in changed.items():
        arrays[f"tables/{t}.ids.npy"] = ids  # int64, sorted strictly increasing
        arrays[f"tables/{t}.rows.npy"] = new_tables[t][ids]  # float32 [k, DIM], same order
    write_version(root, 2, 1, arrays, new_dense)


# ---------------------------------------------------------------------------------------------
# The trainer's own forward pass (numpy, float64): what the cluster must serve
# ---------------------------------------------------------------------------------------------


def _mlp(x: np.ndarray, dense: dict[str, np.ndarray], prefix: str, layers: int, relu_last: bool) -> np.ndarray:
    for i in range(layers):
        x = x @ dense[f"{prefix}.{2 * i}.weight"].T.astype(np.float64) + dense[f"{prefix}.{2 * i}.bias"]
        if relu_last or i < layers - 1:
            x = np.maximum(x, 0.0)
    return x


def trainer_scores(tables, dense, users, items, user_id: int, candidates: list[int]) -> np.ndarray:
    """The DLRM of docs/checkpoint.md on the trainer's arrays and stored features."""
    user_row = {int(u): i for i, u in enumerate(users["user_id"])}.get(user_id)
    item_rows = {int(i): k for k, i in enumerate(items["item_id"])}

    def bag(rows_of: dict, name: str, k: int | None) -> list[int]:
        if k is None:
            return []
        start = int(rows_of[f"{name}.lengths"][:k].sum())
        return rows_of[f"{name}.values"][start : start + int(rows_of[f"{name}.lengths"][k])].tolist()

    scores = []
    for item in candidates:
        k = item_rows.get(item)
        values = {"user_id": [user_id], "user_history": bag(users, "user_history", user_row), "item_id": [item],
                  "item_category": bag(items, "item_category", k)}  # fmt: skip
        pooled = []
        for f in SPARSE:
            table = tables[f["table"]].astype(np.float64)
            rows = [v % len(table) if f["mapping"] == "modulo" else v for v in values[f["name"]]]
            if not rows:
                pooled.append(np.zeros(DIM))
            else:
                pooled.append(table[rows].sum(axis=0) / (len(rows) if f["pooling"] == "mean" else 1))
        age = DENSE[0]["default"] if user_row is None else float(users["user_age"][user_row])
        ctr = DENSE[1]["default"] if k is None else float(items["item_ctr"][k])
        x = _mlp(np.array([age, ctr]), dense, "bottom_mlp", len(BOTTOM_MLP), relu_last=True)
        stack = [x, *pooled]
        dots = [stack[i] @ stack[j] for i in range(len(stack)) for j in range(i + 1, len(stack))]
        logit = _mlp(np.concatenate([x, dots]), dense, "top_mlp", len(TOP_MLP), relu_last=False)[0]
        scores.append(1.0 / (1.0 + np.exp(-logit)))
    return np.array(scores)


# ---------------------------------------------------------------------------------------------
# Serving: the shardrec CLI and a Recommend client
# ---------------------------------------------------------------------------------------------

REQUESTS = [  # user id, candidates (item 7 twice: one score, the earlier position ranks first)
    (3, [7, 12, 150, 7, 399, 0, 88]),
    (42, [0, 1, 2, 3, 4, 2]),
    (299, list(range(20, 40))),  # no stored row for this user: defaults
    (-1234567, [5, 6, 391, 398]),  # any int64 user id maps (modulo); items 391, 398 not stored
]


def shardrec(*args: str, cwd: Path) -> str:
    """Run ``shardrec ARGS`` in ``cwd``; its output is echoed; a failure raises."""
    exe = Path(sys.executable).with_name("shardrec")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "services.admin.cli"]
    print(f"$ shardrec {' '.join(args)}", flush=True)
    proc = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"shardrec {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def recommend(address: str, user_id: int, candidates: list[int], want_version: int, timeout_s: float = 60.0) -> dict:
    """One Recommend call answered at ``want_version`` (asked again until the cluster serves it)."""
    import grpc

    from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc  # the client stubs

    request = recommend_pb2.RecommendRequest(user_id=user_id, candidate_item_ids=candidates, top_k=len(candidates))
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = recommend_pb2_grpc.RecommenderStub(channel)
        while True:
            reply = stub.Recommend(request, timeout=10)
            if reply.version == want_version:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster still serves version {reply.version}, not {want_version}, after {timeout_s:.0f}s")
            time.sleep(0.05)  # the shards load the version in the background
    return {"user_id": user_id, "candidates": candidates, "version": reply.version,
            "positions": [it.position for it in reply.items], "scores": [it.score for it in reply.items]}  # fmt: skip


def check(answer: dict, expected: np.ndarray) -> None:
    """Served scores equal the trainer's, best first; a repeated candidate: one score, earlier first."""
    positions, scores = answer["positions"], np.array(answer["scores"])
    assert sorted(positions) == list(range(len(answer["candidates"]))), answer
    np.testing.assert_allclose(scores, expected[positions], rtol=1e-5, atol=1e-6, err_msg=str(answer))
    assert all(a >= b for a, b in zip(scores, scores[1:])), f"not best first: {answer}"
    for rank, (p, s) in enumerate(zip(positions, scores)):
        twins = [q for q, c in enumerate(answer["candidates"]) if c == answer["candidates"][p]]
        assert all(scores[positions.index(q)] == s for q in twins), f"repeated candidate scored twice: {answer}"
        assert positions.index(twins[0]) <= rank, f"a later copy ranked first: {answer}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="where the checkpoint, the cluster and served.json go")
    p.add_argument("--nodes", type=int, default=2, help="shard processes (default 2)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running (stop it with shardrec cluster down)")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "ckpt", ignore_errors=True)

    write_checkpoint(work / "ckpt")  # 1. the checkpoint, by hand
    print(f"wrote version 1 and the feature files to {work / 'ckpt'}", flush=True)
    shardrec("checkpoint", "verify", "--checkpoint", "ckpt", cwd=work)
    # 2. serve it: relative paths are fine, the cluster publishes absolute ones
    shardrec("cluster", "up", "--checkpoint", "ckpt", "--workdir", "cluster", "--nodes", str(args.nodes), cwd=work)
    state = json.loads((work / "cluster" / "cluster.json").read_text())
    served: dict[str, list[dict]] = {}
    try:
        tables, dense = trained_arrays()
        users, items = stored_features()
        for version in (1, 2):
            if version == 2:  # 4. retrain, write the delta, publish it
                write_delta(work / "ckpt")
                tables, dense, _ = retrained(tables, dense)
                shardrec("checkpoint", "publish", "2", "--zk", state["zk"], "--cluster", state["cluster"], cwd=work)
            served[str(version)] = []
            for user, candidates in REQUESTS:  # 3. ask, and check against the trainer
                answer = recommend(state["frontend"], user, candidates, version)
                check(answer, trainer_scores(tables, dense, users, items, user, candidates))
                served[str(version)].append(answer)
                best = answer["positions"][0]
                print(f"version {version}: user {user}: best item {candidates[best]} (position {best}, score {answer['scores'][0]:.6f})")
        (work / "served.json").write_text(json.dumps({"checkpoint": str(work / "ckpt"), "versions": served}, indent=1))
        print(f"OK: every score served at versions 1 and 2 equals the trainer's; see {work / 'served.json'}")
    finally:
        if not args.keep:
            shardrec("cluster", "down", "--workdir", "cluster", cwd=work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
