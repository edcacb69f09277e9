"""A process's telemetry, built once in its ``main`` and passed down: the metrics registry (its
own ``CollectorRegistry``, never prometheus_client's global one), the ``/metrics`` HTTP
endpoint when a port is configured, and the tracer (docs/observability.md)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from services.core.config import ObservabilityConfig
from services.core.hostport import join_host_port
from services.core.tracing import Tracing, TracingConfig, make_tracing

log = logging.getLogger(__name__)


class Telemetry:
    """``registry``, ``tracing``, and ``metrics_address`` (host:port, or None without an
    endpoint). ``close`` stops the endpoint and flushes the spans."""

    def __init__(self, config: ObservabilityConfig, *, role: str, node: str) -> None:
        from prometheus_client import disable_created_metrics

        disable_created_metrics()  # no *_created series: they double what is scraped and say little
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.tracing: Tracing = make_tracing(
            TracingConfig(config.trace_sample, config.otlp_endpoint, config.trace_file), role=role, node=node
        )
        self.metrics_address: str | None = None
        self._server = None

    @property
    def metrics_on(self) -> bool:
        return self.config.metrics

    def serve_metrics(self) -> str | None:
        """Start the ``/metrics`` endpoint (a daemon thread) if a port is configured; its
        address. Call after every metric is registered."""
        if not self.config.metrics:
            return None
        from prometheus_client import start_http_server

        server, _thread = start_http_server(self.config.metrics_port or 0, self.config.metrics_host, registry=self.registry)
        self._server = server
        self.metrics_address = join_host_port(self.config.metrics_host, server.server_port)
        log.info("metrics on http://%s/metrics", self.metrics_address)
        return self.metrics_address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.tracing.shutdown()
