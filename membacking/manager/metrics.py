"""Prometheus metrics of a running manager, served over HTTP by prometheus-client.

Counters and gauges are read from `ManagerState` at scrape time (only atomic reads, since the
scrape runs in the HTTP server's thread); the invalidation latency is a histogram fed by the loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import ManagerState

log = logging.getLogger("membacking.manager")

_COUNTERS = {
    "faults": "Fault requests (SendMappings) served",
    "maps_sent": "Map messages sent to mappers",
    "nomappings_sent": "NoMapping messages sent to mappers",
    "unmaps_sent": "Unmap messages sent to mappers",
    "fds_sent": "File descriptors sent to mappers",
    "removals": "Region removals completed",
    "evictions": "Mappers evicted for not acknowledging an Unmap",
    "evict_kills": "Evicted mappers killed (SIGKILL) under --evict-kill",
}


class _StateCollector(Collector):
    def __init__(self, state: ManagerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        yield GaugeMetricFamily("membacking_regions", "Regions", value=len(state.regions))
        yield GaugeMetricFamily(
            "membacking_region_bytes", "Bytes of guest memory in regions", value=state.region_bytes
        )
        yield GaugeMetricFamily("membacking_mappers", "Attached mappers", value=len(state.mappers))
        counters = dict(state.counters)  # one atomic copy
        for key, text in _COUNTERS.items():
            yield CounterMetricFamily(f"membacking_{key}", text, value=counters.get(key, 0))
        rejected = CounterMetricFamily(
            "membacking_rejected_messages", "Peer messages rejected, by reason", labels=["reason"]
        )
        for reason, count in sorted(dict(state.rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected


class ManagerMetrics:
    """The metrics registry of one manager; `serve(port)` exposes it on /metrics."""

    def __init__(self, state: ManagerState) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state))
        self.invalidation = Histogram(
            "membacking_invalidation_seconds",
            "Time from a region removal request until every holder acknowledged its Unmap",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        state.removal_observer = self.invalidation.observe
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on addr:port (port 0 picks a free one); returns the bound port."""
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        bound: int = self._server.server_port
        log.info("metrics served on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
