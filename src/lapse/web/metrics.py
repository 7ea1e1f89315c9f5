"""Prometheus metrics, served on their own listener (``[telemetry] metrics_listen``), never the public one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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

    def decided(self, allowed: bool, reason: str | None, seconds: float) -> None:
        self.decisions.labels("allow" if allowed else "deny", reason or "").inc()
        self.latency.observe(seconds)

    def serve(self, host: str, port: int) -> None:
        """A small HTTP server thread for ``GET /metrics``."""
        start_http_server(port, addr=host, registry=self.registry)
