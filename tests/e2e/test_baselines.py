"""The comparison baselines end to end: a real frontend process with ``--lookup inproc`` (the
monolith), ``--lookup redis-kv`` (rows loaded into the real Redis with ``shardrec bench load-kv``)
and, where torchrec is installed, ``--lookup torchrec``; stored features in Redis loaded with
``shardrec features load``; concurrent Recommend calls checked against the reference path."""

from __future__ import annotations

import asyncio
import importlib.util
import uuid

import pytest

from tests.e2e.test_recommend import check_response, random_requests, send_all, stats
from tests.support.cluster import LENIENT_ADMISSION
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

REQUESTS = 30
CONCURRENCY = 16
LOOKUPS = ("inproc", "redis-kv", "torchrec")


@pytest.fixture(scope="module")
def checkpoint(small_checkpoint):
    return small_checkpoint


@pytest.fixture(scope="module")
def reference(small_reference):
    return small_reference


@pytest.fixture(scope="module")
def features(redis_server, checkpoint):
    """The checkpoint's stored features and its embedding rows (``bench load-kv``) in the real
    Redis under module prefixes; the rows are deleted at the end."""
    from services.control.features import load_features
    from services.core.clients import make_redis
    from services.frontend.lookup.baselines.redis_kv_store import load_rows_into_redis

    uid = uuid.uuid4().hex[:8]
    prefix, kv_prefix = f"t:{uid}:", f"kv{uid}:"
    load_features(checkpoint, redis_server.url, prefix=prefix)
    load_rows_into_redis(checkpoint, redis_server.url, kv_prefix)
    yield redis_server.url, prefix, kv_prefix
    client = make_redis(redis_server.url)
    try:
        keys = list(client.scan_iter(match=kv_prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module", params=LOOKUPS)
def served(request, tmp_path_factory, checkpoint, features):
    """One frontend process with the baseline's lookup step, and its address."""
    if request.param == "torchrec" and importlib.util.find_spec("torchrec") is None:
        from services.core.torchrec_pooling import INSTALL_HINT

        pytest.skip(INSTALL_HINT)
    url, prefix, kv_prefix = features
    spawn = ProcessFactory(tmp_path_factory.mktemp(f"logs-{request.param}"))
    try:
        fe = spawn(
            "frontend", "serve", "--lookup", request.param, "--checkpoint", checkpoint, "--redis", url,
            "--redis-prefix", prefix, "--kv-prefix", kv_prefix, "--max-wait-ms", "5", "--default-timeout-ms", "5000", *LENIENT_ADMISSION,
            name=f"frontend-{request.param}",
        )
        line = wait_for(lambda: next((ln for ln in fe.log_text().splitlines() if ln.startswith("READY frontend")), None), 90, "the frontend to be ready")
        yield request.param, line.split()[2]
    finally:
        spawn.close()


def test_concurrent_requests_match_reference(served, reference):
    name, address = served
    requests = random_requests(REQUESTS, seed=100 + len(name))
    before = stats(address)
    responses = asyncio.run(send_all(address, requests, CONCURRENCY))
    for req, resp in zip(requests, responses, strict=True):
        check_response(reference, req, resp)
        assert resp.version == 1
    after = stats(address)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["requests_batched"] == REQUESTS
    assert delta["multi_request_batches"] > 0, f"no request shared a batch: {delta}"
    if name == "redis-kv":
        # one pipelined MGET round trip per batch; every fetched row's key and bytes counted
        assert delta["lookup_rpcs"] == delta["batches"], delta
        assert delta["wire_bytes_user"] > 0 and delta["wire_bytes_item"] > delta["wire_bytes_user"], delta
    else:
        assert delta["lookup_rpcs"] == 0 and not delta.get("wire_bytes_user") and not delta.get("wire_bytes_item"), delta
