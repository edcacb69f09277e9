"""The REST/JSON endpoint of a real frontend process (the monolith lookup over the small model,
features in the real Redis): the same answers as gRPC and the reference path, errors as HTTP
codes with Google's JSON body, health, readiness, the OpenAPI document, and receive caps."""

from __future__ import annotations

import http.client
import json
import pathlib
import uuid

import grpc
import pytest
from google.protobuf import json_format

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.hostport import split_host_port
from services.core.rpc.errors import details_of
from tests.support.processes import ProcessFactory
from tests.support.recommend import check_response, random_requests
from tests.support.waiting import wait_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def frontend(redis_server, small_checkpoint, tmp_path_factory):
    """(gRPC address, HTTP address) of an inproc frontend with http_port 0, its settings from
    flags, environment variables and a --config file alike (docs/configuration.md)."""
    from services.control.features import load_features

    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    load_features(small_checkpoint, redis_server.url, prefix=prefix)
    root = tmp_path_factory.mktemp("rest")
    limits = root / "callers.toml"
    limits.write_text("[callers.limited]\nrate_rps = 0.01\nburst = 1\n")
    settings = root / "frontend.toml"
    settings.write_text(f'max_wait_ms = 50\ndefault_timeout_ms = 5000\n[frontend]\nhttp_port = 0\ncaller_limits = "{limits}"\n')
    env = {"SHARDREC_REDIS_PREFIX": prefix, "SHARDREC_CONFIG": str(settings)}
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs-rest"))
    try:
        fe = spawn("frontend", "serve", "--inproc", "--checkpoint", small_checkpoint, "--redis", redis_server.url,
                   "--max-wait-ms", "5", name="frontend", env=env)  # fmt: skip
        lines = wait_for(lambda: (t := fe.log_text()) and "READY frontend" in t and t.splitlines(), 90, "the frontend")
        grpc_addr = next(ln.split()[2] for ln in lines if ln.startswith("READY frontend"))
        http_addr = next(ln.split()[2] for ln in lines if ln.startswith("HTTP frontend"))
        yield grpc_addr, http_addr
    finally:
        spawn.close()


def call(http_addr: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = split_host_port(http_addr)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def test_rest_answers_equal_grpc_and_the_reference(frontend, small_reference):
    grpc_addr, http_addr = frontend
    with grpc.insecure_channel(grpc_addr) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        for req in random_requests(12, seed=5):
            status, _, raw = call(http_addr, "POST", "/v1/recommend", json_format.MessageToJson(req).encode())
            assert status == 200, raw
            got = json_format.Parse(raw, recommend_pb2.RecommendResponse())
            check_response(small_reference, req, got)
            assert got == stub.Recommend(req, timeout=10)


def test_errors_are_http_codes_with_the_grpc_details(frontend):
    grpc_addr, http_addr = frontend
    status, _, raw = call(http_addr, "POST", "/v1/recommend", b'{"userId": 3, "candidateItemIds": [1, 2], "topK": 5}')
    err = json.loads(raw)["error"]
    assert (status, err["code"], err["status"]) == (400, 400, "INVALID_ARGUMENT")
    assert err["details"][0]["fieldViolations"][0]["field"] == "top_k"
    status, _, raw = call(http_addr, "POST", "/v1/recommend", b"{not json")
    assert status == 400 and "malformed RecommendRequest JSON" in json.loads(raw)["error"]["message"]
    ok = b'{"userId": 3, "candidateItemIds": [1, 2], "topK": 1}'
    assert call(http_addr, "POST", "/v1/recommend", ok, {"X-Shardrec-Caller": "limited"})[0] == 200
    status, headers, raw = call(http_addr, "POST", "/v1/recommend", ok, {"X-Shardrec-Caller": "limited"})
    err = json.loads(raw)["error"]
    assert (status, err["status"]) == (429, "RESOURCE_EXHAUSTED") and int(headers["Retry-After"]) >= 1
    assert err["details"][0]["@type"].endswith("google.rpc.RetryInfo")
    assert call(http_addr, "POST", "/v1/recommend", ok, {"X-Shardrec-Timeout-Ms": "-1"})[0] == 400
    big = b'{"candidateItemIds": [' + b"1, " * (2 << 20) + b"1]}"
    assert call(http_addr, "POST", "/v1/recommend", big)[0] == 413
    # gRPC: the same field violation in grpc-status-details-bin, and the same 4 MiB receive cap
    with grpc.insecure_channel(grpc_addr) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(recommend_pb2.RecommendRequest(user_id=3, candidate_item_ids=[1, 2], top_k=5), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for d in details_of(info.value) for v in d.field_violations] == ["top_k"]
        huge = recommend_pb2.RecommendRequest(request_id="x" * (5 << 20))
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(huge, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_readiness_and_the_openapi_document(frontend):
    _, http_addr = frontend
    assert call(http_addr, "GET", "/healthz")[0] == 200
    status, _, raw = call(http_addr, "GET", "/readyz")
    assert (status, json.loads(raw)) == (200, {"status": "SERVING"})
    status, _, raw = call(http_addr, "GET", "/openapi.json")
    assert status == 200 and raw == (ROOT / "docs" / "openapi.json").read_bytes()
