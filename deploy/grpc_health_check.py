"""Exit 0 when the gRPC health service at ADDRESS reports SERVING, else 1.

    python deploy/grpc_health_check.py localhost:50051 [SERVICE]

For compose healthchecks (Kubernetes uses its built-in ``grpc`` probe instead). SERVICE ""
(the default) is readiness: a shard is SERVING once its partitions are loaded, a frontend while
every partition has a ready replica in its view (and its feature store is there); both turn
NOT_SERVING first when they stop. ``shardrec.liveness`` is liveness: SERVING while the process
runs. docs/health.md.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print(__doc__, file=sys.stderr)
        return 2
    service = argv[2] if len(argv) == 3 else ""
    with grpc.insecure_channel(argv[1]) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        except grpc.RpcError as e:
            print(f"{argv[1]}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{argv[1]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
