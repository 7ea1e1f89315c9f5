"""The audit log: fans each event out to every configured sink."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..core.events import AuditEvent
from .sinks import JsonlSink, QueuedSink, Sink, StoreSink, StreamSink, SyslogSink, open_sink


class AuditLog:
    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)
        self.counts: Counter[tuple[str, str]] = Counter()  # (event, reason) -> how many: the metrics read it

    async def emit(self, events: Sequence[AuditEvent]) -> None:
        if events:
            for e in events:
                self.counts[(e.event, e.reason or "")] += 1
            for sink in self.sinks:
                await sink.write(events)

    def dropped(self) -> dict[str, int]:
        """Events each queued sink dropped (``lapse_audit_dropped_total``)."""
        return {s.name: s.dropped for s in self.sinks if isinstance(s, QueuedSink)}

    async def flush(self) -> None:
        for sink in self.sinks:
            if isinstance(sink, QueuedSink):
                await sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


__all__ = ["AuditLog", "JsonlSink", "QueuedSink", "Sink", "StoreSink", "StreamSink", "SyslogSink", "open_sink"]
