"""The PostgreSQL gateway against a real PostgreSQL (Debian's package, a cluster of the test's own in a
temporary folder on a free port) with real clients (psycopg, psql): PostgreSQL's own authentication
passes through, queries work, the warning is seen, the session is cut at its idle deadline with a FATAL
57P05, and a revocation by another handle cuts within a second with 57P01."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lapse.config import parse_config
from lapse.postgres import gateway as gateway_mod
from lapse.postgres import protocol as pg
from lapse.web.serve import Service

from ..support import free_port, missing
from .harness import Lapse, serve

psycopg = pytest.importorskip("psycopg")

PASSWORD = "s3cret horse"
SLACK = 1.0

CONFIG = """
[server]
listen = "127.0.0.1:{port}"

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[[postgres]]
name = "db"
listen = "127.0.0.1:{db}"
upstream = "127.0.0.1:{pg}"
idle = "3s"
absolute = "1h"
warn_before = "1s"

[[postgres]]
name = "dbslow"
listen = "127.0.0.1:{slow}"
upstream = "127.0.0.1:{pg}"
idle = "1m"

[[postgres]]
name = "dbshut"
listen = "127.0.0.1:{shut}"
upstream = "127.0.0.1:{pg}"
allow = ["user:bob"]
"""


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@contextmanager
def postgres_cluster() -> Iterator[int]:
    """A throwaway cluster: superuser ``alice`` with a SCRAM password over TCP. As root, PostgreSQL's own
    tools run as the ``postgres`` user (``runuser``): initdb refuses root."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        missing("PostgreSQL server not installed (apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="lapse-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            missing("running as root without runuser")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if as_user:
        shutil.chown(pwfile, "postgres")
    port = free_port()
    data = folder / "data"
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "alice", "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"], **run)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(folder / "log"), "start"], **run)
    try:
        yield port
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lapse, dict[str, int]]]:
    with postgres_cluster() as pg:
        ports = {"port": free_port(), "db": free_port(), "slow": free_port(), "shut": free_port(), "pg": pg}
        loaded = parse_config(CONFIG.format(**ports), base_dir=tmp_path_factory.mktemp("pg"))
        with serve(Service(loaded, None), ports["port"], lifespan="on") as address:
            yield Lapse(loaded, address), ports


def _connect(port: int, **kw):
    return psycopg.connect(host="127.0.0.1", port=port, user="alice", password=PASSWORD, dbname="postgres",
                           autocommit=True, connect_timeout=5, **kw)


def _events(lapse: Lapse, name: str, app: str) -> list:
    return [e for e in lapse.audit(500) if e.event == name and e.app == app]


def test_queries_pass_with_postgres_own_authentication(gateway) -> None:
    lapse, ports = gateway
    with _connect(ports["db"], sslmode="prefer") as conn:  # SSLRequest refused with 'N': on in plain text
        assert conn.execute("select current_user, 40 + 2").fetchone() == ("alice", 42)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=ports["db"], user="alice", password="wrong", dbname="postgres")
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        _connect(ports["db"], sslmode="require")
    created = _events(lapse, "session.created", "db")
    assert created and created[-1].user == "alice"
    time.sleep(0.3)
    ended = [e for e in lapse.audit(500) if e.event == "session.revoked" and e.session == created[-1].session]
    assert ended and ended[-1].reason == "logout"  # the session ends with its connection


def test_the_login_records_the_method_postgresql_used(gateway) -> None:
    """Finding 6: ``auth.login`` said ``password`` whatever the server asked; it names pg_hba.conf's method now."""
    lapse, ports = gateway
    with _connect(ports["slow"]) as conn:
        conn.execute("select 1")
        created = _events(lapse, "session.created", "dbslow")[-1]
    login = [e for e in _events(lapse, "auth.login", "dbslow") if e.session == created.session]
    assert [e.reason for e in login] == ["scram-sha-256"]


def test_the_session_device_is_the_clients_application_name(gateway) -> None:
    lapse, ports = gateway
    with _connect(ports["db"], application_name="report-job\tnightly") as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        devices = [s.device for s in lapse.run(lambda rt: rt.store.sessions("alice"))]
    assert "report-job nightly" in devices


def test_allow_rules_refuse_at_authentication(gateway) -> None:
    _, ports = gateway
    with pytest.raises(psycopg.OperationalError, match=r"lapse: access refused \(forbidden\)"):
        _connect(ports["shut"])


def test_warning_then_fatal_57P05_at_the_idle_deadline(gateway) -> None:
    lapse, ports = gateway
    notices: list[str] = []
    conn = _connect(ports["db"])
    try:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("select 1")
        time.sleep(2.3)  # past the warning (1 s before the 3 s idle deadline), before the deadline
        conn.execute("select 2")  # activity: re-armed; the notice sent at ~2 s is read with this answer
        last = time.time()
        assert any("this session will end in 1 seconds for inactivity" in n for n in notices), notices
        time.sleep(3.0 + SLACK + 0.3)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 3")
        assert caught.value.sqlstate == "57P05" or "idle-session timeout" in str(caught.value), caught.value
    finally:
        conn.close()
    cut = [e for e in lapse.audit_once("connection.terminated", "idle") if e.app == "db"]
    assert cut and cut[-1].user == "alice" and cut[-1].resource == "CONNECT /postgres"
    assert 3.0 - 0.3 <= cut[-1].ts - last <= 3.0 + SLACK, cut[-1].ts - last
    assert any(e.event == "session.expired" and e.reason == "idle" and e.session == cut[-1].session
               for e in lapse.audit(500))


def test_revocation_by_another_handle_cuts_within_a_second(gateway) -> None:
    lapse, ports = gateway
    conn = _connect(ports["slow"])
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        asked = time.time()
        assert lapse.run(lambda rt: rt.gate.revoke_user("alice", "admin")) >= 1
        time.sleep(SLACK + 0.3)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 2")
        assert caught.value.sqlstate == "57P01" or "lapse session revoked" in str(caught.value), caught.value
    finally:
        conn.close()
    cut = [e for e in lapse.audit_once("connection.terminated", "revoked") if e.app == "dbslow"]
    assert cut and cut[-1].ts - asked <= SLACK, cut[-1].ts - asked


def test_psql_sees_the_warning_and_the_fatal_message(gateway) -> None:
    _, ports = gateway
    psql = shutil.which("psql")
    if psql is None:
        missing("psql not installed (apt-get install postgresql-client)")
    script = "select 'first';\n\\! sleep 4.5\nselect 'second';\n"
    done = subprocess.run(
        [psql, "-h", "127.0.0.1", "-p", str(ports["db"]), "-U", "alice", "-d", "postgres", "-X", "-v", "ON_ERROR_STOP=0"],
        input=script, capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": PASSWORD},
    )
    out = done.stdout + done.stderr
    assert "first" in out
    assert "WARNING:  lapse: this session will end in 1 seconds for inactivity" in out, out
    assert "FATAL:  terminating connection due to idle-session timeout (lapse session idle)" in out, out
    assert "second" not in done.stdout


def test_cancel_request_passes_through(gateway) -> None:
    _, ports = gateway
    with _connect(ports["slow"]) as conn:
        started = time.monotonic()

        threading.Timer(0.5, conn.cancel_safe).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(5)")
        assert time.monotonic() - started < 3


# ------------------------------------------------------------ M2: before authentication, nobody holds lapse


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _startup_packet(user: str = "alice", database: str = "postgres") -> bytes:
    body = struct.pack("!I", pg.PROTOCOL_3) + f"user\0{user}\0database\0{database}\0\0".encode()
    return struct.pack("!I", len(body) + 4) + body


def _request(code: int) -> bytes:
    return struct.pack("!II", 8, code)


def _until_closed(sock: socket.socket, limit: float = 5.0) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def _fatal(data: bytes) -> tuple[str, str]:
    """(SQLSTATE, message) of the last ErrorResponse in ``data``; it must be FATAL."""
    messages, _ = pg.split(bytearray(data))
    error = [m for m in messages if m[:1] == b"E"][-1]
    fields = {f[:1]: f[1:].decode() for f in error[5:].split(b"\0") if f}
    assert fields[b"S"] == "FATAL", fields
    return fields[b"C"], fields[b"M"]


@pytest.mark.parametrize("order", [[pg.SSL_REQUEST, pg.SSL_REQUEST],
                                   [pg.GSSENC_REQUEST, pg.SSL_REQUEST, pg.GSSENC_REQUEST]])
def test_a_repeated_ssl_or_gssenc_request_is_a_protocol_violation(gateway, order) -> None:
    """M2: each may come once (as PostgreSQL allows); an endless loop of them used to hold the connection."""
    _, ports = gateway
    with _raw(ports["slow"]) as sock:
        for code in order[:-1]:
            sock.sendall(_request(code))
            assert sock.recv(1) == b"N"
        sock.sendall(_request(order[-1]))
        data, _ = _until_closed(sock)
    sqlstate, message = _fatal(data)
    assert sqlstate == "08P01" and "repeated" in message


def test_an_oversized_message_before_authentication_is_refused_without_waiting_for_it(gateway, caplog) -> None:
    """M2: a client may not make lapse buffer a huge "password" before PostgreSQL has said AuthenticationOk."""
    _, ports = gateway
    with caplog.at_level(logging.WARNING, logger="lapse.postgres"), _raw(ports["slow"]) as sock:
        sock.sendall(_startup_packet())
        sock.settimeout(5)
        asked = sock.recv(65536)
        assert asked[:1] == b"R"  # PostgreSQL asks for SCRAM
        sock.sendall(b"p" + struct.pack("!I", pg.MAX_AUTH_MESSAGE + 1) + b"x" * 100)  # the body never comes
        data, took = _until_closed(sock)
    sqlstate, message = _fatal(data)
    assert sqlstate == "08P01" and "bad message length" in message and took < 2
    assert any("protocol violation" in r.getMessage() for r in caplog.records)


def test_a_client_that_does_not_authenticate_in_time_is_closed(gateway, monkeypatch, caplog) -> None:
    """M2: AUTH_TIMEOUT (30 s; short here) covers the startup packet and the whole authentication."""
    _, ports = gateway
    monkeypatch.setattr(gateway_mod, "AUTH_TIMEOUT", 0.5)
    with caplog.at_level(logging.WARNING, logger="lapse.postgres"):
        with _raw(ports["slow"]) as sock:
            sock.sendall(_startup_packet()[:6])  # half a startup packet, then nothing
            data, took = _until_closed(sock)
        assert _fatal(data) == ("08P01", "lapse: authentication timed out") and 0.3 < took < 3
        with _raw(ports["slow"]) as sock:
            sock.sendall(_startup_packet())  # PostgreSQL asks for a password that never comes
            data, took = _until_closed(sock)
        assert data[:1] == b"R" and _fatal(data) == ("08P01", "lapse: authentication timed out") and took < 3
    assert sum("did not authenticate within 0.5 s" in r.getMessage() for r in caplog.records) == 2
    with _connect(ports["slow"]) as conn:  # a real client authenticates well within it
        time.sleep(0.8)  # and the deadline no longer applies once signed in
        assert conn.execute("select 1").fetchone() == (1,)


def test_after_authentication_long_messages_pass_and_absurd_ones_end_the_connection(gateway) -> None:
    """M2: the small limit is for authentication only; past 1 GiB (PostgreSQL's own limit) is a FATAL 08P01."""
    lapse, ports = gateway
    with _connect(ports["slow"]) as conn:
        assert conn.execute("select length(%s)", ["x" * 200_000]).fetchone() == (200_000,)
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            raw.sendall(b"Q" + struct.pack("!I", pg.MAX_MESSAGE + 1))
            data, _ = _until_closed(raw)
        finally:
            raw.close()
    assert _fatal(data)[0] == "08P01"
    cut = [e for e in lapse.audit_once("connection.terminated", "protocol_violation") if e.app == "dbslow"]
    assert cut and cut[-1].user == "alice"


def test_connections_waiting_to_authenticate_are_capped_per_network(gateway, monkeypatch, caplog) -> None:
    """Before authentication a connection proves nothing: past WAITING_PER_NETWORK from one network (small here),
    the next is refused at once with FATAL 53300 (too_many_connections) and one log line; authenticated
    connections do not count, and once the waiting ones leave, new ones are served."""
    _, ports = gateway
    monkeypatch.setattr(gateway_mod, "WAITING_PER_NETWORK", 3)
    with _connect(ports["slow"]) as signed_in, caplog.at_level(logging.WARNING, logger="lapse.postgres"):
        idle = [_raw(ports["slow"]) for _ in range(3)]
        try:
            for sock in idle:  # half a startup packet each, then nothing: they wait (counted from accept)
                sock.sendall(_startup_packet()[:6])
            deadline, data = time.monotonic() + 5, b""
            while not data and time.monotonic() < deadline:  # until the gateway has taken the three in
                with _raw(ports["slow"]) as extra:
                    extra.sendall(_startup_packet())
                    try:
                        data, took = _until_closed(extra, limit=0.5)
                    except TimeoutError:
                        data = b""  # let in: one of the three was not counted yet; this one leaves now
            assert _fatal(data) == ("53300", "lapse: too many connections waiting to authenticate; try again")
            assert took < 1
            assert signed_in.execute("select 1").fetchone() == (1,)  # signed in: not counted, still served
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 5
        while True:  # the gateway notices the closed ones; then a new client is served
            try:
                with _connect(ports["slow"]) as conn:
                    assert conn.execute("select 1").fetchone() == (1,)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert sum("too many connections waiting" in r.getMessage() for r in caplog.records) == 1


def _raw_from(address: str, port: int) -> socket.socket:
    """A connection from another loopback address (Linux routes all of 127.0.0.0/8 to lo)."""
    sock = socket.socket()
    sock.bind((address, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def test_idle_sockets_from_many_addresses_of_one_network_do_not_lock_others_out(gateway, monkeypatch) -> None:
    """Finding 4: counted per address, 8 addresses filled every waiting slot of the listener. Counted per /24,
    they share one quota: a client from another network is served, and a libpq client from the flooded network
    reads why it is refused (its SSLRequest is answered N first)."""
    _, ports = gateway
    monkeypatch.setattr(gateway_mod, "WAITING_MAX", 8)
    monkeypatch.setattr(gateway_mod, "WAITING_PER_NETWORK", 4)
    flood = [_raw_from(f"127.0.0.{n}", ports["slow"]) for n in range(2, 10)]  # 8 addresses of 127.0.0.0/24
    try:
        time.sleep(0.3)  # the gateway has taken them in (4 wait, 4 are being refused)
        with _raw_from("127.0.1.1", ports["slow"]) as other:  # another /24
            other.sendall(_startup_packet())
            assert other.recv(65536)[:1] == b"R"  # PostgreSQL asks for the password: not refused
        with pytest.raises(psycopg.OperationalError, match="too many connections waiting to authenticate"):
            _connect(ports["slow"], sslmode="prefer")  # from 127.0.0.1: the flooded /24
    finally:
        for sock in flood:
            sock.close()


def test_waiting_connections_are_counted_per_ipv4_24_and_ipv6_64() -> None:
    network = gateway_mod._network
    assert network("203.0.113.7") == network("203.0.113.250") == "203.0.113.0/24" != network("203.0.114.7")
    assert network("2001:db8:1:2:aaaa::1") == network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert network("2001:db8:1:3::1") != network("2001:db8:1:2::1")
    assert network("::ffff:203.0.113.7") == "203.0.113.0/24"  # IPv4-mapped: counted as IPv4


def test_a_socket_that_sends_nothing_is_closed_before_the_authentication_timeout(gateway, monkeypatch) -> None:
    """Finding 4: the first packet has its own short limit (FIRST_PACKET_TIMEOUT, 5 s; shorter here)."""
    _, ports = gateway
    monkeypatch.setattr(gateway_mod, "FIRST_PACKET_TIMEOUT", 0.5)
    with _raw(ports["slow"]) as sock:
        data, took = _until_closed(sock)
    assert _fatal(data) == ("08P01", "lapse: protocol violation: no startup packet within 0.5 s") and took < 2


# ------------------------------------------------------------ the cut ends the work on the server too


def _direct(ports: dict[str, int]):
    """A connection straight to PostgreSQL, past lapse: to see what the server did."""
    return psycopg.connect(host="127.0.0.1", port=ports["pg"], user="alice", password=PASSWORD, dbname="postgres",
                           autocommit=True, connect_timeout=5)


def _gone_at(direct, pid: int, limit: float) -> float:
    """When (time.time()) backend ``pid`` left pg_stat_activity; fails if it is still there after ``limit`` s."""
    deadline = time.time() + limit
    while direct.execute("select count(*) from pg_stat_activity where pid = %s", [pid]).fetchone() != (0,):
        assert time.time() < deadline, f"backend {pid} still running"
        time.sleep(0.05)
    return time.time()


def _cut_event(lapse: Lapse, app: str, reason: str, since: float) -> object:
    """The ``connection.terminated`` of ``app`` with ``reason`` written after ``since`` (waiting up to 5 s for it)."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in _events(lapse, "connection.terminated", app) if e.reason == reason and e.ts >= since]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, [(e.event, e.app, e.reason) for e in lapse.audit(20)]
        time.sleep(0.05)


def test_a_query_running_at_the_cut_is_cancelled_and_does_not_commit(gateway) -> None:
    """Finding 1: closing the connection alone let ``pg_sleep(5); INSERT`` run on and commit after the FATAL."""
    lapse, ports = gateway
    with _direct(ports) as direct:
        direct.execute("create table if not exists cut_rows (note text)")
        conn = _connect(ports["db"])
        try:
            pid = conn.info.backend_pid
            sent = time.time()
            conn.pgconn.send_query(b"select pg_sleep(5); insert into cut_rows values ('committed after the cut')")
            conn.pgconn.flush()
            gone = _gone_at(direct, pid, limit=3.0 + SLACK + 2.0)
            cut = _cut_event(lapse, "db", "idle", sent)
            assert 3.0 - 0.3 <= cut.ts - sent <= 3.0 + SLACK, cut.ts - sent
            assert gone - cut.ts <= 1.5, gone - cut.ts  # the backend ends with the cut, not when its query does
            time.sleep(max(0.0, sent + 5.5 - time.time()))  # past the moment the INSERT would have committed
            assert direct.execute("select count(*) from cut_rows").fetchone() == (0,)
        finally:
            conn.close()


def test_a_cut_cancels_only_when_the_server_may_be_running_something() -> None:
    """A cancel costs the server a connection (a forked process): an idle connection's cut needs none."""
    activity = gateway_mod._Activity()
    assert not activity.busy
    activity.client([_message(b"Q", b"select 1\0")])
    assert activity.busy
    activity.server([_message(b"T"), _message(b"D"), _message(b"C"), _message(b"Z", b"I")])
    assert not activity.busy
    activity.client([_message(b"P", b"\0select 1\0\0\0"), _message(b"B"), _message(b"E")])
    assert activity.busy  # an Execute runs before its Sync
    activity.client([_message(b"S")])
    activity.server([_message(b"Z", b"I")])
    assert not activity.busy


def _stalled_client(ports: dict[str, int], port: int, table: str):
    """A client that sends a big query under an exclusive lock and never reads its result."""
    conn = _connect(port)
    conn.pgconn.send_query(f"begin; lock table {table} in access exclusive mode; "
                           "select repeat('x', 1000) from generate_series(1, 200000)".encode())
    conn.pgconn.flush()
    return conn


def test_a_client_that_stops_reading_is_cut_at_its_idle_deadline(gateway) -> None:
    """Finding 2: the warning waited for the client to read, so the cut never came and the lock was held."""
    lapse, ports = gateway
    with _direct(ports) as direct:
        direct.execute("create table if not exists cut_locked (note text)")
        sent = time.time()
        conn = _stalled_client(ports, ports["db"], "cut_locked")
        try:
            gone = _gone_at(direct, conn.info.backend_pid, limit=3.0 + SLACK + 3.0)
            assert gone - sent <= 3.0 + SLACK + 2.0, gone - sent
            with direct.transaction():  # the lock went with it
                direct.execute("lock table cut_locked in access exclusive mode nowait")
        finally:
            conn.close()
    cut = _cut_event(lapse, "db", "idle", sent)
    assert cut.ts - sent <= 3.0 + SLACK, cut.ts - sent
    assert any(e.event == "session.expired" and e.reason == "idle" and e.session == cut.session
               for e in lapse.audit(500))


def test_a_client_that_stops_reading_is_cut_by_a_revocation(gateway) -> None:
    """Finding 2: the final FATAL waited for the client to read; now it has a bounded time, then the abort."""
    lapse, ports = gateway
    with _direct(ports) as direct:
        direct.execute("create table if not exists cut_revoked (note text)")
        conn = _stalled_client(ports, ports["slow"], "cut_revoked")
        try:
            time.sleep(0.5)  # the server's answer fills the buffers: lapse is now blocked writing to the client
            asked = time.time()
            assert lapse.run(lambda rt: rt.gate.revoke_user("alice", "admin")) >= 1
            gone = _gone_at(direct, conn.info.backend_pid, limit=SLACK + 3.0)
            assert gone - asked <= SLACK + 1.0, gone - asked
        finally:
            conn.close()
    cut = _cut_event(lapse, "dbslow", "revoked", asked)
    assert cut.ts - asked <= SLACK, cut.ts - asked


# ------------------------------------------------------------ which client messages are activity


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


NO_OPS = {
    "CopyData outside COPY": _message(b"d"),
    "empty Query": _message(b"Q", b"\0"),
    "Query of blanks, semicolons and comments": _message(b"Q", b" ; -- nothing\n/* at all */ ;\0"),
    "Parse without Execute": _message(b"P", b"\0select 1\0\0\0") + _message(b"S"),
}


@pytest.mark.parametrize("no_op", NO_OPS.values(), ids=NO_OPS.keys())
def test_no_op_messages_do_not_keep_a_session_alive(gateway, no_op: bytes) -> None:
    """Finding 3: these were judged by their type alone, so one every second kept a 3 s idle session open."""
    _, ports = gateway
    with _connect(ports["db"]) as conn:
        conn.execute("select 1")
        last = time.monotonic()
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.settimeout(1.0)
        data = b""
        try:
            while time.monotonic() - last < 3.0 + SLACK + 2.0:
                try:
                    raw.sendall(no_op)
                    chunk = raw.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:  # lapse closed while a no-op was on its way
                    break
                if not chunk:
                    break
                data += chunk
            took = time.monotonic() - last
        finally:
            raw.close()
    assert _fatal(data)[0] == "57P05" and took <= 3.0 + SLACK + 0.5, (took, data[-200:])


def test_copy_data_is_activity_while_a_copy_runs(gateway) -> None:
    """Finding 3: CopyData counts while the server has a COPY FROM STDIN open (a slow load is not idle)."""
    _, ports = gateway
    with _connect(ports["db"]) as conn:
        conn.execute("create table if not exists copied (note text)")
        conn.execute("truncate copied")
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.settimeout(5)
        try:
            raw.sendall(_message(b"Q", b"copy copied (note) from stdin\0"))
            assert raw.recv(65536)[:1] == b"G"  # CopyInResponse
            for n in range(5):  # one row a second, well past the 3 s idle limit
                raw.sendall(_message(b"d", f"row {n}\n".encode()))
                time.sleep(1.0)
            raw.sendall(_message(b"c"))
            answer = b""
            while not answer.endswith(b"Z\0\0\0\x05I"):
                answer += raw.recv(65536)
        finally:
            raw.close()
        assert answer.startswith(b"C") and b"COPY 5" in answer, answer
        assert conn.execute("select count(*) from copied").fetchone() == (5,)


# ------------------------------------------------------------ long messages stream through


def _peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


def _rss(field: str) -> int:
    """VmRSS or VmHWM (the peak since the last reset) of this process, in MiB: lapse runs in it."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) // 1024


def test_a_200_mib_query_streams_through_without_being_buffered_whole(gateway) -> None:
    """Finding 5: each message was buffered whole (up to 1 GiB a connection, copied twice); long ones now pass in
    pieces, so lapse's memory stays flat while the query reaches the server and is answered."""
    _, ports = gateway
    size = 200 << 20
    with _connect(ports["slow"]) as conn:
        long_row = conn.execute("select repeat('y', %s)", [3 << 20]).fetchone()  # a long message from the server
        assert long_row == ("y" * (3 << 20),)
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.settimeout(30)
        try:
            head, tail = b"select length('", b"')\0"
            chunk = b"x" * (1 << 20)
            before = _rss("VmRSS")
            _peak_rss_reset()
            raw.sendall(b"Q" + struct.pack("!I", 4 + len(head) + size + len(tail)) + head)
            for _ in range(size >> 20):
                raw.sendall(chunk)
            raw.sendall(tail)
            answer = b""
            while not answer.endswith(b"Z\0\0\0\x05I"):
                answer += raw.recv(65536)
            grown = _rss("VmHWM") - before
        finally:
            raw.close()
    assert str(size).encode() in answer and b"SELECT 1" in answer, answer[:200]
    assert grown < 50, f"lapse grew by {grown} MiB while a {size >> 20} MiB message passed"
