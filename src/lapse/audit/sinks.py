"""Audit sinks: ``store``, ``jsonl:PATH``, ``stdout``, ``syslog`` (CONTRACT.md §5).

Every sink receives the same JSON objects. A sink that cannot write raises:
an audit event must not vanish quietly, so callers fail closed.
"""

from __future__ import annotations

import json
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TextIO

from ..core.events import AuditEvent
from ..store.base import SessionStore


def to_line(event: AuditEvent) -> str:
    return json.dumps(event.to_dict(), separators=(",", ":"), ensure_ascii=False)


class Sink(Protocol):
    async def write(self, events: Sequence[AuditEvent]) -> None: ...

    def close(self) -> None: ...


class StoreSink:
    """Into the session store, where ``lapse audit tail`` and the report read them."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def write(self, events: Sequence[AuditEvent]) -> None:
        await self.store.append_audit(events)

    def close(self) -> None:
        pass


class JsonlSink:
    """One JSON object per line, appended; the file is created 0600."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")

    async def write(self, events: Sequence[AuditEvent]) -> None:
        self._file.write("".join(to_line(e) + "\n" for e in events))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class StreamSink:
    """``stdout``: for containers whose log collector reads standard output."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def write(self, events: Sequence[AuditEvent]) -> None:
        stream = self._stream or sys.stdout
        stream.write("".join(to_line(e) + "\n" for e in events))
        stream.flush()

    def close(self) -> None:
        pass


class SyslogSink:
    """The local syslog socket (``/dev/log``), facility authpriv."""

    def __init__(self, address: str | tuple[str, int] = "/dev/log") -> None:
        self._handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV
        )

    async def write(self, events: Sequence[AuditEvent]) -> None:
        for e in events:
            record = logging.LogRecord("lapse.audit", logging.INFO, "", 0, "lapse: " + to_line(e), None, None)
            self._handler.emit(record)

    def close(self) -> None:
        self._handler.close()


def open_sink(spec: str, store: SessionStore, base_dir: Path) -> Sink:
    """A sink from its config spelling; relative jsonl paths are from the config's folder."""
    if spec == "store":
        return StoreSink(store)
    if spec == "stdout":
        return StreamSink()
    if spec == "syslog":
        return SyslogSink()
    if spec.startswith("jsonl:"):
        path = Path(spec[len("jsonl:") :])
        return JsonlSink(path if path.is_absolute() else base_dir / path)
    raise ValueError(f"unknown audit sink {spec!r}")
