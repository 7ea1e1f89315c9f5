"""Audit sinks: ``store``, ``jsonl:PATH``, ``stdout``, ``syslog`` (CONTRACT.md §5), remote syslog (beyond it).

Every sink receives the same JSON objects. What holds, sink by sink (issue 8):

- ``store`` and ``jsonl``: written inline, before the request is answered. A
  sink that cannot write raises, and the caller fails closed (503): an event
  is never lost quietly. The events of a session change (sign-in, every end)
  do not pass through ``StoreSink``: ``Gate`` hands them to the store's
  ``create``/``write``, which stores them in the same atomic step as the
  change (on a Redis Cluster right after it; docs/audit.md), and
  ``AuditLog.emit(..., stored_in=store)`` skips this sink for them. Other
  events are appended here, one transaction per batch.
- ``stdout``, ``syslog`` and the remote ``syslog:udp|tcp|tls://HOST:PORT``
  (``lapse.audit.remote``; slow or remote readers): behind a bounded queue
  (``QueuedSink``), written by a background task, so a stalled reader never
  stalls a request. When the queue is full the event is dropped, and every
  drop is counted (``lapse_audit_dropped_total{sink}``), logged (once per
  ``DROP_LOG_EVERY`` seconds with the count, or once per outage by a remote
  sink) and never silent. Shutdown waits ``FLUSH_WAIT`` seconds at most.
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
from .remote import SEND_TIMEOUT, SinkError, StreamSyslogSink, SyslogFormat, UdpSyslogSink, parse_target


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
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def write(self, events: Sequence[AuditEvent]) -> None:
        """Straight to the file, no buffer: a failed write (a full disk) raises and leaves nothing behind
        to be written twice, or to fail again at close."""
        data = "".join(to_line(e) + "\n" for e in events).encode()
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StreamSink:
    """``stdout``: for containers whose log collector reads standard output.

    Written from a worker thread: a pipe whose reader stalls blocks that thread (and, the queue
    full, costs counted drops), never the event loop that serves requests.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    async def write(self, events: Sequence[AuditEvent]) -> None:
        await asyncio.to_thread(self._write, "".join(to_line(e) + "\n" for e in events))

    def _write(self, text: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(text)
        stream.flush()

    def close(self) -> None:
        pass


class SyslogSink:
    """RFC 5424 messages to the local syslog socket (``/dev/log``) or a UDP address, facility authpriv.

    ``<PRI>1 TIMESTAMP HOSTNAME lapse PROCID MSGID - MSG``: MSGID is the event
    name, MSG the same JSON object every sink gets (UTF-8). Severity: info for
    ``success``, notice for ``failure``. (Remote collectors: ``lapse.audit.remote``.)
    """

    FACILITY = SyslogFormat.FACILITY

    def __init__(self, address: str | tuple[str, int] = "/dev/log") -> None:
        self._address = address
        self.format = SyslogFormat().format
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.settimeout(SEND_TIMEOUT)  # a stalled syslog daemon: an error (counted drops), not a hang

    async def write(self, events: Sequence[AuditEvent]) -> None:
        # From a worker thread: a full /dev/log blocks that thread, never the event loop.
        await asyncio.to_thread(self._send, [self.format(e) for e in events])

    def _send(self, messages: list[bytes]) -> None:
        for message in messages:
            self._sock.sendto(message, self._address)

    def close(self) -> None:
        self._sock.close()


log = logging.getLogger("lapse.audit")
QUEUE_MAX = 10_000  # events waiting per queued sink
DROP_LOG_EVERY = 10.0  # seconds between drop warnings per sink
FLUSH_WAIT = 5.0  # seconds shutdown waits for a queued sink to write what it holds
STOP_WAIT = 1.0  # seconds shutdown then waits for a cancelled writer to end


class QueuedSink:
    """A slow sink behind a bounded queue: requests never wait for it, and no drop goes uncounted.

    The writer is an asyncio task (one per sink), so an inner sink must await, never block: the
    network sinks (``lapse.audit.remote``) do their I/O as awaits with timeouts. An inner sink that
    raises ``SinkError`` says how many of the batch it did not write (and whether it logged why); one
    that counts what it ``sent`` lets a batch cut short at shutdown count only its unsent part as dropped.
    """

    def __init__(self, inner: Sink, name: str, maxsize: int = QUEUE_MAX, flush_wait: float = FLUSH_WAIT) -> None:
        self.inner, self.name, self.maxsize, self.flush_wait = inner, name, maxsize, flush_wait
        self.dropped = 0
        self.failed = 0
        self._queue: asyncio.Queue[AuditEvent] | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight = 0  # events of the batch being written
        self._sent_before = 0  # the inner sink's ``sent`` count (if it keeps one) when that batch began
        self._logged_at = -float("inf")
        self._logged_count = 0
        self._closed = False

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def write(self, events: Sequence[AuditEvent]) -> None:
        if self._closed:  # no new writer after close: nothing would stop it, nothing would count its losses
            if events:
                self._drop(len(events), "emitted after the sink was closed")
            return
        if self._queue is None:
            self._queue = asyncio.Queue(self.maxsize)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=f"audit sink {self.name}")
        for e in events:
            try:
                self._queue.put_nowait(e)
            except asyncio.QueueFull:
                self._drop(1, "queue full")

    def _drop(self, n: int, why: str, *, quiet: bool = False) -> None:
        self.dropped += n
        now = time.monotonic()
        if quiet:  # the sink said why (once per outage); later lines' counts include these
            return
        if now - self._logged_at >= DROP_LOG_EVERY:
            log.warning("audit sink %s: dropped %d event(s) (%s; %d in all)", self.name,
                        self.dropped - self._logged_count, why, self.dropped)
            self._logged_at, self._logged_count = now, self.dropped

    async def _drain(self) -> None:
        queue = self._queue  # its own: _stop() drops self._queue, and a cancel may be swallowed (below)
        me = asyncio.current_task()
        assert queue is not None
        while self._task is me:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < 500:
                batch.append(queue.get_nowait())
            self._inflight = len(batch)
            self._sent_before = getattr(self.inner, "sent", 0)
            try:
                await self.inner.write(batch)
            except SinkError as exc:
                self.failed += exc.unsent
                self._drop(exc.unsent, f"write failed: {exc}", quiet=exc.logged)
            except Exception as exc:  # noqa: BLE001 - a sink's failure is counted as drops, never raised here
                self.failed += len(batch)
                self._drop(len(batch), f"write failed: {exc}")
            if self._task is not me:
                # stopped meanwhile (Python 3.11's wait_for can swallow a cancel that races with the write
                # finishing): _stop() counts this batch, so this writer counts and takes nothing more
                return
            self._inflight = 0
            for _ in batch:
                queue.task_done()

    async def flush(self) -> None:
        """Write out what is queued (shutdown), waiting at most ``flush_wait``; what is left is counted as dropped."""
        if self._queue is None or self._task is None:
            return
        why = f"not written within {self.flush_wait:g} s at shutdown"
        try:
            await asyncio.wait_for(self._queue.join(), self.flush_wait)
            settle = getattr(self.inner, "settle", None)
            if settle is not None:  # the last batch's connection: closed by the collector meanwhile?
                lost = await settle()
                if lost:
                    self.failed += lost
                    self._drop(lost, "the collector closed the connection", quiet=True)
        except TimeoutError:
            pass
        finally:  # even when flush itself is cancelled: what is left is counted
            task = self._task
            if task is not None:
                task.cancel()
                if task is not asyncio.current_task():
                    # the writer ends (its batch's ``sent`` is then final), bounded: shutdown waits for nothing
                    await asyncio.wait({task}, timeout=STOP_WAIT)
            self._stop(why)

    def _stop(self, why: str) -> None:
        """End the writer; the batch it was writing and the queued events count as dropped."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        left = self._inflight and self._inflight - (getattr(self.inner, "sent", 0) - self._sent_before)
        self._inflight = 0
        if self._queue is not None:  # a cancelled batch is never task_done: a later write starts a new queue
            left += self._queue.qsize()
            self._queue = None
        if left:
            self._logged_at = -float("inf")  # said at once: shutdown is no time to wait 10 s
            self._drop(left, why)

    def close(self) -> None:
        self._closed = True
        self._stop("closed with events queued")
        self.inner.close()


def open_sink(spec: str, store: SessionStore, base_dir: Path) -> Sink:
    """A sink from its config spelling; relative jsonl and ``?ca=`` paths are from the config's folder."""
    if spec == "store":
        return StoreSink(store)
    if spec == "stdout":
        return QueuedSink(StreamSink(), "stdout")
    if spec == "syslog":
        return QueuedSink(SyslogSink(), "syslog")
    if spec.startswith("syslog:"):  # a remote collector: an extension beyond CONTRACT.md
        target = parse_target(spec, base_dir)
        remote = UdpSyslogSink(target) if target.transport == "udp" else StreamSyslogSink(target)
        return QueuedSink(remote, target.name)
    if spec.startswith("jsonl:"):
        path = Path(spec[len("jsonl:") :])
        return JsonlSink(path if path.is_absolute() else base_dir / path)
    raise ValueError(f"unknown audit sink {spec!r}")
