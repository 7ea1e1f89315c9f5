"""Prometheus metrics, served on their own listener (``[telemetry] metrics_listen``), never the public one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "lapse_decisions", "Requests judged, by verdict and reason", ["verdict", "reason"], registry=self.registry
        )
        self.latency = Histogram(
            "lapse_decision_seconds",
            "Time to judge one request (read, decide, write, audit)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.live_sessions = Gauge("lapse_live_sessions", "Sessions not yet ended", registry=self.registry)
        self.store_up = Gauge("lapse_store_up", "1 when the store answers, else 0", registry=self.registry)

    def watch_audit(self, audit: Any) -> None:
        """Export what the audit log counts (issue 8): events by name and reason (expiries by reason,
        revocations, step-ups, denials), and each queued sink's drops and backlog."""
        self.registry.register(_AuditCollector(audit))

    def decided(self, allowed: bool, reason: str | None, seconds: float) -> None:
        self.decisions.labels("allow" if allowed else "deny", reason or "").inc()
        self.latency.observe(seconds)

    def serve(self, host: str, port: int) -> None:
        """A small HTTP server thread for ``GET /metrics``."""
        start_http_server(port, addr=host, registry=self.registry)


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
