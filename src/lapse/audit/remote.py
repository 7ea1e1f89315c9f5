"""Remote syslog sinks: ``syslog:udp://``, ``syslog:tcp://``, ``syslog:tls://`` (docs/audit.md).

An extension beyond CONTRACT.md's ``syslog`` (the local ``/dev/log`` datagrams, unchanged): audit
trails belong on a central collector, where an intruder on this host cannot rewrite them. Same RFC
5424 message as ``syslog``; only the transport differs:

- ``udp`` (RFC 5426): one message per datagram, fire and forget. A message larger than a datagram
  can carry (``UDP_MAX`` bytes) is not sent (never truncated: cut JSON is no record) and is counted
  as dropped, with a log line.
- ``tcp`` (RFC 6587 octet counting, ``LEN SP MSG``) and ``tls`` (RFC 5425: the same framing in TLS,
  the server's certificate checked against the system CAs or ``?ca=PATH``, and its host name).

The sinks run in ``QueuedSink``'s writer task, so every wait here (name lookup, connect, TLS
handshake, send) is an ``await`` with a timeout: the event loop and the requests never wait for the
collector. Stream connections are made on first use, and after a failure again no sooner than a
backoff (doubling up to ``BACKOFF_MAX``); events that come meanwhile are dropped and counted
(``SinkError``). An outage is logged twice: a warning when it starts, a line when the collector is
back that says how many events it cost. (``lapse.outage.OutageLog`` repeats itself every 10 s while
refusals go on and keys on the message; here the connection state says exactly when an outage
starts and ends, so one warning is enough.)
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl

from ..core.events import AuditEvent

log = logging.getLogger("lapse.audit")

UDP_MAX = 65_507  # bytes in one UDP datagram over IPv4 (65,535 - 8 UDP - 20 IP header)
CONNECT_TIMEOUT = 5.0  # seconds for a name lookup, a connect, a TLS handshake
SEND_TIMEOUT = 5.0  # seconds a write may wait for the collector to take it
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # seconds between connection attempts after a failure

SPELLING = '"syslog:udp://HOST:PORT", "syslog:tcp://HOST:PORT" or "syslog:tls://HOST:PORT[?ca=PATH]"'
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


class SyslogFormat:
    """RFC 5424 ``<PRI>1 TIMESTAMP HOSTNAME lapse PROCID MSGID - MSG``, facility authpriv.

    MSGID is the event name, MSG the same JSON object every sink gets (UTF-8). Severity: info for
    ``success``, notice for ``failure`` (a collector can alert on notice without parsing JSON).
    """

    FACILITY = 10  # authpriv

    def __init__(self) -> None:
        self.host = _header_token(socket.gethostname(), 255)
        self.pid = str(os.getpid())

    def format(self, e: AuditEvent) -> bytes:
        severity = 6 if e.outcome == "success" else 5
        d = e.to_dict()
        header = f"<{self.FACILITY * 8 + severity}>1 {d['ts']} {self.host} lapse {self.pid} {_header_token(e.event, 32)} -"
        return (header + " " + json.dumps(d, separators=(",", ":"), ensure_ascii=False)).encode("utf-8", "backslashreplace")


def _header_token(value: str, limit: int) -> str:
    """A header field of RFC 5424: printable US-ASCII without spaces, or ``-``."""
    token = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return token or "-"


class SinkError(Exception):
    """``unsent`` events of a batch were not written; ``logged``: the sink already said why."""

    def __init__(self, message: str, unsent: int, *, logged: bool = False) -> None:
        super().__init__(message)
        self.unsent, self.logged = unsent, logged


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """A parsed ``syslog:SCHEME://HOST:PORT[?ca=PATH]``; ``ca`` resolved against the config's folder."""

    transport: Literal["udp", "tcp", "tls"]
    host: str
    port: int
    ca: Path | None = None

    @property
    def name(self) -> str:
        """The sink's name in logs and metrics: the address without the query (CA paths are not news)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"syslog:{self.transport}://{host}:{self.port}"


def parse_target(spec: str, base: Path | None = None) -> SyslogTarget:
    """``syslog:udp|tcp|tls://HOST:PORT``: ValueError says what is wrong.

    With ``base`` (the config file's folder) a ``ca`` file is resolved and loaded now, so an
    unreadable CA is a config error at start, not a silent outage later.
    """
    rest = spec[len("syslog:") :] if spec.startswith("syslog:") else spec
    scheme, sep, after = rest.partition("://")
    if sep and "@" in after.split("?ca=", 1)[0]:  # before anything else, which could quote a part of it
        raise ValueError("no user name or password goes in a syslog address (syslog has none): remove USER[:PASSWORD]@")
    if not sep or scheme not in ("udp", "tcp", "tls"):
        raise ValueError(f"unknown transport {scheme!r}: expected {SPELLING}")
    netloc = after[: next((i for i, c in enumerate(after) if c in "/?#"), len(after))]
    path, _, query_text = after[len(netloc) :].partition("?")
    if path not in ("", "/") or "#" in query_text:
        raise ValueError(f"nothing goes after HOST:PORT but ?ca=PATH: expected {SPELLING}")
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(\d*))?", netloc)
    plain = re.fullmatch(r"([^:\[\]]*)(?::(\d*))?", netloc)
    if bracketed:
        host, port = bracketed.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] is not an IPv6 address") from None
    elif plain:
        host, port = plain.groups()
        if not host:
            raise ValueError(f"the host is missing: expected {SPELLING}")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad host {host!r}")
    elif netloc.count(":") > 1:
        raise ValueError(f"an IPv6 address goes in brackets: syslog:{scheme}://[ADDRESS]:PORT")
    else:
        raise ValueError(f"bad address {netloc!r}: expected {SPELLING}")
    if not port:
        raise ValueError(f"the port is required ({scheme}://HOST:PORT; collectors often listen on 514, TLS on 6514)")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (1-65535)")
    ca: Path | None = None
    try:
        query = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
    except ValueError:
        raise ValueError(f"bad query {query_text!r}: expected ?ca=PATH") from None
    for key, value in query:
        if key != "ca" or scheme != "tls":
            raise ValueError(f"unknown option {key!r}: only syslog:tls:// takes one, ?ca=PATH")
        if ca is not None or not value:
            raise ValueError("?ca= takes one file (PEM)")
        ca = Path(value).expanduser()
        if base is not None and not ca.is_absolute():
            ca = Path(os.path.normpath(base.absolute() / ca))
    if ca is not None and base is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ca={ca}: cannot load it as PEM CA certificates: {exc.strerror or exc}") from None
    return SyslogTarget(scheme, host, int(port), ca)  # type: ignore[arg-type]


_USERINFO = re.compile(r"://.*@")  # greedy, to the last "@": more hidden rather than less


def redact(spec: str) -> str:
    """A sink spelling as given, for messages, with anything that looks like USER[:PASSWORD]@ replaced by ``***``."""
    return _USERINFO.sub("://***@", spec, count=1)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class _Outage:
    """Whether the collector is lost: one warning when that starts, one line when it ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.since: float | None = None
        self.dropped = 0

    def failed(self, exc: BaseException, dropped: int) -> None:
        self.dropped += dropped
        if self.since is None:
            self.since = time.monotonic()
            log.warning("audit sink %s: collector unreachable (%s); events are dropped and counted "
                        "(lapse_audit_dropped_total) until it is back", self.name, _describe(exc))

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("audit sink %s: collector back after %.1f s; %d event(s) dropped meanwhile",
                        self.name, time.monotonic() - self.since, self.dropped)
            self.since, self.dropped = None, 0


class UdpSyslogSink:
    """RFC 5426: one RFC 5424 message per datagram to a remote collector."""

    def __init__(self, target: SyslogTarget, *, timeout: float = CONNECT_TIMEOUT) -> None:
        self.target, self.timeout = target, timeout
        self.format = SyslogFormat().format
        self._outage = _Outage(target.name)
        self._sock: socket.socket | None = None
        self._addr: tuple[str, int] | tuple[str, int, int, int] | None = None
        self.sent = 0  # datagrams handed to the kernel (QueuedSink: what a cancelled batch did send)

    async def write(self, events: Sequence[AuditEvent]) -> None:
        loop = asyncio.get_running_loop()
        if self._sock is None:
            try:  # the name is looked up once, off the loop; again after a send fails
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_DGRAM), self.timeout)
            except (OSError, TimeoutError) as exc:
                self._outage.failed(exc, len(events))
                raise SinkError(f"cannot resolve {self.target.host}: {_describe(exc)}", len(events), logged=True) from exc
            family, _, _, _, addr = infos[0]
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
            self._addr = addr
        too_big = 0
        for i, e in enumerate(events):
            data = self.format(e)
            if len(data) > UDP_MAX:
                too_big += 1
                continue
            try:
                await asyncio.wait_for(loop.sock_sendto(self._sock, data, self._addr), self.timeout)
                self.sent += 1
            except (OSError, TimeoutError) as exc:
                self.close()
                self._outage.failed(exc, len(events) - i)
                raise SinkError(f"send failed: {_describe(exc)}", len(events) - i + too_big, logged=not too_big) from exc
        self._outage.recovered()
        if too_big:
            raise SinkError(f"{too_big} event(s) larger than a UDP datagram ({UDP_MAX} bytes) not sent; "
                            "use syslog:tcp:// or syslog:tls:// for large events", too_big)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._addr = None


class StreamSyslogSink:
    """RFC 6587 octet counting (``LEN SP MSG``) over TCP, or over TLS (RFC 5425), with reconnects.

    TCP acknowledges nothing to the application: events written just as the collector dies sit in
    the kernel's buffer and can be lost. A closed connection is noticed before each batch (the
    collector never sends, so end-of-stream means it left), and ``TCP_USER_TIMEOUT`` bounds how long
    unacknowledged data may wait, so that window stays small. Counting is conservative: the events
    of the last batch written on a connection the collector then closed are counted as dropped (they
    may not have been read), and a connection proves the collector is back only once it has carried
    a batch and is found still open at the next one (a load balancer without a healthy backend, or a
    TLS 1.3 collector that rejects the client after its handshake, accepts and then closes).
    """

    def __init__(self, target: SyslogTarget, *, connect_timeout: float = CONNECT_TIMEOUT,
                 send_timeout: float = SEND_TIMEOUT, backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX)) -> None:
        self.target = target
        self.format = SyslogFormat().format
        self.connect_timeout, self.send_timeout = connect_timeout, send_timeout
        self.backoff_min, self.backoff_max = backoff
        self._ssl: ssl.SSLContext | None = None
        if target.transport == "tls":
            self._ssl = ssl.create_default_context(cafile=str(target.ca) if target.ca else None)
            self._ssl.hostname_checks_common_name = False  # a certificate without a SAN does not pass on its CN
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._retry_at = -float("inf")
        self._delay = self.backoff_min
        self._outage = _Outage(target.name)
        self._unconfirmed = 0  # events of the last batch on this connection, until it is found still open
        self.sent = 0  # messages handed to the connection and not found lost since (QueuedSink's accounting)

    def _open(self) -> bool:
        """Whether the current connection is still open (the collector never sends: end of stream means it left)."""
        if self._writer is None or self._reader is None:
            return False
        return not (self._reader.at_eof() or self._reader.exception() is not None or self._writer.is_closing())

    def _backoff(self) -> None:
        self._retry_at = time.monotonic() + self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self.backoff_max)

    def _confirm(self) -> None:
        """The connection carried a batch and is still open: the collector is back."""
        if self._unconfirmed:
            self._unconfirmed = 0
            self._delay = self.backoff_min
            self._outage.recovered()

    def _lost(self) -> int:
        """The collector closed the connection: close it, retry after the backoff; the events of its
        last batch count as dropped (conservative: they may not have been read). Returns how many."""
        lost, self._unconfirmed = self._unconfirmed, 0
        self.sent -= lost
        self.close()
        self._backoff()
        return lost

    async def _connected(self) -> BaseException | None:
        """Connected (None), or why not. A connection is proven, or found closed, at the next batch."""
        for _ in range(2):  # let the loop read what came in (an end of stream) before deciding
            await asyncio.sleep(0)
        if self._writer is not None:
            if self._open():
                self._confirm()
                return None
            lost = self._lost()
            raise _Closed(lost)
        if time.monotonic() < self._retry_at:
            return ConnectionError(f"waiting {self._delay:.1f} s before the next attempt")
        try:
            self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(
                self.target.host, self.target.port, ssl=self._ssl,
                server_hostname=self.target.host if self._ssl else None,
                ssl_handshake_timeout=self.connect_timeout if self._ssl else None), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self._backoff()
            return exc
        sock = self._writer.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.send_timeout * 1000))
        # drain() returns only once the data is in the kernel, not in asyncio's buffer (lost at shutdown).
        # Under TLS this is the TLS layer's buffer; the TCP transport below it may still hold a record.
        # (3.11's TLS layer pauses at size >= high, so high=0 would pause it for good: there high=1, low=0.)
        self._writer.transport.set_write_buffer_limits(high=1 if self._ssl else 0, low=0)
        return None  # not yet the end of an outage: that is when this connection has carried a batch and survived

    async def write(self, events: Sequence[AuditEvent]) -> None:
        try:
            why = await self._connected()
        except _Closed as closed:
            exc = ConnectionError("the collector closed the connection")
            self._outage.failed(exc, len(events) + closed.lost)
            raise SinkError(f"not connected: {_describe(exc)}" + (
                f" ({closed.lost} event(s) of the batch before counted as dropped: they may not have been read)"
                if closed.lost else ""), len(events) + closed.lost, logged=True) from None
        if why is not None:
            self._outage.failed(why, len(events))
            raise SinkError(f"not connected: {_describe(why)}", len(events), logged=True)
        assert self._writer is not None
        bad = 0  # events that cannot be formatted: each counted as dropped, the rest of the batch still sent
        for i, e in enumerate(events):
            try:
                message = self.format(e)
            except Exception:  # noqa: BLE001 - one bad event must not cost (or count twice) the others
                log.exception("audit sink %s: cannot format an event", self.target.name)
                bad += 1
                continue
            try:
                self._writer.write(b"%d " % len(message) + message)
                await asyncio.wait_for(self._writer.drain(), self.send_timeout)
            except (OSError, TimeoutError) as exc:
                self.close()
                self._retry_at = -float("inf")  # the first attempt after a lost connection is at once
                self._outage.failed(exc, len(events) - i)
                raise SinkError(f"send failed: {_describe(exc)}", len(events) - i + bad, logged=True) from exc
            self.sent += 1
            self._unconfirmed += 1
        if bad:
            raise SinkError(f"{bad} event(s) could not be formatted", bad, logged=True)

    async def settle(self) -> int:
        """At shutdown, after the last batch: if the collector has closed the connection, the events of
        that batch count as dropped (returned, and logged once per outage); if it is open, it is proven."""
        if self._writer is None or not self._unconfirmed:
            return 0
        for _ in range(2):
            await asyncio.sleep(0)
        if self._open():
            self._confirm()
            return 0
        lost = self._lost()
        self._outage.failed(ConnectionError("the collector closed the connection"), lost)
        return lost

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class _Closed(Exception):
    """The collector closed the connection; ``lost``: events of its last batch, now counted as dropped."""

    def __init__(self, lost: int) -> None:
        super().__init__(lost)
        self.lost = lost
