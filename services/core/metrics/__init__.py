"""Every Prometheus metric of shardrec, spelled here and nowhere else (docs/observability.md
lists them with their labels). Each process builds one ``CollectorRegistry`` in its ``main``
and passes it down; nothing here is a module-level singleton.

Two kinds of metric, by cost:

- **Hot path**: histograms observed while serving (``FrontendMetrics``, ``ShardMetrics``):
  one observe per stage per batch, per request for its queue wait and total, per Lookup RPC.
  Label children are created once and cached. With metrics off they are no-ops.
- **At scrape time**: counters and gauges read from the plain integer counters the serving
  objects already keep (``FrontendReading``, ``ShardReading``, filled by the frontend and the
  shard), so a counter costs an integer increment while serving, nothing more.

``FrontendAdmin.GetStats`` reads the same registry (``frontend_stats``): its legacy names are
mapped from the samples here, counters and gauges apart.
"""

from services.core.metrics.base import *  # noqa: F401,F403
from services.core.metrics.frontend import LEGACY_GAUGES, FrontendMetrics, FrontendReading, NodeReading, frontend_stats  # noqa: F401
from services.core.metrics.shard import PartitionReading, ShardMetrics, ShardReading  # noqa: F401
