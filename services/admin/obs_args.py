"""The observability flags every ``serve`` command takes (docs/observability.md): the
``/metrics`` port, tracing, and the log format."""

from __future__ import annotations

import argparse


def add_observability_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on this HTTP port (0 = any free port; default: no endpoint)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the /metrics endpoint (default 127.0.0.1)")
    p.add_argument("--trace-sample", type=float, default=0.01, metavar="RATIO",
                   help="head sampling of traces started here, 0..1 (default 0.01); needs --otlp-endpoint or --trace-file")
    p.add_argument("--otlp-endpoint", default="", metavar="HOST:PORT", help="export spans to this OTLP/gRPC collector")
    p.add_argument("--trace-file", default="", metavar="PATH", help="append spans to this file, one JSON object a line")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text (default) or JSON")
    p.add_argument("--log-level", default="INFO")


def observability_config(args: argparse.Namespace):  # noqa: ANN201
    from services.core.config import ObservabilityConfig
    from services.core.errors import ConfigError

    if not 0.0 <= args.trace_sample <= 1.0:
        raise ConfigError(f"--trace-sample must be between 0 and 1, got {args.trace_sample}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise ConfigError(f"--metrics-port must be a port number, got {args.metrics_port}")
    return ObservabilityConfig(
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        trace_sample=args.trace_sample,
        otlp_endpoint=args.otlp_endpoint,
        trace_file=args.trace_file,
        log_format=args.log_format,
    )


def setup_logs(args: argparse.Namespace, role: str, node: str) -> None:
    from services.core.logs import setup_logging

    setup_logging(role, node, fmt=args.log_format, level=args.log_level)
