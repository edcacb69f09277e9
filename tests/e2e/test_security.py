"""A local cluster with TLS, tokens, ZooKeeper ACLs and a password-protected Redis
(``LocalClusterConfig(tls=True, auth=True)``, as ``shardrec cluster up --tls --auth``;
docs/security.md): an authorized Recommend gets the reference's answer over gRPC and over
HTTPS/JSON; no token or a bad one is UNAUTHENTICATED / 401; admin RPCs need the admin token;
Lookup needs a frontend certificate; only the admin's ZooKeeper credentials change the model's
versions and the shard maps; the Redis password comes from a file. One cluster for the module."""

from __future__ import annotations

import http.client
import io
import json
import ssl

import grpc
import pytest
import redis
from google.protobuf import json_format
from kazoo.exceptions import NoAuthError

from services._proto.shardrec.v1 import embedding_pb2, embedding_pb2_grpc, recommend_pb2, recommend_pb2_grpc
from services.core.clients import make_channel, make_kazoo, make_redis
from services.core.config import RedisAuth, ZkConfig, load_zk_auth
from services.core.discovery.records import VersionRecord
from services.core.discovery.zk_paths import ZkPaths
from services.core.hostport import split_host_port
from services.core.tls import client_credentials
from services.localcluster.config import DEFAULT_SPEC, LocalClusterConfig, resolve_spec
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.security import read_token
from tests.support.recommend import check_response, random_requests

UNAUTHENTICATED, DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def secured(tmp_path_factory, small_checkpoint):
    config = LocalClusterConfig(
        workdir=tmp_path_factory.mktemp("secured"), spec=resolve_spec(DEFAULT_SPEC), checkpoint_uri=small_checkpoint,
        nodes=3, cluster="sec", start_timeout_s=180, stop_grace_s=5, tls=True, auth=True,
    )  # fmt: skip
    with SignalGuard() as guard:
        cluster = LocalCluster(config, io.StringIO(), guard, mode="test")
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def tokens(cluster) -> tuple[str, str]:
    return read_token(cluster.state.token_file), read_token(cluster.state.admin_token_file)


def frontend_stub(cluster, cls=recommend_pb2_grpc.RecommenderStub):
    channel = make_channel(cluster.state.frontend, aio=False, credentials=client_credentials(cluster.state.tls_ca))
    return channel, cls(channel)


def https(cluster, method: str, path: str, body: bytes | None = None, token: str | None = None):
    host, port = split_host_port(cluster.state.http)
    ctx = ssl.create_default_context(cafile=cluster.state.tls_ca)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
    try:
        headers = {"content-type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_authorized_recommend_is_the_reference_over_grpc_and_https(secured, small_reference):
    caller, _admin = tokens(secured)
    channel, stub = frontend_stub(secured)
    with channel:
        for req in random_requests(10, seed=14):
            got = stub.Recommend(req, timeout=10, metadata=(("authorization", f"Bearer {caller}"),))
            check_response(small_reference, req, got)  # stored features read from Redis with its password
            status, raw = https(secured, "POST", "/v1/recommend", json_format.MessageToJson(req).encode(), caller)
            assert status == 200, raw
            assert json_format.Parse(raw, recommend_pb2.RecommendResponse()) == got


def test_no_token_or_a_bad_one_is_refused_and_admin_rpcs_need_the_admin_token(secured):
    caller, admin = tokens(secured)
    req = recommend_pb2.RecommendRequest(user_id=3, candidate_item_ids=[1, 2, 3], top_k=2)
    channel, stub = frontend_stub(secured)
    with channel:
        for metadata in ((), (("authorization", "Bearer not-a-token"),), (("authorization", f"Basic {caller}"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Recommend(req, timeout=10, metadata=metadata)
            assert info.value.code() == UNAUTHENTICATED, info.value.details()
        admin_stub = recommend_pb2_grpc.FrontendAdminStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            admin_stub.GetStats(recommend_pb2.GetStatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {caller}"),))
        assert info.value.code() == DENIED
        counters = admin_stub.GetStats(recommend_pb2.GetStatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {admin}"),))
        assert counters.counters["requests_batched"] > 0
    body = json_format.MessageToJson(req).encode()
    assert https(secured, "POST", "/v1/recommend", body)[0] == 401
    assert https(secured, "POST", "/v1/recommend", body, "not-a-token")[0] == 401
    assert https(secured, "GET", "/readyz")[0] == 200
    with make_channel(secured.state.frontend, aio=False) as plaintext:  # a TLS port refuses plaintext
        with pytest.raises(grpc.RpcError) as info:
            recommend_pb2_grpc.RecommenderStub(plaintext).Recommend(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_load_harness_drives_a_secured_frontend_and_reads_its_counters(secured, tmp_path):
    """``bench run`` against a ``cluster up --tls --auth`` workdir: the caller token for
    Recommend, the admin token for the counters (CounterMeter), the cluster's CA."""
    import asyncio

    from benchmarks.drive import DriveConfig, cluster_target, drive
    from benchmarks.harness import CounterMeter, OpenLoop, run_recommender

    target = cluster_target(secured.config.workdir)
    assert target["token"] and target["admin_token"] and target["tls_ca"]
    doc = drive(DriveConfig(**target, preset="small", rate_rps=20.0, duration_s=0.5, warmup_s=0.2, out_dir=tmp_path), io.StringIO())
    assert doc["systems"][0]["runs"][0]["counters_delta"]["requests_batched"] > 0

    REQUESTS = random_requests(5, 3)  # noqa: N806

    async def without_admin_token():
        counters = CounterMeter(target["address"], token=target["token"], tls_ca=target["tls_ca"])  # a caller's token
        with pytest.raises(grpc.RpcError) as info:
            await run_recommender(target["address"], lambda i: REQUESTS[i % 5], OpenLoop(20.0, 0.2), meters=[counters],
                                  token=target["token"], tls_ca=target["tls_ca"])  # fmt: skip
        return info.value.code()

    assert asyncio.run(without_admin_token()) == DENIED


def test_lookup_needs_a_frontend_certificate(secured):
    pki = secured.security.pki
    shard = next(p.address for p in secured.state.processes if p.name == "shard-0")
    lookup = embedding_pb2.LookupRequest()

    def call(credentials):
        with make_channel(shard, aio=False, credentials=credentials) as ch:
            return embedding_pb2_grpc.EmbeddingShardStub(ch).Lookup(lookup, timeout=10)

    with pytest.raises(grpc.RpcError) as info:
        call(client_credentials(str(pki.ca)))  # no client certificate: the handshake fails
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for role in ("shard", "admin", "client"):  # the cluster's CA, not a frontend's name
        f = pki.files(role)
        with pytest.raises(grpc.RpcError) as info:
            call(client_credentials(str(f.ca), str(f.cert), str(f.key)))
        assert info.value.code() == DENIED and "only frontends" in info.value.details(), role
    f = pki.files("frontend")
    assert call(client_credentials(str(f.ca), str(f.cert), str(f.key))).results == []


@pytest.mark.parametrize("who", ["nobody", "shard-0", "frontend"])
def test_only_the_admin_changes_versions_and_shard_maps(secured, who):
    paths = ZkPaths(secured.config.cluster)
    auth = None if who == "nobody" else load_zk_auth(str(secured.security.secrets.zk_auth_file(who)))
    zk = make_kazoo(ZkConfig(hosts=secured.state.zk, cluster=paths.cluster, auth=auth))
    try:
        forged = VersionRecord(99).to_bytes()
        for path in (paths.target_version, paths.shardmap_active, paths.model_checkpoint):
            with pytest.raises(NoAuthError):
                zk.set(path, forged)
        with pytest.raises(NoAuthError):
            zk.create(paths.shardmap_target, forged)
        if who == "nobody":
            with pytest.raises(NoAuthError):
                zk.get(paths.shardmap_active)
        else:
            assert json.loads(zk.get(paths.target_version)[0]) == json.loads(VersionRecord(1).to_bytes())
            with pytest.raises(NoAuthError):  # another process's member znode
                zk.set(paths.node("shard-1"), b"{}")
    finally:
        zk.stop()
        zk.close()
    admin = make_kazoo(ZkConfig(hosts=secured.state.zk, cluster=paths.cluster, auth=load_zk_auth(secured.state.zk_auth)))
    try:
        data, stat = admin.get(paths.target_version)
        admin.set(paths.target_version, data, version=stat.version)  # the admin may (same value: nothing moves)
    finally:
        admin.stop()
        admin.close()


def test_a_restarted_process_probes_the_holder_of_its_znode_over_tls(secured):
    """The takeover probe (``core.rpc.probe``) of a live shard's znode dials its TLS port with
    the prober's certificate and finds it answering as itself, so its znode is not taken; in
    plaintext the TLS port would not answer and a live holder would be taken over."""
    from services.core.config import TlsConfig
    from services.core.discovery.records import NodeRecord
    from services.core.rpc.probe import holder_probe
    from services.core.tls import TlsMaterial

    paths = ZkPaths(secured.config.cluster)
    zk = make_kazoo(ZkConfig(hosts=secured.state.zk, cluster=paths.cluster, auth=load_zk_auth(secured.state.zk_auth)))
    try:
        data, _ = zk.get(paths.node("shard-0"))
    finally:
        zk.stop()
        zk.close()
    f = secured.security.pki.files("shard")
    tls = TlsMaterial(TlsConfig(str(f.cert), str(f.key), str(f.ca)))
    assert NodeRecord.from_bytes(data).instance_id
    assert holder_probe(NodeRecord.from_bytes, tls=tls)(data)
    assert not holder_probe(NodeRecord.from_bytes)(data)


def test_redis_needs_the_password_from_its_file(secured):
    with pytest.raises(redis.exceptions.AuthenticationError):
        make_redis(secured.state.redis_url, timeout_s=5).ping()
    password = read_token(secured.security.secrets.redis_password_file)
    client = make_redis(secured.state.redis_url, timeout_s=5, auth=RedisAuth(password))
    try:
        assert client.ping() and client.dbsize() > 0  # the features, loaded with the password from the file
    finally:
        client.close()


def _served_certificate(address: str, ctx: ssl.SSLContext) -> bytes:
    """The DER certificate a TLS port serves to a new connection."""
    import socket

    host, port = split_host_port(address)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True)


def _der(pem_path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(open(pem_path).read())


def test_tokens_and_certificates_rotate_under_load_without_a_failed_request(secured):
    """Runs last: it replaces the caller token and the frontend's and shards' certificates."""
    import threading

    from services.core.auth import new_token, render_tokens
    from services.localcluster.security import write_secret
    from tests.support.waiting import wait_for

    secrets, pki = secured.security.secrets, secured.security.pki
    old, admin = tokens(secured)
    new = new_token()
    current = [old]
    stop, done, errors = threading.Event(), [0], []
    requests = random_requests(20, seed=21)

    def client():
        channel, stub = frontend_stub(secured)
        with channel:
            i = 0
            while not stop.is_set():
                try:
                    stub.Recommend(requests[i % len(requests)], timeout=10, metadata=(("authorization", f"Bearer {current[0]}"),))
                    done[0] += 1
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                i += 1

    def accepted(token: str) -> bool:
        channel, stub = frontend_stub(secured)
        with channel:
            try:
                stub.Recommend(requests[0], timeout=10, metadata=(("authorization", f"Bearer {token}"),))
                return True
            except grpc.RpcError as e:
                assert e.code() == UNAUTHENTICATED, e.details()
                return False

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 10, 30, "requests to flow")
        # tokens: add the new one, move the callers to it, then remove the old one
        write_secret(secrets.tokens_file, render_tokens([(old, "demo", False), (new, "demo", False), (admin, "admin", True)]))
        wait_for(lambda: accepted(new), 30, "the frontend to accept the new token")
        current[0] = new
        write_secret(secrets.tokens_file, render_tokens([(new, "demo", False), (admin, "admin", True)]))
        wait_for(lambda: not accepted(old), 30, "the frontend to refuse the old token")
        write_secret(secrets.caller_token_file, new + "\n")
        # certificates: new keys and certificates for the frontend and the shards (same CA)
        n = done[0]
        fe, shard = pki.renew("frontend"), pki.renew("shard")
        trust = ssl.create_default_context(cafile=str(pki.ca))
        wait_for(lambda: _served_certificate(secured.state.frontend, trust) == _der(fe.cert), 30, "the new frontend certificate (gRPC)")
        wait_for(lambda: _served_certificate(secured.state.http, ssl.create_default_context(cafile=str(pki.ca))) == _der(fe.cert),
                 30, "the new frontend certificate (HTTPS)")  # fmt: skip
        mtls = ssl.create_default_context(cafile=str(pki.ca))
        mtls.load_cert_chain(str(fe.cert), str(fe.key))
        shard_address = next(p.address for p in secured.state.processes if p.name == "shard-0")
        wait_for(lambda: _served_certificate(shard_address, mtls) == _der(shard.cert), 30, "the new shard certificate")
        wait_for(lambda: done[0] >= n + 20, 30, "requests served after the rotation")
        assert accepted(new)  # a new connection, on the new certificates end to end
        log = secured.config.logs_dir / "frontend.log"
        wait_for(lambda: "new shard channels" in log.read_text(), 30, "the frontend to renew its shard channels")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert done[0] > 0
