"""The audit log: fans each event out to every configured sink."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ..core.events import AuditEvent
from ..store.base import SessionStore, StoreUnavailable
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
            failed: list[tuple[Sink, Exception]] = []
            for sink in self.sinks:  # every sink, also after one failed: each holds its own record
                if stored_in is None or not (isinstance(sink, StoreSink) and sink.store is stored_in):
                    try:
                        await sink.write(events)
                    except Exception as exc:  # noqa: BLE001 - any failure of an inline sink: fail closed, below
                        failed.append((sink, exc))
            if failed:
                sink, exc = failed[0]
                if isinstance(exc, StoreUnavailable) and len(failed) == 1:
                    raise exc
                raise AuditSinkFailed(_name(sink), exc) from exc

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


class AuditSinkFailed(StoreUnavailable):
    """An inline sink (``jsonl:``, or the ``store`` beside another) could not record events: the request that
    caused them fails closed (503), as when the store itself cannot answer; the other sinks got them."""

    def __init__(self, sink: str, cause: Exception) -> None:
        super().__init__(f"audit sink {sink} failed: {cause}")
        self.sink = f"audit sink {sink}"


def _name(sink: Sink) -> str:
    if isinstance(sink, JsonlSink):
        return f"jsonl:{sink.path}"
    return str(getattr(sink, "name", type(sink).__name__))


__all__ = ["AuditLog", "AuditSinkFailed", "JsonlSink", "QueuedSink", "Sink", "StoreSink", "StreamSink", "SyslogSink", "open_sink"]
