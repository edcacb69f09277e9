"""Exit 0 when the gRPC health service at ADDRESS reports SERVING, else 1.

    python deploy/grpc_health_check.py [--tls-dir DIR [--server-name NAME]] localhost:50051 [SERVICE]

For compose healthchecks, and for Kubernetes' readiness with TLS on (the kubelet's own ``grpc``
probe speaks no TLS: deploy/k8s/tls/). SERVICE "" (the default) is readiness: a shard is SERVING
once its partitions are loaded, a frontend while every partition has a ready replica in its view
(and its feature store is there); both turn NOT_SERVING first when they stop.
``shardrec.liveness`` is liveness: SERVING while the process runs. docs/health.md.

``--tls-dir``: a folder laid out as a ``kubernetes.io/tls`` Secret (``tls.crt``, ``tls.key``,
``ca.crt``): TLS, presenting that certificate (a shard's port wants a client certificate).
``--server-name``: the name to check the server's certificate against when it does not hold the
dialled host (``localhost``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_dir:
        return grpc.insecure_channel(args.address)
    d = Path(args.tls_dir)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(d / "ca.crt").read_bytes(),
        private_key=(d / "tls.key").read_bytes(),
        certificate_chain=(d / "tls.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else None
    return grpc.secure_channel(args.address, creds, options=options)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls-dir", help="tls.crt, tls.key and ca.crt: TLS with that client certificate")
    parser.add_argument("--server-name", help="with --tls-dir: the name the server's certificate must hold")
    parser.add_argument("address")
    parser.add_argument("service", nargs="?", default="")
    args = parser.parse_args(argv[1:])
    with _channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=2.0)
        except grpc.RpcError as e:
            print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"{args.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
