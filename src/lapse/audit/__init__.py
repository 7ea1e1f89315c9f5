"""The audit log: fans each event out to every configured sink."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.events import AuditEvent
from .sinks import JsonlSink, Sink, StoreSink, StreamSink, SyslogSink, open_sink


class AuditLog:
    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)

    async def emit(self, events: Sequence[AuditEvent]) -> None:
        if events:
            for sink in self.sinks:
                await sink.write(events)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


__all__ = ["AuditLog", "JsonlSink", "Sink", "StoreSink", "StreamSink", "SyslogSink", "open_sink"]
