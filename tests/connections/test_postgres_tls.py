"""TLS termination in the PostgreSQL gateway, against a real PostgreSQL with real clients (psycopg, psql): an
``SSLRequest`` is answered ``S`` and the client side becomes TLS (seen on the client: the hop to the server is
plain), ``verify-full`` checks the host name against a certificate made here with ``openssl``, ``tls_required``
refuses a plain startup like a ``hostssl`` line, a bad handshake is cut within the pre-authentication limits, and
the clock cuts a TLS connection with the same FATAL messages as a plain one."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lapse.config import ConfigError, load_config, parse_config
from lapse.postgres import gateway as gateway_mod
from lapse.postgres import protocol as pg
from lapse.web.serve import Service

from ..certs import Certificate, certificate
from ..support import free_port, missing
from .harness import Lapse, serve
from .test_postgres import (
    PASSWORD,
    SLACK,
    _cut_event,
    _direct,
    _fatal,
    _gone_at,
    _request,
    _startup_packet,
    _until_closed,
    postgres_cluster,
)

psycopg = pytest.importorskip("psycopg")

HOST = "db.lapse.test"  # the name in the server certificate (with 127.0.0.1); clients reach it by hostaddr

CONFIG = """
[server]
listen = "127.0.0.1:{port}"

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[[postgres]]
name = "tls"
listen = "127.0.0.1:{tls}"
upstream = "127.0.0.1:{pg}"
idle = "2s"
absolute = "1h"
warn_before = "1s"
tls_cert = "certs/server.pem"
tls_key = "certs/server.key"

[[postgres]]
name = "tlsreq"
listen = "127.0.0.1:{required}"
upstream = "127.0.0.1:{pg}"
idle = "1m"
tls_cert = "certs/server.pem"
tls_key = "certs/server.key"
tls_required = true

[[postgres]]
name = "tlsrot"
listen = "127.0.0.1:{rotated}"
upstream = "127.0.0.1:{pg}"
tls_cert = "rotated/server.pem"
tls_key = "rotated/server.key"
"""


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lapse, dict[str, int], Certificate]]:
    """lapse with three TLS listeners (relative certificate paths) in front of a cluster of its own; and the CA."""
    base = tmp_path_factory.mktemp("pgtls")
    (base / "certs").mkdir()
    (base / "rotated").mkdir()
    ca = certificate(base / "certs", "ca")
    certificate(base / "certs", "server", signed_by=ca, names=f"DNS:{HOST},IP:127.0.0.1")
    certificate(base / "rotated", "server", signed_by=ca)
    with postgres_cluster() as pg_port:
        ports = {"port": free_port(), "tls": free_port(), "required": free_port(), "rotated": free_port(),
                 "pg": pg_port}
        loaded = parse_config(CONFIG.format(**ports), base_dir=base)
        with serve(Service(loaded, None), ports["port"], lifespan="on") as address:
            yield Lapse(loaded, address), ports, ca


def _connect(port: int, sslmode: str, **kw):
    return psycopg.connect(host="127.0.0.1", port=port, user="alice", password=PASSWORD, dbname="postgres",
                           autocommit=True, connect_timeout=5, sslmode=sslmode, **kw)


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _asked_tls(port: int) -> socket.socket:
    """A raw connection whose SSLRequest lapse has answered ``S``."""
    sock = _raw(port)
    sock.sendall(_request(pg.SSL_REQUEST))
    assert sock.recv(1) == b"S"
    return sock


def _no_loop_errors(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing escaped to the event loop's exception handler (an "unhandled" error, logged by asyncio)."""
    escaped = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not escaped, [r.getMessage() for r in escaped]


def test_sslmode_require_is_encrypted_on_the_client_side(tls_gateway) -> None:
    """The client's hop is TLS (psycopg says so); pg_stat_ssl would show the plain hop lapse -> PostgreSQL."""
    lapse, ports, _ = tls_gateway
    for sslmode in ("require", "prefer"):
        with _connect(ports["tls"], sslmode) as conn:
            assert conn.pgconn.ssl_in_use, sslmode
            assert conn.execute("select current_user, 40 + 2").fetchone() == ("alice", 42)
    with _connect(ports["tls"], "disable") as conn:  # TLS is offered, not required, on this listener
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host="127.0.0.1", port=ports["tls"], user="alice", password="wrong", dbname="postgres",
                        sslmode="require")
    assert [e for e in lapse.audit(500) if e.event == "session.created" and e.app == "tls"]


def test_verify_full_checks_the_ca_and_the_host_name(tls_gateway) -> None:
    _, ports, ca = tls_gateway
    verify = dict(hostaddr="127.0.0.1", port=ports["tls"], user="alice", password=PASSWORD, dbname="postgres",
                  sslmode="verify-full", sslrootcert=str(ca.cert), connect_timeout=5)
    with psycopg.connect(host=HOST, **verify) as conn:
        assert conn.pgconn.ssl_in_use and conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="does not match host name"):
        psycopg.connect(host="elsewhere.lapse.test", **verify)
    psql = shutil.which("psql")
    if psql is None:
        missing("psql not installed (apt-get install postgresql-client)")
    conninfo = (f"host={HOST} hostaddr=127.0.0.1 port={ports['tls']} user=alice dbname=postgres "
                f"sslmode=verify-full sslrootcert={ca.cert}")
    done = subprocess.run([psql, conninfo, "-X", "-c", r"\conninfo", "-c", "select 'through lapse'"],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "PGPASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    assert "SSL connection (protocol: TLSv1." in done.stdout and "through lapse" in done.stdout, done.stdout


def test_tls_required_refuses_a_plain_startup_before_any_password(tls_gateway) -> None:
    _, ports, _ = tls_gateway
    with pytest.raises(psycopg.OperationalError, match="lapse: TLS is required"):
        _connect(ports["required"], "disable")
    with _raw(ports["required"]) as sock:  # the raw answer: a FATAL 28000, as PostgreSQL's hostssl gives
        sock.sendall(_startup_packet())
        data, took = _until_closed(sock)
    assert data[:1] == b"E" and took < 1  # no authentication request: nothing reached the server
    sqlstate, message = _fatal(data)
    assert sqlstate == "28000" and message.startswith('lapse: TLS is required: no encryption for host "127.0.0.1"')
    for sslmode in ("require", "allow"):  # allow: libpq tries plain, is refused, tries again with TLS
        with _connect(ports["required"], sslmode) as conn:
            assert conn.pgconn.ssl_in_use and conn.execute("select 1").fetchone() == (1,)


def test_garbage_or_silence_instead_of_a_handshake_is_cut_within_the_limits(tls_gateway, monkeypatch,
                                                                             caplog) -> None:
    _, ports, _ = tls_gateway
    monkeypatch.setattr(gateway_mod, "AUTH_TIMEOUT", 0.5)
    with caplog.at_level(logging.WARNING):
        with _asked_tls(ports["tls"]) as sock:
            sock.sendall(_startup_packet())  # plain text where a ClientHello belongs
            data, took = _until_closed(sock)
        assert took < 0.4 and b"FATAL" not in data  # at once; lapse speaks no plain text into a TLS stream
        with _asked_tls(ports["tls"]) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
            data, took = _until_closed(sock)
        assert 0.3 < took < 2 and b"FATAL" not in data
        with _raw(ports["tls"]) as sock:  # plain bytes sent before the answer would be read as if encrypted
            sock.sendall(_request(pg.SSL_REQUEST) + _startup_packet())
            data, _ = _until_closed(sock)
        assert _fatal(data) == ("08P01", "lapse: protocol violation: received unencrypted data after SSL request")
        with _connect(ports["tls"], "require") as conn:  # and the listener serves others meanwhile
            assert conn.execute("select 1").fetchone() == (1,)
    said = [r.getMessage() for r in caplog.records if r.name == "lapse.postgres"]
    assert any("TLS handshake with 127.0.0.1 failed" in m for m in said), said
    assert any("TLS handshake with 127.0.0.1 did not finish within 0.5 s" in m for m in said), said
    _no_loop_errors(caplog)


def test_direct_tls_is_refused_with_a_clear_warning(tls_gateway, caplog) -> None:
    """PostgreSQL 17's ``sslnegotiation=direct`` (a TLS ClientHello straight away, ALPN ``postgresql``) is not
    supported: the handshake fails, lapse's log says why. Sent by hand (this libpq predates direct TLS)."""
    _, ports, _ = tls_gateway
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.set_alpn_protocols(["postgresql"])
    with caplog.at_level(logging.WARNING), socket.create_connection(("127.0.0.1", ports["tls"]), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            client.wrap_socket(raw, server_hostname="localhost")
    assert any("sslnegotiation=direct" in r.getMessage() for r in caplog.records if r.name == "lapse.postgres")
    _no_loop_errors(caplog)


def test_idle_and_revocation_cut_a_tls_connection_with_the_usual_fatal(tls_gateway) -> None:
    lapse, ports, _ = tls_gateway
    notices: list[str] = []
    with _connect(ports["tls"], "require") as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("select 1")
        time.sleep(2.0 + SLACK / 2)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 2")
    assert "terminating connection due to idle-session timeout (lapse session idle)" in str(caught.value)
    assert caught.value.sqlstate in ("57P05", None)
    assert any("this session will end in 1 seconds for inactivity" in n for n in notices), notices
    assert [e for e in lapse.audit_once("connection.terminated", "idle") if e.app == "tls"]
    with _connect(ports["required"], "require") as conn:
        conn.execute("select 1")
        asked = time.time()
        assert lapse.run(lambda rt: rt.gate.revoke_user("alice", "admin")) >= 1
        time.sleep(SLACK / 2)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 2")
    assert "terminating connection: lapse session revoked" in str(caught.value)
    cut = [e for e in lapse.audit_once("connection.terminated", "revoked") if e.app == "tlsreq"]
    assert cut and cut[-1].ts - asked <= SLACK


def _served_certificate(port: int) -> bytes:
    """The certificate (DER) the listener presents now, read with Python's own TLS client."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with _asked_tls(port) as sock, context.wrap_socket(sock) as tls:
        return tls.getpeercert(binary_form=True) or b""


def test_a_renewed_certificate_is_served_without_a_restart(tls_gateway, caplog) -> None:
    lapse, ports, ca = tls_gateway
    folder = lapse.loaded.base_dir / "rotated"
    before = _served_certificate(ports["rotated"])
    assert before == ssl.PEM_cert_to_DER_cert((folder / "server.pem").read_text())
    staging = folder / "new"
    staging.mkdir()
    renewed = certificate(staging, "server", signed_by=ca)
    (folder / "server.pem").write_bytes(certificate(staging, "other").cert.read_bytes())  # the key lags behind
    with caplog.at_level(logging.ERROR, logger="lapse.postgres"):
        assert _served_certificate(ports["rotated"]) == before  # a mismatched pair: the old one still serves
    assert any("still serving the previous certificate" in r.getMessage() for r in caplog.records)
    os.replace(renewed.key, folder / "server.key")
    os.replace(renewed.cert, folder / "server.pem")
    after = _served_certificate(ports["rotated"])
    assert after != before and after == ssl.PEM_cert_to_DER_cert((folder / "server.pem").read_text())


# ------------------------------------------------------------------ config: both files or neither, and good ones


def _write(folder: Path, text: str) -> Path:
    (folder / "lapse.toml").write_text(text)
    return folder / "lapse.toml"


def _problems(text: str, folder: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(folder, text))
    return str(caught.value)


def _entry(**keys: str | bool) -> str:
    lines = "".join(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}\n" for k, v in keys.items())
    return f'[[postgres]]\nname = "db"\nlisten = "127.0.0.1:6432"\nupstream = "127.0.0.1:5432"\n{lines}'


def test_tls_config_errors_name_the_key_and_line(tmp_path: Path) -> None:
    made = certificate(tmp_path, "server")
    other = certificate(tmp_path, "other")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    ok = load_config(_write(tmp_path, _entry(tls_cert="server.pem", tls_key="server.key", tls_required=True)))
    assert ok.config.postgres[0].tls_paths == (made.cert, made.key)  # relative to the config file's folder
    assert load_config(_write(tmp_path, _entry())).config.postgres[0].tls_paths is None
    made.key.chmod(0o604)  # allowed, as PostgreSQL would not: a warning (policy check still passes)
    warned = load_config(_write(tmp_path, _entry(tls_cert="server.pem", tls_key="server.key"))).format_warnings()
    assert any("lapse.toml:6: postgres[0].tls_key:" in w and "may be read by others (mode 604)" in w
               for w in warned), warned
    cases = [
        (_entry(tls_cert="server.pem"), "lapse.toml:1: postgres[0].tls_key: tls_cert is set, so tls_key is needed"),
        (_entry(tls_key="server.key"), "lapse.toml:1: postgres[0].tls_cert: tls_key is set, so tls_cert is needed"),
        (_entry(tls_required=True), "lapse.toml:5: postgres[0].tls_required: tls_required = true needs tls_cert"),
        (_entry(tls_cert="nowhere.pem", tls_key="server.key"),
         f"lapse.toml:5: postgres[0].tls_cert: cannot read {tmp_path / 'nowhere.pem'}: No such file or directory"),
        (_entry(tls_cert="server.pem", tls_key="garbage.pem"),
         f"lapse.toml:6: postgres[0].tls_key: {tmp_path / 'garbage.pem'} holds no PEM private key"),
        (_entry(tls_cert="garbage.pem", tls_key="server.key"),
         f"lapse.toml:5: postgres[0].tls_cert: {tmp_path / 'garbage.pem'} holds no PEM certificate"),
        (_entry(tls_cert="server.pem", tls_key="other.key"),
         f"lapse.toml:6: postgres[0].tls_key: {other.key} is not the private key of the certificate in {made.cert}"),
    ]
    for text, expected in cases:
        problems = _problems(text, tmp_path)
        assert expected in problems, (expected, problems)



def test_a_tls_client_that_stops_reading_is_cut_at_its_idle_deadline(tls_gateway) -> None:
    """Finding 2 through TLS (whose transport buffers on its own): the backend goes at the 2 s deadline."""
    lapse, ports, _ = tls_gateway
    with _direct(ports) as direct:
        conn = _connect(ports["tls"], "require")
        try:
            sent = time.time()
            conn.pgconn.send_query(b"select repeat('x', 1000) from generate_series(1, 200000)")
            conn.pgconn.flush()
            gone = _gone_at(direct, conn.info.backend_pid, limit=2.0 + SLACK + 3.0)
            assert gone - sent <= 2.0 + SLACK + 2.0, gone - sent
        finally:
            conn.close()
    assert _cut_event(lapse, "tls", "idle", sent).ts - sent <= 2.0 + SLACK
