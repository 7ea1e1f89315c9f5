"""A ``[[postgres]]`` listener: PostgreSQL connections held to a lapse session's clock.

Theory of operation:

1. The client's startup packet tells the user and database. ``SSLRequest`` is
   answered ``S`` when the listener has a certificate (``tls_cert``, ``tls_key``):
   the client side of the connection becomes TLS in place and the startup goes on,
   encrypted; without one, ``N`` (the client goes on in plain text, or gives up if
   it demands TLS). ``GSSENCRequest`` is always ``N``; each request at most once.
   With ``tls_required`` a plain startup packet is refused (FATAL 28000, as a
   ``hostssl`` line would). The hop to the server stays plain TCP: lapse runs beside
   the database. ``CancelRequest`` is passed to the server as it came.
   Until ReadyForQuery the client has ``AUTH_TIMEOUT`` seconds and messages of at most
   ``protocol.MAX_AUTH_MESSAGE`` bytes; breaking either is a FATAL 08P01 (protocol_violation).
2. Authentication is PostgreSQL's own, passed through: lapse relays the
   exchange (SCRAM, md5, password, trust) and holds no database credentials.
   When the server says ``AuthenticationOk``, lapse signs the user in -- one
   lapse session per connection, named by the PostgreSQL role -- and judges it
   like a request to an app (allow rules, networks, org ceiling). Refused: an
   ``ErrorResponse`` FATAL 28000 instead of the ``AuthenticationOk``.
3. Then messages pass both ways. Client messages that make the server execute
   something (a non-empty query, an execute, a function call, COPY data during a
   COPY into the server) are activity (``_Activity``); server messages never are.
   A monitor (``lapse.monitor``) sleeps until the deadline; ``warn_before`` ahead of it the client gets a NoticeResponse
   ("this session will end in N seconds for inactivity"); at it an
   ErrorResponse FATAL, SQLSTATE 57P05 (idle) or 57P01 (absolute, revoked).
   A revocation anywhere cuts within a second. The server's side is cut first: a
   CancelRequest with the connection's BackendKeyData stops a running query (so it
   cannot commit after the cut), then Terminate and an abort. Nothing at the cut
   waits on the client: warnings are skipped when it is not reading, the FATAL has
   ``SAY_TIMEOUT`` seconds to leave, then the connection is aborted.
4. The session ends with the connection: ``session.expired`` (idle, absolute)
   when lapse cut it, ``session.revoked`` reason ``logout`` when the client
   left; ``connection.terminated`` with the reason when lapse cut it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import struct
from collections.abc import Callable
from typing import Literal

from ..config import Config, Postgres, parse_listen, postgres_host
from ..core.addresses import block
from ..core.device import from_application_name
from ..enforce import Gate
from ..monitor import Connections, Facts, Monitor
from ..outage import OutageLog
from ..store.base import StoreUnavailable
from . import protocol as pg
from .tls import ServerTls

log = logging.getLogger("lapse.postgres")

ACTIVE = frozenset(b"QEF")  # Query (unless empty), Execute, FunctionCall; and CopyData in COPY (_Activity)
NO_SQL = re.compile(rb"(?:\s|;|--[^\n]*(?:\n|\Z)|/\*(?:[^*]|\*(?!/))*\*/)*\x00?\Z")
"""A query string the server answers with EmptyQueryResponse: only blanks, semicolons and comments."""
NO_SQL_MAX = 4096  # longer query strings are judged activity without looking (a keep-alive is short)
ANSWERED = frozenset({2, 3, 5, 7, 8, 9, 10, 11})  # authentication requests the client answers
METHODS = {3: "password", 5: "md5", 7: "gss", 9: "sspi", 10: "scram-sha-256"}
"""The factor ``auth.login`` records, by the server's authentication request (pg_hba.conf's method names);
``trust`` when the server asked for nothing."""
READ = 64 * 1024
AUTH_TIMEOUT = 30.0
"""Seconds from accepting a connection to ReadyForQuery (startup packet, TLS handshake, authentication); then it is closed."""
FIRST_PACKET_TIMEOUT = 5.0
"""Seconds from accepting a connection to its first packet (SSLRequest or startup): a real client sends it at once."""
WAITING_MAX = 256  # connections of one listener still authenticating (or shaking hands): more are refused at once
WAITING_PER_NETWORK = 32  # of which from one network (_network: an IPv4 /24, an IPv6 /64)
REFUSE_TIMEOUT = 1.0  # seconds a refused connection is given to send its first packets, so its client can read why
CANCEL_TIMEOUT = 2.0  # seconds for the server to take the CancelRequest sent at a cut
SAY_TIMEOUT = 2.0  # seconds a client has to take lapse's last message (a FATAL) before the connection is aborted
COPY_IN = frozenset(b"GW")  # CopyInResponse, CopyBothResponse: CopyData from the client is work from now
COPY_END = frozenset(b"cf")  # CopyDone, CopyFail from the client
ASKS_READY = frozenset(b"QFS")  # Query, FunctionCall, Sync: the server answers each with one ReadyForQuery
EXTENDED = frozenset(b"PBEDCH")  # Parse, Bind, Execute, Describe, Close, Flush: the server acts before the Sync
STREAM_AT = 1 << 20  # after authentication, messages longer than this are streamed, not buffered whole
TLS_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello: a client that skipped SSLRequest


class _Closed(Exception):
    """One side went away."""


class _HandshakeFailed(Exception):
    """The client's TLS handshake did not succeed (garbage, a refused certificate, a client that left)."""


class _Client:
    """The client side of one connection; ``tls`` says how far encryption got (``handshake`` while it runs)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.tls: Literal["none", "handshake", "on"] = "none"


class _Messages:
    """Whole protocol messages from one side; one longer than ``limit`` is a ``ProtocolViolation``."""

    def __init__(self, reader: asyncio.StreamReader, limit: int = pg.MAX_MESSAGE) -> None:
        self.reader = reader
        self.limit = limit
        self.buffer = bytearray()
        self.ready: list[bytes] = []
        self.streaming = 0  # bytes still to come of a long message being streamed (relay)

    async def batch(self) -> list[bytes]:
        """The whole messages that have arrived (at least one)."""
        while True:
            if self.ready:
                out, self.ready = self.ready, []
                return out
            chunk = await self.reader.read(READ)
            if not chunk:
                raise _Closed
            self.buffer += chunk
            found, used = pg.split(self.buffer, self.limit)
            del self.buffer[:used]
            self.ready = found

    async def one(self) -> bytes:
        if not self.ready:
            self.ready = await self.batch()
        return self.ready.pop(0)

    async def relay(self) -> tuple[list[bytes], bytes]:
        """(the messages that begin in the bytes, the bytes to forward), as they arrive, after authentication.

        A message is whole in the list, or, when it is longer than ``STREAM_AT``, only its 5-byte head: its body
        is forwarded in pieces as it comes, so a connection buffers at most ``STREAM_AT`` plus one read, not the
        1 GiB a message may be. ``streaming`` says whether the bytes end inside such a message.
        """
        if self.ready:  # sent along with the end of the authentication
            out, self.ready = self.ready, []
            return out, b"".join(out)
        while True:
            if self.streaming:
                chunk = await self.reader.read(min(READ, self.streaming))
                if not chunk:
                    raise _Closed
                self.streaming -= len(chunk)
                return [], chunk
            chunk = await self.reader.read(READ)
            if not chunk:
                raise _Closed
            self.buffer += chunk
            found, used = pg.split(self.buffer, self.limit)
            start = len(self.buffer) - used
            if start >= 5:
                (length,) = struct.unpack_from("!I", self.buffer, used + 1)
                if length > STREAM_AT:  # a long message begins: forward what there is of it, then stream the rest
                    found.append(bytes(self.buffer[used:used + 5]))
                    self.streaming = 1 + length - start
                    used = len(self.buffer)
            if used:
                out = bytes(self.buffer[:used])
                del self.buffer[:used]
                return found, out


class _Activity:
    """Which client messages do work, so keep the session alive; the COPY state comes from the server.

    Work is what makes the server execute something: a Query (not an empty one), an Execute, a FunctionCall,
    and CopyData while a COPY into the server runs. Parse and Bind only prepare (an Execute follows when the
    statement runs), and CopyData outside COPY, Sync, Flush, Describe and Close do nothing: counting them let a
    client keep a session open forever with 5-byte no-ops.
    """

    def __init__(self) -> None:
        self.copy_in = False  # the server said CopyInResponse/CopyBothResponse and the COPY has not ended
        self.pending = 0  # ReadyForQuery the server still owes (a Query, FunctionCall or Sync each asks for one)
        self.unsynced = False  # extended-protocol messages sent since the last Sync (an Execute runs at once)

    @property
    def busy(self) -> bool:
        """Whether the server may be running something for the client: only then is a cut worth a cancel
        (a cancel is one more connection to the server, a forked process before PostgreSQL 17)."""
        return self.pending > 0 or self.unsynced

    def server(self, batch: list[bytes]) -> None:
        for m in batch:
            if m[0] in COPY_IN:
                self.copy_in = True
            elif m[0] in (ord("E"), pg.READY):
                self.copy_in = False
            if m[0] == pg.READY:
                self.pending = max(0, self.pending - 1)

    def client(self, batch: list[bytes]) -> bool:
        """Whether ``batch`` holds work (and the COPY state after it)."""
        work = False
        for m in batch:
            kind = m[0]
            if kind in ASKS_READY:
                self.pending += 1
                self.unsynced = self.unsynced and kind != ord("S")
            elif kind in EXTENDED:
                self.unsynced = True
            if kind == ord("d"):
                work = work or self.copy_in
            elif kind in COPY_END:
                self.copy_in = False
            elif kind == ord("Q"):
                (length,) = struct.unpack_from("!I", m, 1)  # declared: a long one is here as its head only
                work = work or length > NO_SQL_MAX or NO_SQL.match(m, 5) is None
            elif kind in ACTIVE:
                work = True
        return work


class PostgresGateway:
    def __init__(self, spec: Postgres, gate: Callable[[], Gate], connections: Connections) -> None:
        self.spec = spec
        self.gate = gate
        self.connections = connections
        self.host = postgres_host(spec.name)
        self.upstream = parse_listen(spec.upstream)
        self.tls = ServerTls(*spec.tls_paths) if spec.tls_paths is not None else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: dict[str | None, int] = {}  # connections before authentication, by client network
        self._refusals = OutageLog(log, f"postgres gateway {spec.name}: refusing connections")

    async def start(self) -> asyncio.Server:
        host, port = parse_listen(self.spec.listen)
        server = await asyncio.start_server(self._serve, host, port, reuse_port=True)
        tls = "off" if self.tls is None else "required" if self.spec.tls_required else "on"
        log.info("postgres gateway %s on %s -> %s (TLS %s)", self.spec.name, self.spec.listen, self.spec.upstream, tls)
        return server

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if peer else None
        net = _network(ip)
        up_writer: asyncio.StreamWriter | None = None
        deadline = asyncio.timeout(AUTH_TIMEOUT)  # before authentication, nobody holds a connection open for long
        client_side = _Client(reader, writer)
        if sum(self._waiting.values()) >= WAITING_MAX or self._waiting.get(net, 0) >= WAITING_PER_NETWORK:
            # Before authentication a connection costs a file descriptor (and a TLS handshake its CPU) and
            # proves nothing: a flood of them must not starve the listener, nor the gateway's HTTP side.
            self._refusals.refused(ConnectionError("too many connections waiting to authenticate"))
            await _refuse(reader, writer)
            return
        self._waiting[net] = self._waiting.get(net, 0) + 1
        waiting = True
        try:
            async with deadline:
                startup = await self._startup(client_side, ip)
                if startup is None:
                    return
                packet, params = startup
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                up_writer.write(packet)
                if params is None:  # a CancelRequest: the server acts on it and closes
                    await up_writer.drain()
                    return
                server, client = _Messages(up_reader), _Messages(reader, pg.MAX_AUTH_MESSAGE)
                opened = await self._authenticate(server, client, writer, up_writer, params, ip)
            self._stop_waiting(net)
            waiting = False
            if opened is not None:
                client.limit = pg.MAX_MESSAGE
                await self._relay(server, client, writer, up_writer, *opened)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except _HandshakeFailed as exc:
            log.warning("postgres gateway %s: TLS handshake with %s failed: %s; closing", self.spec.name, ip,
                        exc)
        except pg.ProtocolViolation as exc:
            log.warning("postgres gateway %s: protocol violation from %s: %s; closing", self.spec.name, ip, exc)
            await _say(writer, pg.error(f"lapse: protocol violation: {exc}", pg.SQLSTATE_PROTOCOL))
        except ssl.SSLError as exc:  # an OSError too, but the client's TLS, not the database server
            log.warning("postgres gateway %s: TLS error from %s: %s; closing", self.spec.name, ip, exc)
        except OSError as exc:
            if isinstance(exc, TimeoutError) and deadline.expired() and client_side.tls == "handshake":
                log.warning("postgres gateway %s: TLS handshake with %s did not finish within %g s; closing",
                            self.spec.name, ip, AUTH_TIMEOUT)
                return  # nothing to say: the client speaks neither plain protocol nor TLS yet
            if isinstance(exc, TimeoutError) and deadline.expired():
                log.warning("postgres gateway %s: %s did not authenticate within %g s; closing", self.spec.name,
                            ip, AUTH_TIMEOUT)
                await _say(writer, pg.error("lapse: authentication timed out", pg.SQLSTATE_PROTOCOL))
                return
            log.warning("postgres gateway %s: upstream %s unreachable: %s", self.spec.name, self.spec.upstream, exc)
            await _say(writer, pg.error(f"lapse: database server unreachable ({exc.strerror or exc})", "08006"))
        except ValueError as exc:
            log.warning("postgres gateway %s: protocol error from %s: %s", self.spec.name, ip, exc)
        finally:
            if waiting:
                self._stop_waiting(net)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    def _stop_waiting(self, net: str | None) -> None:
        """This connection has authenticated (or ended): it no longer counts against the waiting limits."""
        left = self._waiting.pop(net) - 1
        if left:
            self._waiting[net] = left

    async def _startup(self, client: _Client, ip: str | None) -> tuple[bytes, dict[str, str] | None] | None:
        """(the startup packet, its parameters) or (a CancelRequest, None); None if the client gave up or was refused.

        At most one SSLRequest and one GSSENCRequest come first (as PostgreSQL allows); another is a violation.
        """
        reader, writer = client.reader, client.writer
        asked: set[int] = set()
        while True:
            if asked:
                head = await reader.readexactly(8)
            else:
                head = await _first_packet_head(reader)
            if not asked and head[0] == TLS_HANDSHAKE:
                log.warning("postgres gateway %s: %s started TLS directly (sslnegotiation=direct), which lapse does "
                            "not support; closing (sslnegotiation=postgres, the default, works)", self.spec.name, ip)
                return None
            length, code = struct.unpack("!II", head)
            if length < 8 or length > pg.MAX_STARTUP:
                raise pg.ProtocolViolation(f"bad startup packet length {length}")
            rest = await reader.readexactly(length - 8)
            if code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST):
                if code in asked:
                    raise pg.ProtocolViolation("repeated " + ("SSLRequest" if code == pg.SSL_REQUEST else "GSSENCRequest"))
                asked.add(code)
                if code == pg.SSL_REQUEST and self.tls is not None:
                    await self._start_tls(client)
                    continue
                writer.write(b"N")  # the client may go on in plain text (or stop, if it requires encryption)
                await writer.drain()
                continue
            if code == pg.CANCEL_REQUEST:  # not encrypted by every client (libpq's PQcancel never): PostgreSQL takes both
                return head + rest, None
            if code >> 16 != 3:
                writer.write(pg.error(f"lapse: unsupported frontend protocol {code >> 16}.{code & 0xFFFF}", "0A000"))
                await writer.drain()
                return None
            params = pg.startup_params(rest)
            if self.spec.tls_required and client.tls != "on":
                user = params.get("user", "")
                database = params.get("database") or user
                log.warning("postgres gateway %s: refused %s (user %s, database %s) without TLS: tls_required",
                            self.spec.name, ip, user, database)
                await _say(writer, pg.error(
                    f'lapse: TLS is required: no encryption for host "{ip}", user "{user}", database "{database}"',
                    pg.SQLSTATE_DENIED, detail="Connect with sslmode=require (or verify-ca, verify-full)."))
                return None
            return head + rest, params

    async def _start_tls(self, client: _Client) -> None:
        """Answer ``S`` and turn the client side into TLS in place; the startup goes on, encrypted."""
        assert self.tls is not None
        if _buffered(client.reader):  # PostgreSQL's check (CVE-2021-23214): it would be read as if encrypted
            raise pg.ProtocolViolation("received unencrypted data after SSL request")
        client.writer.write(b"S")
        client.tls = "handshake"
        try:
            await client.writer.start_tls(self.tls.context())
        except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
            raise _HandshakeFailed(str(exc)) from exc
        client.tls = "on"

    async def _authenticate(self, server: _Messages, client: _Messages, writer: asyncio.StreamWriter,
                            up_writer: asyncio.StreamWriter, params: dict[str, str],
                            ip: str | None) -> tuple[Monitor, str, bytes | None] | None:
        """Relay PostgreSQL's authentication; at AuthenticationOk sign in and judge.

        (monitor, session ID, the server's cancel key) or None; the key is BackendKeyData's process ID and secret,
        which lapse needs to stop a running query when it cuts the connection.
        """
        user = params.get("user", "")
        database = params.get("database") or user
        device = from_application_name(params.get("application_name"))
        opened: tuple[Monitor, str, bytes | None] | None = None
        signed: list[Monitor] = []
        try:
            opened = await self._exchange(server, client, writer, up_writer, user, database, device, ip, signed)
        finally:
            if opened is None and signed:  # signed in, then the server refused after all (no such database)
                signed[0].close()
                await self.gate().revoke(signed[0].key, "logout")
        return opened

    async def _exchange(self, server: _Messages, client: _Messages, writer: asyncio.StreamWriter,
                        up_writer: asyncio.StreamWriter, user: str, database: str, device: str,
                        ip: str | None, signed: list[Monitor]) -> tuple[Monitor, str, bytes | None] | None:
        monitor: Monitor | None = None
        sid = ""
        cancel_key: bytes | None = None
        method = "trust"
        while True:
            message = await server.one()
            kind = message[0]
            if kind == ord("R") and len(message) >= 9:
                (code,) = struct.unpack_from("!I", message, 5)
                method = METHODS.get(code, method)
                if code == 0:
                    opened = await self._sign_in(user, database, device, ip, method)
                    if isinstance(opened, str):
                        await _say(writer, pg.error(f"lapse: access refused ({opened})", pg.SQLSTATE_DENIED))
                        up_writer.write(pg.TERMINATE)
                        return None
                    monitor, sid = opened
                    signed.append(monitor)
                writer.write(message)
                await writer.drain()
                if code in ANSWERED:
                    up_writer.write(await client.one())
                    await up_writer.drain()
                continue
            if kind == ord("K") and len(message) == 13:
                cancel_key = message[5:13]
            writer.write(message)
            await writer.drain()
            if kind == ord("E"):
                return None  # the server refused (bad password, no such database): it closes
            if kind == pg.READY:
                return (monitor, sid, cancel_key) if monitor is not None else None

    async def _sign_in(self, user: str, database: str, device: str, ip: str | None,
                       method: str) -> tuple[Monitor, str] | str:
        gate = self.gate()
        path = "/" + database
        resource = f"CONNECT {path}"
        sid, _ = await gate.sign_in(user, host=self.host, path=path, ip=ip, login=resource, device=device,
                                    factor=method)
        verdict = await gate.check(host=self.host, path=path, method="CONNECT", ip=ip, session_id=sid)
        d = verdict.decision
        if not d.allowed:
            await gate.revoke(gate.key_of(sid), "logout")
            return d.reason.value if d.reason else "missing"
        return self.connections.open(Facts(self.host, path, "CONNECT", ip, sid, resource), verdict), sid

    async def _relay(self, server: _Messages, client: _Messages, writer: asyncio.StreamWriter,
                     up_writer: asyncio.StreamWriter, monitor: Monitor, sid: str, cancel_key: bytes | None) -> None:
        async def warn(kind: str, left: float) -> None:
            """Never waits for the client: a client that stops reading must not hold the monitor (and the cut)."""
            seconds = max(1, round(left))
            why = "for inactivity" if kind == "idle" else "(its maximum length)"
            if not server.streaming:  # only between messages: skipped while a long one is passing
                _write_unless_backed_up(writer, pg.notice(f"lapse: this session will end in {seconds} seconds {why}"))

        monitor.warn = warn
        activity = _Activity()

        async def from_client() -> str | None:
            while True:
                batch, data = await client.relay()
                if activity.client(batch):
                    reason = await monitor.activity()
                    if reason is not None:
                        return reason
                up_writer.write(data)
                await up_writer.drain()
                if any(m[0] == ord("X") for m in batch):
                    return None

        async def from_server() -> str | None:
            while True:
                batch, data = await server.relay()
                activity.server(batch)  # before the client sees a CopyInResponse, so its CopyData counts
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_server()),
                 asyncio.create_task(monitor.watch())]
        reason: str | None = None
        violation: pg.ProtocolViolation | None = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task in done and not task.cancelled():
                    exc = task.exception()
                    if exc is None:
                        reason = reason or task.result()
                    elif isinstance(exc, pg.ProtocolViolation):
                        violation = violation or exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            monitor.close()

        async def last_word(message: bytes) -> None:
            if server.streaming:  # inside a long message from the server: a FATAL there would be read as its bytes
                writer.transport.abort()
            else:
                await _say(writer, message)

        gate = self.gate()
        try:
            if violation is not None:
                log.warning("postgres gateway %s: protocol violation from %s: %s; closing", self.spec.name,
                            monitor.facts.ip, violation)
                await self._stop_upstream(up_writer, cancel_key if activity.busy else None,
                                      terminate=not client.streaming)
                await last_word(pg.error(f"lapse: protocol violation: {violation}", pg.SQLSTATE_PROTOCOL))
                self.connections.terminated(monitor, "protocol_violation")
                await gate.revoke(monitor.key, "logout")
                return
            if reason is None:
                await gate.revoke(monitor.key, "logout")
                return
            await self._stop_upstream(up_writer, cancel_key if activity.busy else None,
                                      terminate=not client.streaming)
            await last_word(pg.error(_cut_message(reason), pg.SQLSTATE_IDLE if reason == "idle" else pg.SQLSTATE_ADMIN))
            self.connections.terminated(monitor, reason)
            await gate.revoke(monitor.key, reason if reason in ("idle", "absolute") else "logout")
        except StoreUnavailable as exc:
            log.error("postgres gateway: store unavailable at the end of a connection: %s", exc)

    async def _stop_upstream(self, up_writer: asyncio.StreamWriter, cancel_key: bytes | None, *,
                             terminate: bool) -> None:
        """End the server's side of a cut connection: cancel what runs, then Terminate and drop the connection.

        Closing the connection alone is not enough: PostgreSQL notices a vanished client only when it next reads
        or writes, so a running ``pg_sleep(8); INSERT ...`` would finish and commit after the cut. A CancelRequest
        (on a new connection, as libpq's ``PQcancel``) interrupts it; the connection is then aborted, not closed,
        so a backend blocked writing to lapse (a client that stopped reading) sees it gone at once.
        """
        if cancel_key is not None:
            await self._cancel(cancel_key)
        if terminate:  # not inside a long message the client was streaming: there it would be read as its bytes
            up_writer.write(pg.TERMINATE)  # sent at once unless the server stopped reading; then abort is all there is
        up_writer.transport.abort()

    async def _cancel(self, cancel_key: bytes) -> None:
        """Send CancelRequest for ``cancel_key`` and wait (at most ``CANCEL_TIMEOUT``) until the server has taken it.

        Plain TCP to ``upstream``, as the relayed connection itself (the hop to the server is never TLS). The server
        closes the connection once it has signalled the backend, so that close is the acknowledgement.
        """
        cancel_writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                cancel_reader, cancel_writer = await asyncio.open_connection(*self.upstream)
                cancel_writer.write(struct.pack("!II", 16, pg.CANCEL_REQUEST) + cancel_key)
                await cancel_writer.drain()
                await cancel_reader.read()
        except (OSError, TimeoutError) as exc:
            log.warning("postgres gateway %s: could not cancel the running query at a cut: %s", self.spec.name, exc)
        finally:
            if cancel_writer is not None:
                cancel_writer.transport.abort()


def _network(ip: str | None) -> str | None:
    """The network a client is counted under before authentication: its IPv4 /24 or its IPv6 /64.

    Counting by address let 8 addresses hold all of a listener's waiting slots; an attacker's addresses come in
    blocks (a /64 is what one IPv6 host is given; a /24 the smallest IPv4 block routed on its own), so one
    network shares one quota. IPv4-mapped IPv6 addresses count as IPv4.
    """
    return None if ip is None else block(ip, 24)


async def _first_packet_head(reader: asyncio.StreamReader) -> bytes:
    """The first 8 bytes of a connection, within ``FIRST_PACKET_TIMEOUT``: a socket that says nothing is dropped
    long before the authentication timeout, so idle sockets cannot hold the waiting slots."""
    try:
        async with asyncio.timeout(FIRST_PACKET_TIMEOUT):
            return await reader.readexactly(8)
    except TimeoutError:
        raise pg.ProtocolViolation(f"no startup packet within {FIRST_PACKET_TIMEOUT:g} s") from None


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Refuse a connection over the waiting limits so that its client can say why.

    libpq sends an SSLRequest first and takes only ``S`` or ``N`` for an answer; an ErrorResponse there is an
    unreadable "invalid response to SSL negotiation". So the first packets (at most ``REFUSE_TIMEOUT`` seconds)
    are read, an SSLRequest or GSSENCRequest answered ``N``, and the FATAL comes where the client reads one.
    """
    try:
        async with asyncio.timeout(REFUSE_TIMEOUT):
            for _ in range(3):  # at most an SSLRequest, a GSSENCRequest, then the startup packet
                length, code = struct.unpack("!II", await reader.readexactly(8))
                if code not in (pg.SSL_REQUEST, pg.GSSENC_REQUEST) or length != 8:
                    if 8 < length <= pg.MAX_STARTUP:  # read it whole: closing on unread bytes would reset
                        await reader.readexactly(length - 8)
                    break
                writer.write(b"N")
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    await _say(writer, pg.error("lapse: too many connections waiting to authenticate; try again",
                                pg.SQLSTATE_TOO_MANY))


def _cut_message(reason: str) -> str:
    if reason == "idle":
        return "terminating connection due to idle-session timeout (lapse session idle)"
    if reason == "absolute":
        return "terminating connection: the lapse session reached its maximum length (absolute)"
    return f"terminating connection: lapse session {reason}"


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read. ``StreamReader`` has no public way to tell; its buffer is ``_buffer``
    (read directly, not with a default: if a Python release renamed it, the TLS tests fail rather than the
    check quietly passing everything)."""
    return len(reader._buffer)  # noqa: SLF001


async def _say(writer: asyncio.StreamWriter, message: bytes) -> None:
    """A last message to the client, then the end: it has ``SAY_TIMEOUT`` seconds to take it (a client that
    stopped reading cannot hold the connection, nor the task that cuts it)."""
    transport = writer.transport
    try:
        writer.write(message)
        transport.set_write_buffer_limits(high=0)  # drain() now waits until everything is sent
        async with asyncio.timeout(SAY_TIMEOUT):
            await writer.drain()
    except (ConnectionError, RuntimeError, TimeoutError):
        transport.abort()
    else:
        transport.close()


def _write_unless_backed_up(writer: asyncio.StreamWriter, message: bytes) -> None:
    """Write without waiting; skipped when the client is not reading (its buffer is past the high-water mark)."""
    transport = writer.transport
    if transport.is_closing() or transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
        return
    writer.write(message)


async def start_listeners(config: Config, gate: Callable[[], Gate], connections: Connections) -> list[asyncio.Server]:
    """One asyncio server per ``[[postgres]]`` entry (SO_REUSEPORT: every worker may listen)."""
    return [await PostgresGateway(spec, gate, connections).start() for spec in config.postgres]
