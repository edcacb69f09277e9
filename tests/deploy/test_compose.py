"""deploy/compose.yaml for real: run by ``make test-deploy`` (deploy/test_deploy.sh), never by
``make test`` (pyproject's addopts ignore tests/deploy; naming the folder runs it).

One stack for the module (the images ``make image`` built; the small model, made by the init
job in the shared volume and copied out for the reference): Recommend through the frontends'
ports on 127.0.0.1 equals ``core.reference``; a shard container restarted under a closed-loop
client fails nothing; a rolling upgrade (shards, then frontends, one at a time, to an image of
"the new commit") fails nothing. ``down -v`` at the end, also on failure. docs/deploy.md.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import grpc
import numpy as np
import pytest

from services.core.reference import ReferenceRecommender
from tests.deploy.stack import FRONTENDS, REPO, SHARDS, Stack, balanced_client_options
from tests.e2e.test_recommend import check_response, random_requests
from tests.e2e.test_replica_faults import CachedReference
from tests.support.closed_loop import ClosedLoop
from tests.support.servers import free_port

UP_TIMEOUT_S = 600.0  # five torch processes starting on two shared cores
STEP_TIMEOUT_S = 180.0
DISTINCT_REQUESTS = 40  # the closed loop cycles over these; the reference scores each once

pytestmark = pytest.mark.timeout(1200)  # the stack's start is part of the first test

# A frontend that turned NOT_SERVING and shut its gRPC server down in the same instant had calls
# reaching it right then cancelled by gRPC (CANCELLED: not retried by the client, unlike a
# refused call): 1 request in ~7,500 in about half the runs. The frontend now stays NOT_SERVING
# for --lame-duck-s (1 s) before it refuses calls, so none may fail; any CANCELLED request while
# a frontend is replaced is still reported as this race.
FRONTEND_SHUTDOWN_RACE_MAX = 0


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    s = Stack(f"shardrec-test-{uuid.uuid4().hex[:6]}", {fe: free_port() for fe in FRONTENDS}, tmp_path_factory.mktemp("compose-logs"))
    failed_before = request.session.testsfailed
    try:
        t0 = time.monotonic()
        s.compose("up", "-d", "--no-build", timeout_s=UP_TIMEOUT_S)
        s.wait_healthy(FRONTENDS, UP_TIMEOUT_S)
        print(f"\n[deploy] stack {s.project} healthy in {time.monotonic() - t0:.1f}s", flush=True)
        yield s
    finally:
        if request.session.testsfailed > failed_before:
            print(f"\n[deploy] logs of {s.project}:\n{s.logs()}", file=sys.__stderr__, flush=True)
            for path in s.replaced_logs:
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
                print(f"\n[deploy] replaced container {path.name}:\n{tail}", file=sys.__stderr__, flush=True)
        s.down()


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory) -> CachedReference:
    """The reference over the model the init job wrote into the volume (copied out)."""
    model = stack.copy_out("init", "/data/model", tmp_path_factory.mktemp("compose-model"))
    return CachedReference(ReferenceRecommender(str(model)))


def check_all(reference: CachedReference, loop: ClosedLoop, version: int = 1) -> tuple[int, list[str]]:
    """(replies, what was wrong): each reply equal to the reference, at ``version``."""
    wrong = []
    replies = loop.replies()
    for r in replies:
        req = loop.requests[r.index]
        try:
            assert r.response.version == version, f"version {r.response.version}"
            check_response(reference, req, r.response)
        except AssertionError as e:
            wrong.append(f"{req.request_id}: {str(e).splitlines()[0]}")
    return len(replies), wrong


def report(what: str, stack: Stack, loop: ClosedLoop, sent: int, wrong: list[str], t0: float) -> str:
    """The summary line, and for each failed request when it was sent (seconds after ``t0``),
    during which step, and its status."""
    line = f"[deploy] {what}: {sent + len(loop.errors)} requests, {len(loop.errors)} failed, {len(wrong)} wrong, {time.monotonic() - t0:.0f}s"
    failures = [
        f"+{start - t0:.2f}s ({stack.during(start)}): {e.code().name} {e.details()}"
        for start, e in zip(loop.error_starts, loop.errors)
    ]
    steps = [f"+{when - t0:.2f}s {what}" for when, what in stack.timeline if when >= t0]
    print("\n".join([line, *failures]), flush=True)
    if failures:
        line += "\n  steps: " + "; ".join(steps) + "\n  failures:\n    " + "\n    ".join(failures[:10])
    return line


def test_recommend_through_every_frontend_equals_reference(stack, reference) -> None:
    from services._proto.shardrec.v1 import recommend_pb2_grpc

    requests = random_requests(60, seed=16)
    for fe in FRONTENDS:
        with grpc.insecure_channel(stack.address(fe)) as ch:
            stub = recommend_pb2_grpc.RecommenderStub(ch)
            for req in requests:
                resp = stub.Recommend(req, timeout=10)
                assert resp.version == 1 and resp.shard_map_version == 1
                check_response(reference, req, resp)
    for fe in FRONTENDS:
        assert stack.stats(fe)["view_live_nodes"] == len(SHARDS)
    for service in (*SHARDS, *FRONTENDS):
        assert stack.inspect(service, "{{.Config.User}}") == "10001"
        assert stack.inspect(service, "{{.HostConfig.ReadonlyRootfs}}") == "true"


def test_shard_restart_under_load_fails_nothing(stack, reference) -> None:
    requests = random_requests(DISTINCT_REQUESTS, seed=161)
    t0 = time.monotonic()
    with ClosedLoop(stack.balanced_target(), requests, clients=2, options=balanced_client_options()) as loop:
        stack.wait_serving_clients(FRONTENDS[0], STEP_TIMEOUT_S)
        stack.mark("restart shard-1")
        stack.compose("restart", "shard-1", timeout_s=STEP_TIMEOUT_S)  # SIGTERM: deregister, NOT_SERVING, drain
        stack.mark("shard-1 restarted")
        stack.wait_healthy(["shard-1"], STEP_TIMEOUT_S)
        stack.wait_in_rotation("shard-1", STEP_TIMEOUT_S)
        stack.mark("shard-1 back in rotation")
    sent, wrong = check_all(reference, loop)
    line = report("shard restart", stack, loop, sent, wrong, t0)
    assert sent > 0
    assert not loop.errors, f"{line}: {loop.errors[:3]}"
    assert not wrong, f"{line}: {wrong[:5]}"


def test_rolling_upgrade_fails_nothing(stack, reference) -> None:
    """Shards, then frontends, one at a time, to ``shardrec:next`` (the same code with another
    revision label: "the new commit"), old and new serving side by side meanwhile."""
    revision = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    build = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "build_images.py"), "--tag", "next", "--only", "shardrec",
         "--revision", f"{revision.stdout.strip() or 'unknown'}-next"],
        capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    old_image = stack.inspect("shard-0", "{{.Image}}")
    requests = random_requests(DISTINCT_REQUESTS, seed=162)
    t0 = time.monotonic()
    with ClosedLoop(stack.balanced_target(), requests, clients=2, options=balanced_client_options()) as loop:
        stack.wait_serving_clients(FRONTENDS[1], STEP_TIMEOUT_S)
        stack.mark("load running")
        for node in SHARDS:
            stack.replace(node, "next", STEP_TIMEOUT_S)
            stack.wait_healthy([node], STEP_TIMEOUT_S)
            stack.mark(f"{node} healthy")
            stack.wait_in_rotation(node, STEP_TIMEOUT_S)
            stack.mark(f"{node} back in rotation")
        for fe in FRONTENDS:
            stack.replace(fe, "next", STEP_TIMEOUT_S)
            stack.wait_healthy([fe], STEP_TIMEOUT_S)
            stack.mark(f"{fe} healthy")
            stack.wait_serving_clients(fe, STEP_TIMEOUT_S)
            stack.mark(f"{fe} serving clients again")
    sent, wrong = check_all(reference, loop)
    line = report("rolling upgrade", stack, loop, sent, wrong, t0)
    for service in (*SHARDS, *FRONTENDS):
        assert stack.image_of(service) == "shardrec:next"
        assert stack.inspect(service, "{{.Image}}") != old_image
    assert sent > 0
    race = [
        e for start, e in zip(loop.error_starts, loop.errors)
        if e.code() == grpc.StatusCode.CANCELLED
        and any(stack.between(start, f"replace {fe} with next", f"{fe} recreated") for fe in FRONTENDS)
    ]
    if race:
        print(f"[deploy] KNOWN ISSUE: {len(race)} request(s) CANCELLED in a frontend's shutdown race", flush=True)
    assert len(loop.errors) == len(race) <= FRONTEND_SHUTDOWN_RACE_MAX, line
    assert not wrong, f"{line}: {wrong[:5]}"
    latencies = np.array([r.latency_s for r in loop.replies()])
    print(f"[deploy] rolling upgrade latency p50 {np.percentile(latencies, 50) * 1e3:.1f} ms, "
          f"p99 {np.percentile(latencies, 99) * 1e3:.1f} ms, max {latencies.max() * 1e3:.0f} ms", flush=True)
