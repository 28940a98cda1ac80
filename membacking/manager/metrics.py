"""Prometheus metrics of a running manager, served over HTTP by prometheus-client.

Counters and gauges are read from `ManagerState` at scrape time (only atomic reads, since the
scrape runs in the HTTP server's thread); the invalidation latency is a histogram fed by the loop.
The process's own resources (fds against the limit, RSS, VMAs) come from /proc.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .procinfo import VERSION, metrics_url, process_info
from .state import ManagerState

log = logging.getLogger("membacking.manager")


_COUNTERS = {
    "faults": "Fault requests (SendMappings) served",
    "maps_sent": "Map messages sent to mappers",
    "nomappings_sent": "NoMapping messages sent to mappers",
    "unmaps_sent": "Unmap messages sent to mappers",
    "fds_sent": "File descriptors sent to mappers",
    "removals": "Region removals completed",
    "evictions": "Mappers evicted: an Unmap unacknowledged, or 8 invalid messages in a row",
    "evictions_by_operator": "Mappers evicted by an operator (membacking mapper evict)",
    "rollbacks": "Changes rolled back because an eager mapper could not map them",
    "demotions": "Eager mappers made lazy because they could not map a change",
    "invalidations": "Changes that waited for their holders' Unmap acknowledgements",
    "evict_kills": "Evicted mappers killed (SIGKILL) under --evict-kill",
    "reattach_timeouts": "Mappers awaited back after a restart that did not come back in time",
    "evictions_invalid": "Mappers evicted for 8 invalid messages in a row (also in evictions)",
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
        refused = CounterMetricFamily(
            "membacking_refused_requests",
            "Requests turned down by a limit or a policy, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(dict(state.refused).items()):
            refused.add_metric([reason], count)
        yield refused
        info = GaugeMetricFamily(
            "membacking_build_info", "The running version (always 1)", labels=["version"]
        )
        info.add_metric([VERSION], 1)
        yield info
        yield GaugeMetricFamily(
            "membacking_process_vmas", "Memory mappings of the daemon", value=process_info()["vmas"]
        )


class ManagerMetrics:
    """The metrics registry of one manager; `serve(port)` exposes it on /metrics."""

    def __init__(self, state: ManagerState) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state))
        # process_open_fds, process_max_fds, process_resident_memory_bytes, CPU and start time
        ProcessCollector(registry=self.registry)
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
        log.info("metrics served on %s", metrics_url(addr, bound))
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
