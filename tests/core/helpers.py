"""Small test doubles shared by the core tests: a settable clock and an in-memory audit sink."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lapse.core.events import AuditEvent


class Clock:
    """The store's clock, moved by the test (the core never reads one itself)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ListSink:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    async def write(self, events: Sequence[AuditEvent]) -> None:
        self.events.extend(events)

    def close(self) -> None:
        pass

    def count(self, names: Iterable[str]) -> int:
        names = set(names)
        return sum(e.event in names for e in self.events)
