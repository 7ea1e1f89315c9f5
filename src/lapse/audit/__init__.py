"""The audit log: fans each event out to every configured sink."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..core.events import AuditEvent
from ..store.base import SessionStore
from .sinks import JsonlSink, QueuedSink, Sink, StoreSink, StreamSink, SyslogSink, open_sink


class AuditLog:
    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)
        self.counts: Counter[tuple[str, str]] = Counter()  # (event, reason) -> how many: the metrics read it

    async def emit(self, events: Sequence[AuditEvent], *, stored_in: SessionStore | None = None) -> None:
        """To every sink; ``stored_in``: that store already holds these events (written with the state change,
        ``SessionStore.write``), so its ``store`` sink skips them."""
        if events:
            for e in events:
                self.counts[(e.event, e.reason or "")] += 1
            for sink in self.sinks:
                if stored_in is None or not (isinstance(sink, StoreSink) and sink.store is stored_in):
                    await sink.write(events)

    def writes_to(self, store: SessionStore) -> bool:
        """Whether a ``store`` sink appends to this store (then its writes carry their events)."""
        return any(isinstance(sink, StoreSink) and sink.store is store for sink in self.sinks)

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
