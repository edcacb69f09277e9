"""deploy/compose.yaml driven from a test: one compose project, its containers' health, the
frontends' counters through their ports on 127.0.0.1, and a client that balances over them.

Every method is called from the test thread; each compose command runs with the project's
variables (image tag, model preset, published ports), the tag changeable per command for
the rolling upgrade.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import grpc

from services._proto.shardrec.v1 import recommend_pb2, recommend_pb2_grpc
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SHARDS = ("shard-0", "shard-1", "shard-2")
FRONTENDS = ("frontend-0", "frontend-1")


def compose_command() -> list[str]:
    """``docker-compose`` (v1, Debian's) where installed, else ``docker compose`` (v2)."""
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def balanced_client_options() -> list[tuple[str, object]]:
    """Channel options of a client spread over several frontends, as a caller should be:
    round_robin over the addresses, client-side health checking (a frontend turns NOT_SERVING
    first thing when it stops, so it leaves the rotation), and a retry of UNAVAILABLE (a call
    that reached a frontend as it stopped; Recommend is a read, safe to repeat)."""
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": "shardrec.v1.Recommender"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    return [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]


class Stack:
    """The compose project ``project`` of deploy/compose.yaml with the small model and the
    frontends published on ``ports`` (127.0.0.1)."""

    def __init__(self, project: str, ports: dict[str, int], log_dir: Path, tag: str = "dev", preset: str = "small") -> None:
        self.project = project
        self.ports = ports
        self.log_dir = log_dir
        self.tag = tag
        self.preset = preset
        self.timeline: list[tuple[float, str]] = []  # (time.monotonic(), what happened)
        self.replaced_logs: list[Path] = []  # the logs of containers replaced, kept for a failure report

    def mark(self, what: str) -> None:
        self.timeline.append((time.monotonic(), what))

    def during(self, t: float) -> str:
        """The last timeline step at or before ``t``."""
        steps = [what for when, what in self.timeline if when <= t]
        return steps[-1] if steps else "before the first step"

    def env(self, tag: str | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "SHARDREC_TAG": tag or self.tag,
            "SHARDREC_PRESET": self.preset,
            **{f"SHARDREC_{name.upper().replace('-', '_')}_PORT": str(port) for name, port in self.ports.items()},
        }

    def compose(self, *args: str, tag: str | None = None, timeout_s: float = 300.0) -> str:
        argv = [*compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        done = subprocess.run(argv, env=self.env(tag), capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv[len(compose_command()):])} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str, fmt: str) -> str:
        out = subprocess.run(["docker", "inspect", "--format", fmt, self.container(service)], capture_output=True, text=True)
        return out.stdout.strip()

    def health(self, service: str) -> str:
        return self.inspect(service, "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}")

    def image_of(self, service: str) -> str:
        return self.inspect(service, "{{.Config.Image}}")

    def wait_healthy(self, services, timeout_s: float) -> None:
        for service in services:
            wait_for(lambda: self.health(service) == "healthy", timeout_s, f"{service} to be healthy", interval_s=0.5)

    def address(self, frontend: str) -> str:
        return f"127.0.0.1:{self.ports[frontend]}"

    def balanced_target(self) -> str:
        """One gRPC target naming every frontend (the client balances over them)."""
        return "ipv4:" + ",".join(self.address(f) for f in FRONTENDS)

    def stats(self, frontend: str) -> dict[str, int]:
        with grpc.insecure_channel(self.address(frontend)) as ch:
            reply = recommend_pb2_grpc.FrontendAdminStub(ch).GetStats(recommend_pb2.GetStatsRequest(), timeout=5)
            return dict(reply.counters)

    def wait_in_rotation(self, node: str, timeout_s: float, lookups: int = 20) -> None:
        """Every frontend sees all shards registered and has sent ``node`` ``lookups`` Lookups
        since: the node takes traffic again. SERVING and registered is not enough: a new
        container may get the old one's IP, and the frontend's channel to that address is then
        in gRPC's reconnect backoff for seconds (it fails over meanwhile, and ejects the node,
        which then gets one probe at a time), so the next shard may stop only after this."""
        for fe in FRONTENDS:
            wait_for(lambda: self.stats(fe).get("view_live_nodes") == len(SHARDS), timeout_s, f"{fe} to see every shard")
            before = self.stats(fe).get(f"node_rpcs_{node}", 0)
            wait_for(lambda: self.stats(fe).get(f"node_rpcs_{node}", 0) >= before + lookups, timeout_s,
                     f"{fe} to send {lookups} Lookups to {node}", interval_s=0.1)

    def between(self, start: float, begin: str, end: str) -> bool:
        """Whether ``start`` lies between a timeline step ``begin`` and the next ``end``."""
        for i, (when, what) in enumerate(self.timeline):
            if what == begin and when <= start:
                until = next((w for w, x in self.timeline[i + 1 :] if x == end), float("inf"))
                if start <= until:
                    return True
        return False

    def wait_serving_clients(self, frontend: str, timeout_s: float) -> None:
        """The balanced client sends ``frontend`` requests again (it left the rotation while
        it was replaced and comes back once its health says SERVING)."""
        before = self.stats(frontend).get("requests_batched", 0)
        wait_for(lambda: self.stats(frontend).get("requests_batched", 0) > before + 10, timeout_s,
                 f"clients to reach {frontend} again", interval_s=0.1)

    def replace(self, service: str, tag: str, timeout_s: float) -> None:
        """Recreate ``service`` from image tag ``tag`` (compose stops the old container: SIGTERM,
        up to its stop_grace_period; then starts the new one), keeping the old one's log."""
        old = self.container(service)
        log_path = self.log_dir / f"{service}-{old[:12]}.log"
        with open(log_path, "wb") as out:  # follows the old container until compose removes it
            follower = subprocess.Popen(["docker", "logs", "-f", "-t", old], stdout=out, stderr=subprocess.STDOUT)
        self.replaced_logs.append(log_path)
        self.mark(f"replace {service} with {tag}")
        try:
            self.compose("up", "-d", "--no-deps", "--no-build", service, tag=tag, timeout_s=timeout_s)
        finally:
            try:
                follower.wait(timeout=30)
            except subprocess.TimeoutExpired:
                follower.kill()
                follower.wait()
        self.mark(f"{service} recreated")

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        """``docker cp`` a path (a volume's too) out of a service's container."""
        subprocess.run(["docker", "cp", f"{self.container(service)}:{path}", str(dest)], check=True, capture_output=True)
        return dest / Path(path).name

    def logs(self, tail: int = 200) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", str(tail), timeout_s=60)
        except Exception as e:  # best effort: only for a failure report
            return f"(no logs: {e})"

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout_s=180)
