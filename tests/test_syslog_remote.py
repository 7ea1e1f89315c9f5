"""Remote syslog sinks (``syslog:udp|tcp|tls://HOST:PORT``) against a real collector: Debian's rsyslogd.

Each test starts its own ``rsyslogd -n`` on free loopback ports (no system service), with imudp and
imtcp (plain, and TLS through the gtls driver of rsyslog-gnutls), writing every received message raw
(``%rawmsg%``: the RFC 5424 message as sent, without the octet-count frame) to a file the test reads.
A missing rsyslogd skips locally and fails under CI=true (scripts/test.sh installs it).
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lapse.audit import AuditLog, QueuedSink, open_sink
from lapse.audit.remote import UDP_MAX, StreamSyslogSink, UdpSyslogSink, parse_target
from lapse.config import ConfigError, load_config, parse_config
from lapse.core.events import AuditEvent
from lapse.store.memory import MemoryStore

from .certs import Certificate, certificate
from .support import free_port, missing, port_open

HEADER = re.compile(r"<(\d+)>1 (\S+) (\S+) lapse (\d+) (\S+) - (.*)\Z", re.S)
FAST = {"connect_timeout": 1.0, "send_timeout": 1.0, "backoff": (0.05, 0.2)}  # seconds: tests wait for nothing


def event(i: int, outcome: str = "success", **changes: str) -> AuditEvent:
    fields = {"user": "alice", "session": "ab" * 16, "app": "wiki", "ip": "192.0.2.1", "resource": f"GET /{i}",
              "reason": "idle"} | changes
    return AuditEvent(1_750_000_000.0 + i, "session.denied" if outcome == "failure" else "session.expired", outcome,
                      **fields)


# ------------------------------------------------------------------ the collector


class Rsyslog:
    """``rsyslogd -n -f CONFIG -i PIDFILE`` as this test's own process, on free loopback ports."""

    def __init__(self, folder: Path, tls: Certificate | None) -> None:
        exe = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None)
        if exe is None:
            missing("rsyslogd is not installed (scripts/test.sh installs rsyslog with apt)")
        if tls is not None and not glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so"):
            missing("rsyslog's TLS driver is not installed (scripts/test.sh installs rsyslog-gnutls with apt)")
        self.exe, self.folder, self.out = str(exe), folder, folder / "received.log"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.udp = s.getsockname()[1]
        self.tcp, self.tls = free_port(), free_port()
        certs = "" if tls is None else (f'defaultNetstreamDriverCAFile="{tls.cert}" '
                                        f'defaultNetstreamDriverCertFile="{tls.cert}" '
                                        f'defaultNetstreamDriverKeyFile="{tls.key}"')
        tls_input = "" if tls is None else (f'input(type="imtcp" port="{self.tls}" address="127.0.0.1" '
                                            'streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")')
        self.config = folder / "rsyslog.conf"
        self.config.write_text(f"""
global(workDirectory="{folder}" maxMessageSize="256k" parser.escapeControlCharactersOnReceive="off" {certs})
module(load="imudp")
module(load="imtcp" maxFrameSize="1000000")
template(name="raw" type="string" string="%rawmsg%\\n")
input(type="imudp" port="{self.udp}" address="127.0.0.1")
input(type="imtcp" port="{self.tcp}" address="127.0.0.1")
{tls_input}
if $inputname == "imudp" or $inputname == "imtcp" then {{
    action(type="omfile" file="{self.out}" template="raw")
    stop
}}
action(type="omfile" file="{folder / 'rsyslogd-own.log'}")
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-n", "-f", str(self.config), "-i", str(self.folder / "rsyslogd.pid")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.folder / "rsyslogd.err", "ab"))
        deadline = time.monotonic() + 10
        while not (port_open(self.tcp) and (not self.tls_on or port_open(self.tls))):
            assert self.proc.poll() is None, (self.folder / "rsyslogd.err").read_text()
            assert time.monotonic() < deadline, "rsyslogd did not open its ports"
            time.sleep(0.01)

    @property
    def tls_on(self) -> bool:
        return "gtls" in self.config.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def lines(self) -> list[str]:
        return self.out.read_text("utf-8").splitlines() if self.out.exists() else []


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Callable[..., Rsyslog]]:
    started: list[Rsyslog] = []

    def start(tls: Certificate | None = None) -> Rsyslog:
        started.append(Rsyslog(tmp_path, tls))
        return started[-1]

    yield start
    for r in started:
        r.stop()


async def deliver(sink: QueuedSink, events: list[AuditEvent], collector: Rsyslog) -> None:
    """Emit ``events`` one by one through ``sink``, flush, and wait until the collector has them all."""
    audit = AuditLog([sink])
    for e in events:
        await audit.emit([e])
    await audit.flush()
    await wait_for(lambda: len(collector.lines()) >= len(events), "the messages")
    assert sink.dropped == 0
    audit.close()


async def wait_for(check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll ``check`` with a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def parsed(line: str) -> tuple[int, str, dict]:
    """(PRI, MSGID, JSON body) of a received RFC 5424 message, after checking its header."""
    m = HEADER.match(line)
    assert m, line
    pri, ts, host, _pid, msgid, msg = m.groups()
    body = json.loads(msg)
    assert ts == body["ts"] and host != "-"
    return int(pri), msgid, body


def assert_delivered(lines: list[str], events: list[AuditEvent]) -> None:
    """Every event arrived once, in order, with authpriv PRI, MSGID = event name, body = to_dict()."""
    got = [parsed(line) for line in lines]
    assert [body for _, _, body in got] == [e.to_dict() for e in events]
    for (pri, msgid, _), e in zip(got, events, strict=True):
        assert pri == (86 if e.outcome == "success" else 85)  # authpriv (10) * 8 + info (6) / notice (5)
        assert msgid == e.event


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lapse.audit" and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ UDP (RFC 5426)


def test_udp_one_message_per_datagram_and_nothing_cut(rsyslog, tmp_path: Path, caplog) -> None:
    collector = rsyslog()
    events = [event(i, "failure" if i % 3 == 0 else "success") for i in range(20)]
    big = event(99, resource="GET /" + "x" * 60_000)  # fits in a datagram: arrives whole
    too_big = event(100, resource="GET /" + "y" * UDP_MAX)  # cannot: not cut, counted and logged

    async def main() -> QueuedSink:
        sink = open_sink(f"syslog:udp://127.0.0.1:{collector.udp}", MemoryStore(), tmp_path)
        assert isinstance(sink, QueuedSink) and isinstance(sink.inner, UdpSyslogSink)
        audit = AuditLog([sink])
        deadline = time.monotonic() + 5
        while not collector.lines():  # imudp may bind a moment after imtcp: wait for a first datagram
            assert time.monotonic() < deadline, "rsyslogd never received a datagram"
            await audit.emit([event(-1)])
            await asyncio.sleep(0.02)
        before = len(collector.lines())
        for e in events:
            await audit.emit([e])
        await audit.emit([big, too_big])
        await audit.flush()
        await wait_for(lambda: len(collector.lines()) >= before + len(events) + 1, "the datagrams")
        assert_delivered([x for x in collector.lines() if '"resource":"GET /-1"' not in x], [*events, big])
        audit.close()
        return sink

    with caplog.at_level(logging.WARNING, logger="lapse.audit"):
        sink = asyncio.run(main())
    assert sink.dropped == 1
    assert any("larger than a UDP datagram" in m for m in warnings_of(caplog))


# ------------------------------------------------------------------ TCP (RFC 6587 octet counting)


def test_tcp_in_order_with_non_ascii_and_a_long_body(rsyslog, tmp_path: Path) -> None:
    collector = rsyslog()
    events = [event(i, "failure" if i % 4 == 0 else "success") for i in range(300)]
    events[7] = event(7, user="Zoë 東京 \U0001f512", resource="GET /caf\u00e9?q=\u2603")
    events[150] = event(150, resource="POST /" + "é" * 100_000)  # 200 kB of UTF-8: more than any datagram

    async def main() -> None:
        sink = open_sink(f"syslog:tcp://127.0.0.1:{collector.tcp}", MemoryStore(), tmp_path)
        assert isinstance(sink, QueuedSink) and isinstance(sink.inner, StreamSyslogSink)
        await deliver(sink, events, collector)

    asyncio.run(main())
    assert_delivered(collector.lines(), events)


def test_tcp_reconnects_after_the_collector_restarts(rsyslog, caplog) -> None:
    """Events while the collector is down are dropped and counted (no buffering); one warning per outage."""
    collector = rsyslog()

    async def main() -> tuple[list[AuditEvent], set[AuditEvent]]:
        sink = QueuedSink(StreamSyslogSink(parse_target(f"syslog:tcp://127.0.0.1:{collector.tcp}"), **FAST), "t")
        audit = AuditLog([sink])
        sent = [event(i) for i in range(5)]
        for n, e in enumerate(sent, 1):  # one batch each, so the last batch before the stop is one event
            await audit.emit([e])
            await wait_for(lambda n=n: len(collector.lines()) == n, "the first events")
        collector.stop()
        outage = [event(i) for i in range(5, 10)]
        for e in outage:
            await audit.emit([e])
            await wait_for(lambda: sink.depth == 0, "the writer")
        # 5 during the outage, and 1 more: the last batch written on the connection the collector closed
        # (event 4) counts as dropped too, conservatively: lapse cannot know it was read (it was, here)
        await wait_for(lambda: sink.dropped == 6, "the drops")
        collector.start()
        i, deadline = 10, time.monotonic() + 5
        while len(collector.lines()) == 5:  # lapse reconnects by itself: probe until one arrives
            assert time.monotonic() < deadline, "lapse did not reconnect"
            sent.append(event(i))
            await audit.emit([sent[-1]])
            await asyncio.sleep(0.01)
            i += 1
        for _ in range(5):
            sent.append(event(i))
            await audit.emit([sent[-1]])
            i += 1
        await audit.flush()
        audit.close()
        # delivered: all sent but the dropped, plus event 4, counted as dropped and delivered
        await wait_for(lambda: len(collector.lines()) == len(sent) + 5 + 1 - sink.dropped, "the rest")
        return sent, set(outage)

    with caplog.at_level(logging.INFO, logger="lapse.audit"):
        sent, outage = asyncio.run(main())
    bodies = [parsed(line)[2] for line in collector.lines()]
    delivered = [e for e in sent if e.to_dict() in bodies]
    assert bodies == [e.to_dict() for e in delivered]  # once each, in order
    assert not any(e.to_dict() in bodies for e in outage)
    assert sent[-5:] == delivered[-5:]  # after the reconnect nothing is lost
    lost = warnings_of(caplog)
    assert len([m for m in lost if "unreachable" in m]) == 1, lost  # one line for the outage
    assert len([m for m in lost if "collector back" in m]) == 1, lost
    assert len(lost) == 2, lost


@pytest.mark.parametrize(("send_timeout", "flush_wait", "said"), [(0.2, 5.0, "timed out"), (5.0, 0.5, "not written within")])
def test_a_stalled_collector_costs_a_bounded_wait(caplog, send_timeout: float, flush_wait: float, said: str) -> None:
    """A collector that accepts and never reads: a send times out, or shutdown stops waiting; all counted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def main() -> tuple[QueuedSink, float]:
        inner = StreamSyslogSink(parse_target(f"syslog:tcp://127.0.0.1:{port}"), **{**FAST, "send_timeout": send_timeout})
        sink = QueuedSink(inner, "stalled", flush_wait=flush_wait)
        audit = AuditLog([sink])
        for i in range(300):
            await audit.emit([event(i, resource="GET /" + "z" * 50_000)])  # 15 MB: more than socket buffers
        started = time.monotonic()
        await audit.flush()
        took = time.monotonic() - started
        audit.close()
        return sink, took

    try:
        with caplog.at_level(logging.WARNING, logger="lapse.audit"):
            sink, took = asyncio.run(main())
    finally:
        listener.close()
    assert took < min(send_timeout, flush_wait) + 1.0
    assert 0 < sink.dropped < 300  # some reached the kernel's buffers, the rest is counted
    assert sink.depth == 0
    assert any(said in m for m in warnings_of(caplog)), warnings_of(caplog)


# ------------------------------------------------------------------ TLS (RFC 5425)


def test_tls_verified_in_order(rsyslog, tmp_path: Path) -> None:
    cert = certificate(tmp_path, "collector", names="IP:127.0.0.1")
    collector = rsyslog(cert)
    events = [event(i, "failure" if i % 2 else "success") for i in range(50)]
    events[3] = event(3, user="Zoë", resource="GET /" + "ü" * 20_000)

    async def main() -> None:
        sink = open_sink(f"syslog:tls://127.0.0.1:{collector.tls}?ca=collector.pem", MemoryStore(), tmp_path)
        assert isinstance(sink, QueuedSink) and sink.name == f"syslog:tls://127.0.0.1:{collector.tls}"
        await deliver(sink, events, collector)

    asyncio.run(main())
    assert_delivered(collector.lines(), events)


@pytest.mark.parametrize("wrong", ["ca", "host"])
def test_tls_refuses_a_wrong_ca_or_host_name(rsyslog, tmp_path: Path, caplog, wrong: str) -> None:
    cert = certificate(tmp_path, "collector", names="IP:127.0.0.1")
    other = certificate(tmp_path, "other", names="IP:127.0.0.1")
    collector = rsyslog(cert)
    host, ca = ("127.0.0.1", other.cert) if wrong == "ca" else ("localhost", cert.cert)

    async def main() -> QueuedSink:
        sink = QueuedSink(StreamSyslogSink(parse_target(f"syslog:tls://{host}:{collector.tls}?ca={ca}", tmp_path),
                                           **FAST), "tls")
        audit = AuditLog([sink])
        for i in range(5):
            await audit.emit([event(i)])
        await audit.flush()
        audit.close()
        return sink

    with caplog.at_level(logging.WARNING, logger="lapse.audit"):
        sink = asyncio.run(main())
    assert sink.dropped == 5 and collector.lines() == []
    lost = warnings_of(caplog)
    assert len(lost) == 1 and "certificate verify failed" in lost[0], lost
    assert ("self-signed" if wrong == "ca" else "Hostname mismatch") in lost[0], lost


# ------------------------------------------------------------------ the spellings in lapse.toml

SPELLING_ERRORS = [
    ('[audit]\nsinks = ["store", "syslog:http://h:514"]\n', "unknown transport 'http'"),
    ('[audit]\nsinks = ["store", "syslog:tcp://collector.test"]\n', "port is required"),
    ('[audit]\nsinks = ["store", "syslog:tcp://[::1]"]\n', "port is required"),
    ('[audit]\nsinks = ["store", "syslog:udp://::1:514"]\n', "brackets"),
    ('[audit]\nsinks = ["store", "syslog:udp://h:0"]\n', "out of range"),
    ('[audit]\nsinks = ["store", "syslog:tcp://h:514?ca=x.pem"]\n', "only syslog:tls://"),
    ('[audit]\nsinks = ["store", "syslog:tls://[nope]:6514"]\n', "not an IPv6 address"),
    ('[audit]\nsinks = ["store", "syslog:tcp://a:1", "syslog:tcp://A:1"]\n', "same sink"),
]


@pytest.mark.parametrize(("text", "fragment"), SPELLING_ERRORS, ids=[c[1] for c in SPELLING_ERRORS])
def test_bad_spellings_name_the_key_and_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="lapse.toml")
    (problem,) = caught.value.problems
    index = 2 if fragment == "same sink" else 1
    assert (problem.path, problem.line) == (f"audit.sinks[{index}]", 2), problem
    assert fragment in problem.message, problem.message


def test_an_unreadable_ca_is_a_config_error_and_a_good_one_resolves(tmp_path: Path) -> None:
    config = tmp_path / "lapse.toml"
    config.write_text('[audit]\nsinks = [\n  "store",\n  "syslog:tls://collector.test:6514?ca=certs/ca.pem",\n]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    (problem,) = caught.value.problems
    assert (problem.path, problem.line) == ("audit.sinks[1]", 4), problem
    assert "ca=" in problem.message and "certs/ca.pem" in problem.message
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="audit.sinks"):
        load_config(config)
    ca = certificate(tmp_path / "certs", "ca")
    loaded = load_config(config)
    (_, remote) = loaded.config.audit.parsed_sinks
    assert remote.kind == "syslog" and remote.target is not None
    assert (remote.target.transport, remote.target.host, remote.target.port, remote.target.ca) == (
        "tls", "collector.test", 6514, ca.cert)


def test_ipv6_literals_and_the_local_form_unchanged() -> None:
    t = parse_target("syslog:udp://[2001:db8::1]:514")
    assert (t.host, t.port, t.name) == ("2001:db8::1", 514, "syslog:udp://[2001:db8::1]:514")
    cfg = parse_config('[audit]\nsinks = ["syslog", "syslog:tcp://[::1]:514"]\n', source="lapse.toml").config
    assert [(s.kind, s.target) for s in cfg.audit.parsed_sinks][0] == ("syslog", None)


# ------------------------------------------------------------------ collectors that are not rsyslog


def test_a_collector_that_accepts_and_closes_loses_nothing_uncounted(caplog) -> None:
    """A TCP load balancer without a healthy backend accepts and closes: every event counted as dropped
    (the batch written on a closed connection too: it may not have been read), one warning, and the
    reconnects go through the backoff, not one per batch."""
    accepted: list[float] = []

    async def main() -> tuple[QueuedSink, StreamSyslogSink]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(time.monotonic())
            await asyncio.sleep(0.01)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        inner = StreamSyslogSink(parse_target(f"syslog:tcp://127.0.0.1:{port}"), **{**FAST, "backoff": (0.1, 0.4)})
        sink = QueuedSink(inner, "lb")
        audit = AuditLog([sink])
        for i in range(40):
            await audit.emit([event(i)])
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.05)  # the last connection too has been closed by the time of shutdown
        await audit.flush()
        audit.close()
        server.close()
        await server.wait_closed()
        return sink, inner

    with caplog.at_level(logging.INFO, logger="lapse.audit"):
        sink, inner = asyncio.run(main())
    assert inner.sent == 0 and sink.dropped == 40, (inner.sent, sink.dropped)  # nothing vanishes
    lost = warnings_of(caplog)
    assert len(lost) == 1 and "unreachable" in lost[0] and "closed the connection" in lost[0], lost
    assert 2 <= len(accepted) < 15, accepted  # ~1.2 s of 0.1, 0.2, 0.4, 0.4 s waits, not 40 connections
    gaps = [b - a for a, b in zip(accepted, accepted[1:], strict=False)]
    assert min(gaps) >= 0.1 * 0.8, gaps


def test_shutdown_counts_what_a_slow_collector_did_not_take() -> None:
    """Events still in asyncio's buffer at shutdown are not ``sent``: sent + dropped == emitted, and the
    collector receives exactly the ``sent`` ones."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received = bytearray()

    def collector() -> None:  # a slow reader, in a thread: it reads on after lapse has stopped
        conn, _ = listener.accept()
        conn.settimeout(1.0)  # lapse's process would have exited: its socket may not say so here
        with conn:
            try:
                while chunk := conn.recv(4096):
                    received.extend(chunk)
                    time.sleep(0.002)
            except TimeoutError:
                pass

    import threading

    reader = threading.Thread(target=collector, daemon=True)
    reader.start()

    async def main() -> tuple[QueuedSink, StreamSyslogSink]:
        inner = StreamSyslogSink(parse_target(f"syslog:tcp://127.0.0.1:{port}"), **{**FAST, "send_timeout": 5.0})
        sink = QueuedSink(inner, "slow", flush_wait=0.3)
        audit = AuditLog([sink])
        for i in range(200):
            await audit.emit([event(i, resource="GET /" + "s" * 20_000)])  # 4 MB
        await audit.flush()
        audit.close()
        return sink, inner

    try:
        sink, inner = asyncio.run(main())
        reader.join(30)
    finally:
        listener.close()
    assert not reader.is_alive()
    frames, rest = 0, bytes(received)
    while rest:  # complete octet-counted frames only: a message cut at shutdown was not sent
        length, sep, tail = rest.partition(b" ")
        if not sep or len(tail) < int(length):
            break
        frames, rest = frames + 1, tail[int(length):]
    assert 0 < sink.dropped < 200 and inner.sent + sink.dropped == 200, (inner.sent, sink.dropped)
    assert frames == inner.sent, (frames, inner.sent)


def test_one_bad_event_costs_only_itself_and_a_lone_surrogate_is_no_bad_event() -> None:
    lines: list[bytes] = []

    async def main() -> QueuedSink:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                lines.append(data)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        inner = StreamSyslogSink(parse_target(f"syslog:tcp://127.0.0.1:{port}"), **FAST)
        formats = inner.format

        def format_(e: AuditEvent) -> bytes:
            if e.resource == "GET /1":
                raise RuntimeError("cannot format this one")
            return formats(e)

        inner.format = format_
        sink = QueuedSink(inner, "bad")
        await sink.write([event(0), event(1), event(2), event(3, user="\ud800 lone")])  # one batch
        await asyncio.wait_for(sink._queue.join(), 5)  # type: ignore[union-attr]
        await wait_for(lambda: b"".join(lines).count(b" session.expired - ") >= 3, "the good events")
        await sink.flush()
        sink.close()
        server.close()
        return sink

    sink = asyncio.run(main())
    got = b"".join(lines)
    assert sink.dropped == 1 and got.count(b" session.expired - ") == 3  # events 0, 2, 3: once each
    assert b"\\ud800 lone" in got  # the lone surrogate escaped, not a lost batch


def test_udp_counts_what_it_sent() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    sink = UdpSyslogSink(parse_target(f"syslog:udp://127.0.0.1:{receiver.getsockname()[1]}"))
    try:
        asyncio.run(sink.write([event(0), event(1), event(2)]))
    finally:
        sink.close()
        receiver.close()
    assert sink.sent == 3


def test_tls_refuses_a_certificate_that_names_the_host_only_in_its_cn(tmp_path: Path, caplog) -> None:
    cert = certificate(tmp_path, "localhost", names=None)  # CN=localhost, no subjectAltName
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)

    async def main() -> QueuedSink:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        sink = QueuedSink(StreamSyslogSink(parse_target(f"syslog:tls://localhost:{port}?ca={cert.cert}"), **FAST), "cn")
        audit = AuditLog([sink])
        for i in range(3):
            await audit.emit([event(i)])
        await audit.flush()
        audit.close()
        server.close()
        return sink

    with caplog.at_level(logging.WARNING, logger="lapse.audit"):
        sink = asyncio.run(main())
    assert sink.dropped == 3
    lost = warnings_of(caplog)
    assert len(lost) == 1 and "certificate verify failed" in lost[0], lost


@pytest.mark.parametrize("spec", ["syslog:tls://admin:hunter2@host:6514", "syslog:tcp://admin:hun/ter2@host:514",
                                  "syslog:tls://admin:hun?ter2@host:6514", "syslog:tcp://hunter2@host:514"])
def test_a_password_in_a_syslog_address_is_refused_and_never_echoed(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[audit]\nsinks = ["store", "{spec}"]\n', source="lapse.toml")
    (problem,) = caught.value.problems
    assert "hunter2" not in str(caught.value) and "ter2" not in problem.message, problem.message
    assert "***" in problem.message and "no user name or password" in problem.message, problem.message
