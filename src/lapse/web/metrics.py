"""Prometheus metrics, served on their own listener (``[telemetry] metrics_listen``), never the public one."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._decisions = _Decisions(BUCKETS)
        self.registry.register(self._decisions)
        self.live_sessions = Gauge("lapse_live_sessions", "Sessions not yet ended", registry=self.registry)
        self.store_up = Gauge("lapse_store_up", "1 when the store answers, else 0", registry=self.registry)

    def watch_audit(self, audit: Any) -> None:
        """Export what the audit log counts (issue 8): events by name and reason (expiries by reason,
        revocations, step-ups, denials), and each queued sink's drops and backlog."""
        self.registry.register(_AuditCollector(audit))

    def decided(self, allowed: bool, reason: str | None, seconds: float) -> None:
        self._decisions.add("allow" if allowed else "deny", reason or "", seconds)

    def serve(self, host: str, port: int) -> None:
        """A small HTTP server thread for ``GET /metrics``."""
        start_http_server(port, addr=host, registry=self.registry)


class _Decisions(Collector):
    """Decisions by verdict and reason, and how long each took: plain counts on the request path,
    metric families only when scraped. Why not prometheus_client's labelled Counter and Histogram:
    a label lookup and two locks per request, ~2 us, on the path every request takes. The scrape
    runs in the metrics server's thread; it copies the counts (one C call each, under the GIL)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = buckets
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(buckets) + 1)  # by upper bound (le), the last +Inf
        self.sum = 0.0

    def add(self, verdict: str, reason: str, seconds: float) -> None:
        key = (verdict, reason)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterator[Any]:
        counts, buckets, total = dict(self.counts), list(self.buckets), self.sum
        decisions = CounterMetricFamily("lapse_decisions", "Requests judged, by verdict and reason",
                                        labels=["verdict", "reason"])
        for (verdict, reason), n in sorted(counts.items()):
            decisions.add_metric([verdict, reason], n)
        yield decisions
        cumulative, running = [], 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], buckets, strict=True):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily("lapse_decision_seconds", "Time to judge one request (read, decide, write, audit)",
                                    buckets=cumulative, sum_value=total)


class _AuditCollector(Collector):
    """Read at scrape time from the ``AuditLog`` (plain counters it keeps): nothing on the request path."""

    def __init__(self, audit: Any) -> None:
        self.audit = audit

    def collect(self) -> Iterator[Any]:
        events = CounterMetricFamily("lapse_audit_events", "Audit events emitted, by event and reason",
                                     labels=["event", "reason"])
        for (event, reason), n in sorted(self.audit.counts.items()):
            events.add_metric([event, reason], n)
        yield events
        dropped = CounterMetricFamily("lapse_audit_dropped", "Audit events a queued sink dropped (queue full or "
                                      "write failed)", labels=["sink"])
        queued = GaugeMetricFamily("lapse_audit_queue_depth", "Audit events waiting in a queued sink",
                                   labels=["sink"])
        for sink in self.audit.sinks:
            if hasattr(sink, "dropped") and hasattr(sink, "depth"):
                dropped.add_metric([sink.name], sink.dropped)
                queued.add_metric([sink.name], sink.depth)
        yield dropped
        yield queued
