"""The demo's side of a local cluster: sample Recommend requests, how a response is printed,
and how to call and stop a running cluster (docs/local-cluster.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from services.core.types import FeatureSide, FeatureSource
from services.localcluster.console import Progress
from services.localcluster.state import ClusterState

if TYPE_CHECKING:
    from services.core.checkpoint.manifest import ModelSpec

NUM_CANDIDATES = 100
TOP_K = 10
REQUEST_TIMEOUT_S = 30.0
# Ids drawn on a side whose model neither maps ids to a table nor stores any entity.
ANY_IDS = 1000


@dataclass(frozen=True)
class SampleRequest:
    user_id: int
    candidate_item_ids: tuple[int, ...]


def sample_requests(num_users: int, num_items: int, n: int, seed: int, num_candidates: int = NUM_CANDIDATES) -> list[SampleRequest]:
    """``n`` requests for the demo: a power-law user id in ``[0, num_users)`` and
    ``min(num_candidates, num_items)`` distinct candidate items drawn from the model's item
    distribution (``services.core.synth.power_law_ids``: low ids are hot), in draw order.
    Deterministic per seed."""
    import numpy as np

    from services.core.synth import power_law_ids

    rng = np.random.default_rng(seed)
    want = min(num_candidates, num_items)
    out = []
    for _ in range(n):
        user = int(power_law_ids(rng, 1, num_users)[0])
        chosen: dict[int, None] = {}
        for _attempt in range(64):
            for item in power_law_ids(rng, 4 * want, num_items).tolist():
                chosen.setdefault(item)
                if len(chosen) == want:
                    break
            if len(chosen) == want:
                break
        for item in range(num_items):  # a tiny table: fill with the remaining ids, in order
            if len(chosen) == want:
                break
            chosen.setdefault(item)
        out.append(SampleRequest(user, tuple(chosen)))
    return out


def entity_ids(spec: "ModelSpec", side: FeatureSide, features: Path | str | None) -> Sequence[int]:
    """The ids sample requests draw from on ``side`` (index k is the k-th hottest): the rows of
    the table the side's entity-id feature reads (``range(rows)``: every such id maps, whatever
    the model calls its tables); without one, the ids of the side's stored feature rows below
    ``features``; without those, ``range(ANY_IDS)`` (the model accepts any id there)."""
    entity = next((f for f in spec.sparse_features if f.side is side and f.source is FeatureSource.ENTITY_ID), None)
    if entity is not None:
        return range(spec.table(entity.table).rows)
    if features is not None:
        import numpy as np

        from services.core.checkpoint.storage import CheckpointStore
        from services.core.synth import feature_file, load_feature_rows

        store = CheckpointStore(features)
        if store.exists(feature_file(side)):
            ids = np.unique(load_feature_rows(store, side)[f"{side.value}_id"])
            if len(ids):
                return ids.tolist()
    return range(ANY_IDS)


def model_requests(spec: "ModelSpec", features: Path | str | None, n: int, seed: int) -> list[SampleRequest]:
    """``sample_requests`` over the ids of any model (``entity_ids`` of each side)."""
    users, items = (entity_ids(spec, side, features) for side in (FeatureSide.USER, FeatureSide.ITEM))
    return [
        SampleRequest(int(users[r.user_id]), tuple(int(items[i]) for i in r.candidate_item_ids))
        for r in sample_requests(len(users), len(items), n, seed)
    ]


def format_response(
    index: int,
    total: int,
    request: SampleRequest,
    items: Sequence[tuple[int, float]],
    latency_ms: float,
    version: int,
    shard_map_version: int,
) -> str:
    """A served request, readably: who, how many candidates, latency, versions, then the
    ranked items one per line. Pure."""
    lines = [
        f"request {index}/{total}: user {request.user_id}, {len(request.candidate_item_ids)} candidates"
        f" -> top {len(items)} in {latency_ms:.1f} ms (version {version}, shard map {shard_map_version})"
    ]
    width = max((len(str(item)) for item, _ in items), default=1)
    for rank, (item, score) in enumerate(items, 1):
        lines.append(f"  {rank:>3}. item {item:>{width}}  score {score:.4f}")
    return "\n".join(lines)


def send_sample_requests(
    frontend: str, checkpoint: Path | str, n: int, seed: int, progress: Progress, *, features: Path | str | None = None,
    tls_ca: str = "", token_file: str = "",
) -> int:
    """Send ``n`` Recommend calls (power-law users, up to ``NUM_CANDIDATES`` candidates each,
    drawn from the model at ``checkpoint`` by ``model_requests``, with stored ids below
    ``features``, default the checkpoint's) to the frontend at ``frontend`` and print each
    response on ``progress``; over TLS trusting ``tls_ca`` and with the token of
    ``token_file`` when given. Returns the number of failed calls."""
    if n <= 0:
        return 0
    import grpc

    from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
    from services.core.checkpoint.reader import CheckpointReader
    from services.core.clients import make_channel

    reader = CheckpointReader(str(checkpoint))
    model = reader.manifest(reader.latest_version()).model
    requests = model_requests(model, checkpoint if features is None else features, n, seed)
    failures = 0
    progress.line()
    from services.core.tls import client_credentials

    metadata = ()
    if token_file:
        from services.localcluster.security import read_token

        metadata = (("authorization", f"Bearer {read_token(token_file)}"),)
    credentials = client_credentials(tls_ca) if tls_ca else None
    with make_channel(frontend, aio=False, credentials=credentials) as channel:
        stub = recommend_pb2_grpc.RecommenderStub(channel)
        for i, req in enumerate(requests, 1):
            msg = recommend_pb2.RecommendRequest(
                request_id=f"demo-{i}",
                user_id=req.user_id,
                candidate_item_ids=list(req.candidate_item_ids),
                top_k=min(TOP_K, len(req.candidate_item_ids)),
            )
            t0 = time.perf_counter()
            try:
                reply = stub.Recommend(msg, timeout=REQUEST_TIMEOUT_S, metadata=metadata)
            except grpc.RpcError as e:
                failures += 1
                progress.line(f"request {i}/{n}: user {req.user_id}: FAILED {e.code().name}: {e.details()}")
                continue
            latency_ms = (time.perf_counter() - t0) * 1000
            items = [(int(s.item_id), float(s.score)) for s in reply.items]
            progress.line(
                format_response(i, n, req, items, latency_ms, int(reply.version), int(reply.shard_map_version))
            )
    progress.line()
    return failures


def call_instructions(state: ClusterState, workdir_arg: str) -> str:
    """How to call a running cluster and stop it (printed by ``cluster up`` and ``status``)."""
    lines = []
    if state.frontend:
        addr = state.frontend
        flags = f"-cacert {state.tls_ca}" if state.tls_ca else "-plaintext"
        if state.token_file:  # reflection needs the admin token: give grpcurl the proto
            flags += f" -H \"authorization: Bearer $(cat {state.token_file})\" -import-path protos -proto shardrec/v1/recommend.proto"
        lines += [
            f"Recommender at {addr} (cluster {state.cluster!r}, ZooKeeper {state.zk}, Redis {state.redis_url})",
            "",
            "call it with grpcurl:",
            f"  grpcurl {flags} \\",
            f"    -d '{{\"user_id\": 42, \"candidate_item_ids\": [1, 2, 3, 5, 8, 13, 21], \"top_k\": 5}}' \\",
            f"    {addr} shardrec.v1.Recommender/Recommend",
            "",
        ]
        if not (state.tls_ca or state.token_file):
            lines += [
                "or from Python (.venv/bin/python in the repository):",
                "  import grpc",
                "  from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc",
                f"  stub = recommend_pb2_grpc.RecommenderStub(grpc.insecure_channel(\"{addr}\"))",
                "  reply = stub.Recommend(recommend_pb2.RecommendRequest(user_id=42, candidate_item_ids=range(100), top_k=10), timeout=5)",
                "  print([(i.item_id, round(i.score, 4)) for i in reply.items], reply.version, reply.shard_map_version)",
                "",
            ]
        if state.http:
            scheme = "https" if state.tls_ca else "http"
            curl = f"--cacert {state.tls_ca} " if state.tls_ca else ""
            curl += f"-H \"Authorization: Bearer $(cat {state.token_file})\" " if state.token_file else ""
            lines += [
                f"or over HTTP/JSON (docs/http.md; the OpenAPI document is at {scheme}://{state.http}/openapi.json):",
                f"  curl -s {curl}-X POST {scheme}://{state.http}/v1/recommend \\",
                "    -d '{\"userId\": 42, \"candidateItemIds\": [1, 2, 3, 5, 8, 13, 21], \"topK\": 5}'",
                "",
            ]
    else:
        lines += [f"cluster {state.cluster!r} without a frontend: ZooKeeper {state.zk}, Redis {state.redis_url} (prefix {state.redis_prefix!r})", ""]
    scraped = [p for p in state.processes if p.metrics]
    if state.prometheus:
        lines += [f"Prometheus at {state.prometheus} (scraping {len(scraped)} processes; alert rules from deploy/prometheus/alerts.yml)", ""]
    elif scraped:
        lines += [f"metrics: {', '.join(f'{p.name} http://{a}/metrics' for p in scraped for a in p.metrics_endpoints)}", ""]
    lines += [
        f"watch:   shardrec cluster top --workdir {workdir_arg}",
        f"inspect: shardrec cluster status --workdir {workdir_arg}",
        f"         shardrec placement show --zk {state.zk} --cluster {state.cluster}",
        f"logs:    {Path(state.workdir) / 'logs'}/",
        f"stop:    shardrec cluster down --workdir {workdir_arg}",
    ]
    return "\n".join(lines)
