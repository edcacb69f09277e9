"""CPU per Recommend on two local clusters side by side (small preset, 3 shards): TLS and tokens
on versus off over gRPC, and REST/JSON versus gRPC with both off; median of 3 interleaved runs.
Run: .venv/bin/python benchmarks/security_overhead.py [REQUESTS_PER_RUN]. Numbers: docs/security.md."""

import http.client
import io
import json
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import psutil  # noqa: E402
from google.protobuf import json_format
from services._proto.shardrec.v1 import recommend_pb2_grpc
from services.core.clients import make_channel
from services.core.tls import client_credentials
from services.core.hostport import split_host_port
from services.localcluster.config import LocalClusterConfig, resolve_spec, DEFAULT_SPEC
from services.localcluster.launcher import LocalCluster
from services.localcluster.processes import SignalGuard
from services.localcluster.security import read_token
from services._proto.shardrec.v1 import recommend_pb2  # noqa: E402

N, CONC = int(sys.argv[1]) if len(sys.argv) > 1 else 400, 4
REQS = [recommend_pb2.RecommendRequest(request_id=f"r{i}", user_id=(7 * i) % 2000, candidate_item_ids=[(13 * i + j) % 5000 for j in range(50)],
                                        top_k=10) for i in range(50)]  # fmt: skip

def procs(cluster):
    return [psutil.Process(p.pid) for p in cluster.state.processes if p.role in ("shard", "frontend")]

def cpu(ps):
    return sum(sum(p.cpu_times()[:2]) for p in ps)

def grpc_run(cluster):
    st = cluster.state
    creds = client_credentials(st.tls_ca) if st.tls_ca else None
    md = (("authorization", f"Bearer {read_token(st.token_file)}"),) if st.token_file else None
    def worker(k, out):
        with make_channel(st.frontend, aio=False, credentials=creds) as ch:
            stub = recommend_pb2_grpc.RecommenderStub(ch)
            stub.Recommend(REQS[0], timeout=10, metadata=md)
            out.append(None); barrier.wait()
            for i in range(k, N, CONC):
                stub.Recommend(REQS[i % len(REQS)], timeout=10, metadata=md)
    return measure(cluster, worker)

def rest_run(cluster):
    st = cluster.state
    host, port = split_host_port(st.http)
    bodies = [json_format.MessageToJson(r).encode() for r in REQS]
    def worker(k, out):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        def one(b):
            conn.request("POST", "/v1/recommend", body=b, headers={"content-type": "application/json"})
            r = conn.getresponse(); r.read(); assert r.status == 200
        one(bodies[0]); out.append(None); barrier.wait()
        for i in range(k, N, CONC):
            one(bodies[i % len(bodies)])
        conn.close()
    return measure(cluster, worker)

barrier = None
def measure(cluster, worker):
    global barrier
    barrier = threading.Barrier(CONC + 1)
    ps = procs(cluster); out = []
    ts = [threading.Thread(target=worker, args=(k, out)) for k in range(CONC)]
    for t in ts: t.start()
    barrier.wait(); c0 = cpu(ps); t0 = time.perf_counter()
    for t in ts: t.join()
    return (cpu(ps) - c0) / N * 1e6, N / (time.perf_counter() - t0)

def config(name, secure):
    return LocalClusterConfig(workdir=pathlib.Path(f"var/security-overhead/{name}").resolve(), spec=resolve_spec(DEFAULT_SPEC), preset="small",
                              nodes=3, cluster=name, tls=secure, auth=secure, stop_grace_s=5)
res = {"off_grpc": [], "on_grpc": [], "off_rest": []}
with SignalGuard() as guard:
    a = LocalCluster(config("plain", False), io.StringIO(), guard, mode="bench")
    b = LocalCluster(config("secure", True), io.StringIO(), guard, mode="bench")
    try:
        a.start(); b.start()
        grpc_run(a); grpc_run(b); rest_run(a)  # warm-up
        for r in range(3):
            res["off_grpc"].append(grpc_run(a)); res["on_grpc"].append(grpc_run(b)); res["off_rest"].append(rest_run(a))
            print(r, {k: v[-1] for k, v in res.items()}, flush=True)
    finally:
        a.stop(); b.stop()
med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
print(json.dumps({"runs": res, "median_cpu_us_per_request": med,
                  "tls_tokens_on_vs_off": med["on_grpc"] / med["off_grpc"], "rest_vs_grpc": med["off_rest"] / med["off_grpc"]}, indent=1))
