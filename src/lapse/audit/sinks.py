"""Audit sinks: ``store``, ``jsonl:PATH``, ``stdout``, ``syslog`` (CONTRACT.md §5).

Every sink receives the same JSON objects. What holds, sink by sink (issue 8):

- ``store`` and ``jsonl``: written inline, before the request is answered. A
  sink that cannot write raises, and the caller fails closed (503): an event
  is never lost quietly. The events of a session change (sign-in, every end)
  do not pass through ``StoreSink``: ``Gate`` hands them to the store's
  ``create``/``write``, which stores them in the same atomic step as the
  change (on a Redis Cluster right after it; docs/audit.md), and
  ``AuditLog.emit(..., stored_in=store)`` skips this sink for them. Other
  events are appended here, one transaction per batch.
- ``stdout`` and ``syslog`` (slow or remote readers): behind a bounded queue
  (``QueuedSink``), written by a background task, so a stalled reader never
  stalls a request. When the queue is full the event is dropped, and every
  drop is counted (``lapse_audit_dropped_total{sink}``), logged (once per
  ``DROP_LOG_EVERY`` seconds with the count) and never silent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import socket
import sys
import time
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
    """RFC 5424 messages to the local syslog socket (``/dev/log``) or a UDP address, facility authpriv.

    ``<PRI>1 TIMESTAMP HOSTNAME lapse PROCID MSGID - MSG``: MSGID is the event
    name, MSG the same JSON object every sink gets (UTF-8). Severity: info for
    ``success``, notice for ``failure``.
    """

    FACILITY = 10  # authpriv

    def __init__(self, address: str | tuple[str, int] = "/dev/log") -> None:
        self._address = address
        self._host = _header_token(socket.gethostname(), 255)
        self._pid = str(os.getpid())
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)

    def format(self, e: AuditEvent) -> bytes:
        severity = 6 if e.outcome == "success" else 5
        ts = e.to_dict()["ts"]
        header = f"<{self.FACILITY * 8 + severity}>1 {ts} {self._host} lapse {self._pid} {_header_token(e.event, 32)} -"
        return (header + " " + to_line(e)).encode("utf-8")

    async def write(self, events: Sequence[AuditEvent]) -> None:
        for e in events:
            self._sock.sendto(self.format(e), self._address)

    def close(self) -> None:
        self._sock.close()


def _header_token(value: str, limit: int) -> str:
    """A header field of RFC 5424: printable US-ASCII without spaces, or ``-``."""
    token = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return token or "-"


log = logging.getLogger("lapse.audit")
QUEUE_MAX = 10_000  # events waiting per queued sink
DROP_LOG_EVERY = 10.0  # seconds between drop warnings per sink


class QueuedSink:
    """A slow sink behind a bounded queue: requests never wait for it, and no drop goes uncounted."""

    def __init__(self, inner: Sink, name: str, maxsize: int = QUEUE_MAX) -> None:
        self.inner, self.name, self.maxsize = inner, name, maxsize
        self.dropped = 0
        self.failed = 0
        self._queue: asyncio.Queue[AuditEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._logged_at = -float("inf")
        self._logged_count = 0

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def write(self, events: Sequence[AuditEvent]) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(self.maxsize)
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"audit sink {self.name}")
        for e in events:
            try:
                self._queue.put_nowait(e)
            except asyncio.QueueFull:
                self._drop(1, "queue full")

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_EVERY:
            log.warning("audit sink %s: dropped %d event(s) (%s; %d in all)", self.name,
                        self.dropped - self._logged_count, why, self.dropped)
            self._logged_at, self._logged_count = now, self.dropped

    async def _drain(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                await self.inner.write(batch)
            except Exception as exc:  # noqa: BLE001 - a sink's failure is counted as drops, never raised here
                self.failed += len(batch)
                self._drop(len(batch), f"write failed: {exc}")

    async def flush(self) -> None:
        """Write out what is queued (shutdown)."""
        if self._queue is None:
            return
        pending = []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if pending:
            try:
                await self.inner.write(pending)
            except Exception as exc:  # noqa: BLE001
                self._drop(len(pending), f"write failed at shutdown: {exc}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._queue is not None and not self._queue.empty():
            self._drop(self._queue.qsize(), "closed with events queued")
        self.inner.close()


def open_sink(spec: str, store: SessionStore, base_dir: Path) -> Sink:
    """A sink from its config spelling; relative jsonl paths are from the config's folder."""
    if spec == "store":
        return StoreSink(store)
    if spec == "stdout":
        return QueuedSink(StreamSink(), "stdout")
    if spec == "syslog":
        return QueuedSink(SyslogSink(), "syslog")
    if spec.startswith("jsonl:"):
        path = Path(spec[len("jsonl:") :])
        return JsonlSink(path if path.is_absolute() else base_dir / path)
    raise ValueError(f"unknown audit sink {spec!r}")
