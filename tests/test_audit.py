"""Audit sinks, the event shape of CONTRACT.md §5, and where session IDs may never appear."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
from pathlib import Path

import pytest

from lapse.audit import AuditLog, AuditSinkFailed, JsonlSink, StreamSink, SyslogSink, open_sink
from lapse.core.events import AuditEvent
from lapse.core.policy import AppSpec, Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.secret import SecretError, load_or_create
from lapse.store.memory import MemoryStore
from lapse.store.sqlite import SqliteStore

from .core.helpers import Clock, ListSink

FIELDS = {"ts", "event", "outcome", "user", "session", "app", "ip", "resource"}
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
EVENT = AuditEvent(1_750_000_000.5, "session.expired", "success", "alice", "ab" * 16, "wiki", "192.0.2.1",
                   "GET /x", "idle")


def test_event_shape():
    """standards-checklist M.110: when, who, what, outcome, where; timestamps in UTC."""
    d = EVENT.to_dict()
    assert FIELDS | {"reason"} == set(d)
    assert RFC3339_UTC.fullmatch(d["ts"]) and d["ts"] == "2025-06-15T15:06:40.500Z"
    assert "reason" not in AuditEvent(1.0, "session.created", "success").to_dict()
    assert AuditEvent.from_dict(d) == EVENT


def test_jsonl_sink_appends_one_object_per_line(tmp_path: Path):
    path = tmp_path / "logs" / "audit.jsonl"
    sink = JsonlSink(path)
    asyncio.run(sink.write([EVENT, EVENT]))
    sink.close()
    again = JsonlSink(path)
    asyncio.run(again.write([EVENT]))
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) == EVENT.to_dict() for line in lines)
    assert path.stat().st_mode & 0o777 == 0o600


def test_stdout_sink():
    out = io.StringIO()
    asyncio.run(StreamSink(out).write([EVENT]))
    assert json.loads(out.getvalue()) == EVENT.to_dict()


def test_syslog_sink_sends_the_same_object():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sink = SyslogSink(receiver.getsockname())
    asyncio.run(sink.write([EVENT]))
    sink.close()
    datagram = receiver.recv(65536).decode()
    receiver.close()
    assert datagram.startswith("<")  # a syslog priority
    assert json.loads(datagram[datagram.index("{"):].rstrip("\x00")) == EVENT.to_dict()


def test_open_sink_by_spelling(tmp_path: Path):
    store = MemoryStore()
    assert type(open_sink("store", store, tmp_path)).__name__ == "StoreSink"
    jsonl = open_sink("jsonl:rel/a.jsonl", store, tmp_path)
    assert (tmp_path / "rel" / "a.jsonl").exists()
    jsonl.close()
    with pytest.raises(ValueError):
        open_sink("kafka:x", store, tmp_path)


def test_raw_session_ids_never_reach_store_audit_or_logs(tmp_path: Path, caplog):
    """standards-checklist M.109: only a keyed hash of the ID is stored or logged."""

    async def main() -> list[str]:
        clock = Clock(1_750_000_000.0)
        store = SqliteStore(tmp_path / "db.sqlite", clock)
        gate = Gate(store, compile_policy(PolicySpec(apps=(AppSpec("a", ("a.test",), Layer({"idle": 60.0})),))),
                    AuditLog([JsonlSink(tmp_path / "audit.jsonl")]), b"k" * 32)
        ids = []
        for user in ("alice", "bob"):
            sid, _ = await gate.sign_in(user, host="a.test", ip="192.0.2.1")
            ids.append(sid)
            await gate.check(host="a.test", path="/", session_id=sid)
        clock.now += 61
        await gate.check(host="a.test", path="/", session_id=ids[0])
        await gate.check(host="a.test", path="/", session_id="forged-" + ids[1])
        await gate.revoke(gate.key_of(ids[1]), "logout")
        await gate.sweep_once()
        await store.close()
        return ids

    ids = asyncio.run(main())
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir()) + caplog.text.encode()
    for sid in ids:
        assert len(sid) >= 43  # 256 bits, base64url
        assert sid.encode() not in written
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == [
        "session.created", "session.created", "session.denied", "session.denied", "session.revoked",
    ]  # the app's 60 s passed, the session's most generous limit (the built-in 30m) did not
    assert events[2]["reason"] == "idle" and events[3]["reason"] == "unknown"
    assert events[3]["session"] not in {events[0]["session"], events[1]["session"]}


def test_secret_file_is_created_private_and_reused(tmp_path: Path):
    path = tmp_path / "state" / "secret"
    first, warnings = load_or_create(path)
    assert warnings == [] and path.stat().st_mode & 0o777 == 0o600
    again, _ = load_or_create(path)
    assert again == first and len(first.master) == 32
    assert first.session_hash_key != first.csrf_key  # one purpose, one key
    path.chmod(0o644)
    assert "chmod 600" in load_or_create(path)[1][0]
    path.write_text("not hex\n")
    with pytest.raises(SecretError, match="hex"):
        load_or_create(path)


# ------------------------------------------------------------ issue 8: sinks that lose nothing


def test_syslog_sink_speaks_rfc_5424():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sink = SyslogSink(receiver.getsockname())
    asyncio.run(sink.write([EVENT]))
    sink.close()
    datagram = receiver.recv(65536).decode()
    receiver.close()
    # <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA SP MSG
    m = re.match(r"<(\d+)>1 (\S+) (\S+) lapse (\d+) (\S+) - (.*)\Z", datagram, re.S)
    assert m, datagram
    pri, ts, _host, _pid, msgid, msg = m.groups()
    assert int(pri) // 8 == 10  # authpriv
    assert ts == EVENT.to_dict()["ts"] and msgid == EVENT.event
    assert json.loads(msg) == EVENT.to_dict()


def test_queued_sink_never_blocks_and_counts_every_drop(caplog):
    from lapse.audit import QueuedSink
    from lapse.web.metrics import Metrics

    class Stalled:
        def __init__(self):
            self.got = []
            self.gate = asyncio.Event()

        async def write(self, events):
            await self.gate.wait()
            self.got.extend(events)

        def close(self):
            pass

    async def main():
        inner = Stalled()
        sink = QueuedSink(inner, "syslog", maxsize=3)
        audit = AuditLog([sink])
        for _ in range(10):
            await asyncio.wait_for(audit.emit([EVENT]), 1)  # never waits for the stalled reader
        await asyncio.sleep(0)
        # one batch is with the stalled writer, three wait in the queue, the rest were dropped
        assert sink.dropped > 0 and sink.dropped + sink.depth + 1 == 10
        metrics = Metrics()
        metrics.watch_audit(audit)
        assert metrics.registry.get_sample_value("lapse_audit_dropped_total", {"sink": "syslog"}) == sink.dropped
        assert metrics.registry.get_sample_value("lapse_audit_events_total",
                                                 {"event": EVENT.event, "reason": EVENT.reason or ""}) == 10
        inner.gate.set()
        await asyncio.sleep(0.01)
        await audit.flush()
        assert len(inner.got) + sink.dropped == 10  # everything is either written or counted

    with caplog.at_level("WARNING", logger="lapse.audit"):
        asyncio.run(main())
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_grafana_dashboard_uses_only_exported_metrics():
    """deploy/grafana-dashboard.json (issue 8): every metric it queries is one lapse exports."""
    from pathlib import Path

    from lapse.audit import QueuedSink
    from lapse.web.metrics import Metrics

    metrics = Metrics()
    metrics.watch_audit(AuditLog([QueuedSink(StreamSink(io.StringIO()), "stdout")]))
    metrics.decided(False, "idle", 0.001)
    exported = {s.name for m in metrics.registry.collect() for s in m.samples}
    exported |= {m.name for m in metrics.registry.collect()}
    dash = json.loads((Path(__file__).resolve().parents[1] / "deploy" / "grafana-dashboard.json").read_text())
    used = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"\b(lapse_[a-z_]+)", t["expr"])}
    assert used and used <= exported | {"lapse_audit_events_total"}, used - exported


class _Slow:
    """An inner sink that takes 50 ms per event and counts what it ``sent``; with ``swallow`` its writes
    go on through a cancel (as Python 3.11's ``wait_for`` may when the awaited write finishes meanwhile)."""

    def __init__(self, swallow: bool = False):
        self.got, self.sent, self.swallow = [], 0, swallow

    async def write(self, events):
        for e in events:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if not self.swallow:
                    raise
            self.got.append(e)
            self.sent += 1

    def close(self):
        pass


def test_a_writer_that_outlives_its_cancel_is_counted_once(caplog):
    from lapse.audit import QueuedSink

    async def main():
        inner = _Slow(swallow=True)
        sink = QueuedSink(inner, "slow", flush_wait=0.12)
        await sink.write([EVENT] * 10)
        await sink.write([EVENT] * 5)
        await sink.flush()
        got_at_flush = len(inner.got)
        await asyncio.sleep(0.6)  # a writer that went on would write more now
        sink.close()
        return inner, sink, got_at_flush

    with caplog.at_level("ERROR"):
        inner, sink, got_at_flush = asyncio.run(main())
    assert len(inner.got) == got_at_flush and inner.sent == len(inner.got)
    assert len(inner.got) + sink.dropped == 15, (len(inner.got), sink.dropped)  # each once: written or dropped
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.records  # no task_done() on None


def test_events_after_close_and_a_cancelled_flush_are_counted():
    from lapse.audit import QueuedSink

    async def main():
        inner = _Slow()
        sink = QueuedSink(inner, "slow", flush_wait=10)
        await sink.write([EVENT] * 20)
        flushing = asyncio.ensure_future(sink.flush())
        await asyncio.sleep(0.12)
        flushing.cancel()  # shutdown cut short: what is left is still counted
        with pytest.raises(asyncio.CancelledError):
            await flushing
        after_flush = (len(inner.got), sink.dropped)
        sink.close()
        await sink.write([EVENT] * 3)  # after close: counted, and no new writer
        await asyncio.sleep(0.2)
        return inner, sink, after_flush

    inner, sink, (got, dropped) = asyncio.run(main())
    assert got + dropped == 20, (got, dropped)
    assert len(inner.got) == got and sink.dropped == dropped + 3 and sink._task is None


def test_a_stalled_stdout_reader_never_stalls_the_event_loop():
    """The queued sinks exist so that a slow reader never slows a request: a stdout pipe nobody reads
    fills, and the writer blocks in its own thread while the loop keeps serving; events past the queue
    are dropped and counted."""
    import os
    import threading
    import time

    from lapse.audit.sinks import QueuedSink

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", buffering=1)
    closed = threading.Lock()

    def close_reader() -> None:  # once: by the test, or by the watchdog if the loop itself got stuck
        if closed.acquire(blocking=False):
            os.close(read_end)

    watchdog = threading.Timer(5.0, close_reader)  # a blocked loop fails the test instead of hanging it
    watchdog.start()

    async def main() -> tuple[float, int]:
        sink = QueuedSink(StreamSink(stream), "stdout", maxsize=4)
        audit = AuditLog([sink])
        big = AuditEvent(1.0, "session.created", "success", "u" * 40_000)  # ~40 KB a line: the pipe fills
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            await audit.emit([big])
            await asyncio.sleep(0.01)  # the loop must come back at once, though the writer is stuck
            slowest = max(slowest, time.monotonic() - started)
        dropped = sink.dropped
        audit.close()
        close_reader()  # the blocked write fails (EPIPE): the worker thread ends, the executor can shut down
        return slowest, dropped

    try:
        slowest, dropped = asyncio.run(main())
    finally:
        watchdog.cancel()
        try:
            stream.close()
        except BrokenPipeError:
            pass
    assert slowest < 0.5 and dropped > 0


def test_a_failing_sink_costs_no_other_sink_its_events_and_fails_closed(tmp_path: Path):
    """Every sink is written, also after one fails (their order decided who lost events); then the failure
    is raised as AuditSinkFailed, a StoreUnavailable, so the request fails closed (503), never a 500."""
    full = JsonlSink(tmp_path / "audit.jsonl")
    before, after = ListSink(), ListSink()
    log = AuditLog([before, full, after])
    event = AuditEvent(1_700_000_000.0, "auth.login", "success", "alice")

    async def main():
        os.close(full._fd)
        full._fd = os.open("/dev/full", os.O_WRONLY)
        with pytest.raises(AuditSinkFailed, match=r"audit sink jsonl:.*audit\.jsonl failed: .*No space left"):
            await log.emit([event])

    asyncio.run(main())
    assert before.events == [event] and after.events == [event]
    full.close()
    full.close()  # closing twice (shutdown after a failure) is harmless

