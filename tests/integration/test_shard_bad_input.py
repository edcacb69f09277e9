"""Bad input against a real shard process over real gRPC (docs/overload.md, "Shard Lookup
limits"): every bad Lookup gets its documented status and message while good requests keep
flowing, and the shard's RSS stays flat across rounds of them.

The shard runs with small caps (ids, bags, message bytes) so that the largest legal Lookup,
which the warm-up sends, is cheap on a shared machine; the refusals are the same at any size.
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import psutil
import pytest

from services._proto.shardrec.v1 import embedding_pb2, tensor_pb2
from services.core import wire
from services.core.rpc.server import channel_options
from services.core.types import PoolingType
from services.embedding_shard.limits import MAX_GROUPS, DeclaredGroup, response_bytes
from tests.integration.test_shard import request
from tests.support.cluster import start_cluster, zk_namespace
from tests.support.processes import ProcessFactory
from tests.support.waiting import wait_for

MAX_IDS, MAX_BAGS, MAX_MESSAGE = 200_000, 400_000, 24 << 20
SPEC = {
    "default": {"sharding": "replicated", "replicas": "all"},
    "tables": {"users": {"sharding": "row_wise", "partitions": 2, "replicas": 1}},
}
IA, FP, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED
SUM = PoolingType.SUM
ROUNDS = 3


@pytest.fixture(scope="module")
def env(zk_server, tmp_path_factory, small_checkpoint):
    """Two shard nodes (users row-wise over both, every other table on both) with small caps."""
    zk_server.ensure_running()
    spawn = ProcessFactory(tmp_path_factory.mktemp("logs"))
    with zk_namespace(zk_server.hosts) as (zk, paths):
        try:
            yield start_cluster(
                zk, paths, spawn, zk_server.hosts, small_checkpoint, SPEC, 2,
                "--max-ids", str(MAX_IDS), "--max-bags", str(MAX_BAGS), "--max-message-bytes", str(MAX_MESSAGE),
            )
        finally:
            spawn.close()


def _calls(address: str):
    """(channel, raw Lookup, raw Describe): bytes in, bytes out, nothing parsed client-side."""
    ch = grpc.insecure_channel(address, options=channel_options(4 * MAX_MESSAGE))
    lookup = ch.unary_unary("/shardrec.v1.EmbeddingShard/Lookup")
    describe = ch.unary_unary("/shardrec.v1.EmbeddingShard/Describe")
    return ch, lookup, describe


def _empty_bags(table: str, bags: int, **kw) -> embedding_pb2.LookupRequest:
    return request([(table, 0, SUM, np.empty(0, np.int64), np.zeros(bags, np.int32), None)], **kw)


def _declared_only(ids_dims: list[int], bags_dims: list[int] = [0]) -> embedding_pb2.LookupRequest:  # noqa: B006 - read only
    """One ``users`` group whose ids and lengths declare these dims and carry no data: the
    shapes alone must refuse it."""
    req = embedding_pb2.LookupRequest()
    g = req.groups.add(table="users", partition=0, pooling=embedding_pb2.POOLING_SUM)
    g.ids.dtype, g.lengths.dtype = tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_INT32
    for d in ids_dims:
        g.ids.dims.add(size=d)
    for d in bags_dims:
        g.lengths.dims.add(size=d)
    return req


def _random_bytes(seed: int) -> bytes:
    """Bytes that are not a LookupRequest (checked here: random bytes can parse by chance)."""
    rng = np.random.default_rng(seed)
    while True:
        data = rng.integers(0, 256, size=256, dtype=np.uint8).tobytes()
        try:
            embedding_pb2.LookupRequest.FromString(data)
            embedding_pb2.DescribeRequest.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError: what we want
            return data


def bad_inputs(cluster) -> list[tuple[str, str, bytes, grpc.StatusCode, str]]:
    """(name, method, body, status, message fragment) for every bad input the shard refuses."""
    users = cluster.smap.tables["users"]
    node = users.partitions[0][0]
    not_held = next(p for p, r in enumerate(users.partitions) if node not in r)
    v = cluster.smap.version
    ok_ids = [0, 2]
    over_cap_then_bad_shape = request([("users", 0, SUM, np.zeros(MAX_IDS + 1, np.int64), [MAX_IDS + 1], None)])
    bad = over_cap_then_bad_shape.groups.add(table="users", pooling=embedding_pb2.POOLING_SUM)
    bad.ids.dtype, bad.lengths.dtype = tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_INT32
    bad.ids.dims.add(size=-(2**40))
    bad.lengths.dims.add(size=0)
    half = MAX_BAGS // 2
    cases = [
        # shapes, checked for every group before any cap or data
        ("later group dims=[-2^40]", over_cap_then_bad_shape, IA, "groups[1] (table 'users' partition 0).ids: negative dimension in shape [-1099511627776]"),
        ("ids with two dimensions", _declared_only([2, 2]), IA, "ids: expected 1 dimension(s), got shape [2, 2]"),
        # caps, from declared shapes, summed over groups
        # 16 MiB: bigger than any request the caps allow, refused by gRPC before it reaches Python
        ("4M empty bags", _empty_bags("users", 4_000_000), RE, "Received message larger than max"),
        ("over the bags cap", _empty_bags("users", MAX_BAGS + 1), RE, f"{MAX_BAGS + 1} bags, over this node's cap of {MAX_BAGS} (--max-bags)"),
        ("too many groups", request([("users", 0, SUM, [], [], None)] * (MAX_GROUPS + 1)), RE, f"{MAX_GROUPS + 1} bag groups, over this node's cap"),
        ("bags declared, not sent", _declared_only([0], [10 * MAX_BAGS]), RE, f"{10 * MAX_BAGS} bags, over this node's cap"),
        ("over the ids cap", request([("users", 0, SUM, np.zeros(MAX_IDS + 1, np.int64), [MAX_IDS + 1], None)]), RE, f"over this node's cap of {MAX_IDS} (--max-ids)"),
        ("over the ids cap over two groups", request([("users", 0, SUM, np.zeros(MAX_IDS // 2 + 1, np.int64), [MAX_IDS // 2 + 1], None)] * 2), RE, f"{MAX_IDS + 2} ids, over this node's cap"),
        ("ids declared, not sent", _declared_only([10 * MAX_IDS]), RE, f"{10 * MAX_IDS} ids, over this node's cap"),
        ("answer over the message cap", request([("users", 0, SUM, [], np.zeros(half, np.int32), None)] * 2), RE, "(--max-message-bytes)"),
        # partitions that do not exist, or are not here
        ("partition 7 of a whole table, map 0", request([("countries", 7, SUM, [0], [1], None)]), IA, "table 'countries': partition 7 out of range [0, 1)"),
        ("partition 7 of a whole table, map v", request([("countries", 7, SUM, [0], [1], None)], shard_map_version=v), IA, "partition 7 out of range [0, 1) in every shard map this node knows"),
        ("partition 7 of a whole table, unknown map", request([("countries", 7, SUM, [0], [1], None)], shard_map_version=v + 99), IA, "partition 7 out of range [0, 1) in every shard map"),
        ("partition 5 of 2, map v", request([("users", 5, SUM, [5], [1], None)], shard_map_version=v), IA, "table 'users': partition 5 out of range [0, 2)"),
        ("negative partition, map v", request([("users", -1, SUM, [0], [1], None)], shard_map_version=v), IA, "partition -1 out of range"),
        ("partition not held, map v", request([("users", not_held, SUM, [not_held], [1], None)], shard_map_version=v), FP, f"table 'users' partition {not_held} is not held"),
        # versions
        ("version -1", request([("users", 0, SUM, ok_ids, [2], None)], version=-1), IA, "version must be >= 0"),
        ("version -1, no groups", embedding_pb2.LookupRequest(version=-1), IA, "version must be >= 0"),
        # weights
        ("weight 3e38", request([("users", 0, SUM, ok_ids, [2], [3e38, 1.0])]), IA, "groups[0] (table 'users' partition 0).weights: |weight| 3e+38 is over the limit of 1e+06"),
        ("weight -inf", request([("users", 0, SUM, ok_ids, [2], [1.0, -np.inf])]), IA, "groups[0] (table 'users' partition 0).weights: non-finite weight"),
        ("weight NaN", request([("users", 0, SUM, ok_ids, [2], [np.nan, 1.0])]), IA, "non-finite weight"),
        ("float16 overflow", request([("users", 0, SUM, ok_ids, [2], [1e6, 1e6])], output_dtype=tensor_pb2.DTYPE_FLOAT16), IA, "beyond float16's range"),
    ]
    out = [(name, "Lookup", req.SerializeToString(), code, fragment) for name, req, code, fragment in cases]
    out += [
        ("random bytes", "Lookup", _random_bytes(1), IA, "malformed LookupRequest: "),
        ("random bytes to Describe", "Describe", _random_bytes(2), IA, "malformed DescribeRequest: "),
        ("a truncated body", "Lookup", request([("users", 0, SUM, ok_ids, [2], None)]).SerializeToString()[:-3], IA, "malformed LookupRequest: "),
    ]
    return out


def largest_legal(table_dim: int) -> embedding_pb2.LookupRequest:
    """Every id the cap allows, each with a weight, in as many bags as the answer cap allows."""
    per_bag = table_dim * 4 + 4
    bags = min(MAX_BAGS, (MAX_MESSAGE - response_bytes([DeclaredGroup("users", 0, SUM, 0, 0, False)], {}, 4)) // per_bag)
    lengths = np.zeros(bags, np.int32)
    lengths[: MAX_IDS % bags] = MAX_IDS // bags + 1
    lengths[MAX_IDS % bags :] = MAX_IDS // bags
    ids = (np.arange(MAX_IDS, dtype=np.int64) * 2) % 2000  # users/0of2: even ids
    return request([("users", 0, SUM, ids, lengths, np.full(MAX_IDS, 0.5, np.float32))])


def test_bad_input_is_refused_while_good_requests_flow_and_rss_stays_flat(env, small_reference):
    cluster = env
    node = cluster.smap.tables["users"].partitions[0][0]
    ch, lookup, describe = _calls(cluster.addresses[node])
    good_ch, good_lookup, _ = _calls(cluster.addresses[node])
    good = request([("users", 0, PoolingType.MEAN, [0, 2, 4], [1, 2], None), ("countries", 0, SUM, [1], [1], None)], shard_map_version=cluster.smap.version)
    want = small_reference.model.pool("users", [0, 2, 4], [1, 2], PoolingType.MEAN)
    stop, errors, good_calls = threading.Event(), [], [0]

    def good_stream():
        body = good.SerializeToString()
        while not stop.is_set():
            try:
                resp = embedding_pb2.LookupResponse.FromString(good_lookup(body, timeout=30))
                np.testing.assert_allclose(wire.decode(resp.results[0].pooled, "p", dtype="float32", ndim=2), want, rtol=1e-5, atol=1e-6)
                good_calls[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    shard = psutil.Process(cluster.processes[node].pid)
    dim = small_reference.model.spec.table("users").dim
    largest = largest_legal(dim)
    big, big_bags = largest.SerializeToString(), largest.groups[0].lengths.dims[0].size
    cases = bad_inputs(cluster)
    t = threading.Thread(target=good_stream)
    t.start()
    try:
        wait_for(lambda: good_calls[0] > 0, 30, "the good stream to start")
        for _ in range(2):  # warm-up: the largest legal Lookup, answered in full
            resp = embedding_pb2.LookupResponse.FromString(lookup(big, timeout=60))
            assert wire.decode(resp.results[0].pooled, "p", dtype="float32", ndim=2).shape == (big_bags, dim)
        rss = [shard.memory_info().rss]
        for _ in range(ROUNDS):
            for name, method, body, code, fragment in cases:
                call = lookup if method == "Lookup" else describe
                with pytest.raises(grpc.RpcError) as info:
                    call(body, timeout=30)
                assert info.value.code() == code, f"{name}: {info.value.code()} {info.value.details()}"
                assert fragment in info.value.details(), f"{name}: {info.value.details()!r}"
                assert "<class" not in info.value.details() and "Error'" not in info.value.details(), name
            rss.append(shard.memory_info().rss)
        before = good_calls[0]
        wait_for(lambda: good_calls[0] > before + 3, 30, "the good stream to keep flowing after the bad input")
        node_id = embedding_pb2.DescribeResponse.FromString(describe(b"", timeout=10)).node_id
    finally:
        stop.set()
        t.join()
        ch.close()
        good_ch.close()
    assert not errors, errors[:3]
    assert node_id == node and cluster.processes[node].running
    mib = [r / 2**20 for r in rss]
    print(f"shard RSS after warm-up and after each of {ROUNDS} rounds of {len(cases)} bad inputs: "
          + ", ".join(f"{m:.1f} MiB" for m in mib))
    assert max(rss[1:]) <= 1.10 * rss[0], f"RSS grew from {mib[0]:.1f} MiB to {max(mib[1:]):.1f} MiB"
