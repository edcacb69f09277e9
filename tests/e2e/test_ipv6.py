"""A cluster on IPv6 loopback: shards bind ``::`` or ``::1`` and advertise ``[::1]:port`` in
ZooKeeper, the frontend dials them and serves Recommend on ``[::1]`` over gRPC and HTTP, with the
reference path's answers."""

from __future__ import annotations

import http.client
import socket
import uuid

import grpc
import pytest
from google.protobuf import json_format

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from services.core.hostport import split_host_port
from tests.support.cluster import start_cluster, start_frontend, zk_namespace
from tests.support.processes import ProcessFactory
from tests.support.recommend import check_response, random_requests
from tests.support.waiting import wait_for

SPEC = {"default": {"sharding": "table_wise"},
        "tables": {"items": {"sharding": "row_wise", "partitions": 2, "replicas": 1}}}  # fmt: skip


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_cluster_on_ipv6_loopback_serves_recommend(zk_server, redis_server, small_checkpoint, small_reference, tmp_path):
    from services.control.features import load_features

    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    load_features(small_checkpoint, redis_server.url, prefix=prefix)
    zk_server.ensure_running()
    spawn = ProcessFactory(tmp_path / "logs")
    with zk_namespace(zk_server.hosts, "v6-") as (zk, paths):
        try:
            cluster = start_cluster(zk, paths, spawn, zk_server.hosts, small_checkpoint, SPEC, 2,
                                    "--host", "::", "--advertise-host", "::1")  # fmt: skip
            assert all(a.startswith("[::1]:") for a in cluster.addresses.values()), cluster.addresses
            grpc_addr = start_frontend(spawn, zk_server.hosts, paths.cluster, redis_server.url, prefix,
                                       "--host", "::1", "--http-port", "0")  # fmt: skip
            assert grpc_addr.startswith("[::1]:")
            fe = next(p for p in spawn.processes if p.name == "frontend")
            http_addr = wait_for(lambda: next((ln.split()[2] for ln in fe.log_text().splitlines() if ln.startswith("HTTP frontend")), None),
                                 10, "the HTTP address")  # fmt: skip
            host, port = split_host_port(http_addr)
            with grpc.insecure_channel(grpc_addr) as ch:
                stub = recommend_pb2_grpc.RecommenderStub(ch)
                for req in random_requests(8, seed=6):
                    got = stub.Recommend(req, timeout=10)
                    check_response(small_reference, req, got)
                    conn = http.client.HTTPConnection(host, port, timeout=10)
                    conn.request("POST", "/v1/recommend", body=json_format.MessageToJson(req).encode())
                    r = conn.getresponse()
                    assert r.status == 200 and json_format.Parse(r.read(), recommend_pb2.RecommendResponse()) == got
                    conn.close()
        finally:
            spawn.close()
