"""Redis high availability and mutual TLS, with real processes: a Sentinel failover, and client certificates.

test_redis.py shows lapse finding a master through a real Sentinel and talking TLS; these tests kill or
freeze the master under a running store and watch the same store fail closed and come back, and make
the TLS listener demand a client certificate. Every process runs on a free loopback port in a temporary
folder and is stopped by its PID in the fixture's teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lapse.enforce import Gate, Verdict
from lapse.store import open_store
from lapse.store.base import StoreUnavailable
from lapse.store.redis import WATCH_PING, WATCH_RETRY, RedisStore

from ..redis_server import Certificate, RedisSentinels, RedisServer, certificate
from ..support import free_port
from .test_contract import make_session
from .test_redis import _gate

TIMEOUT = 0.5  # the store's timeout (seconds) in these tests: every connect and every reply
SLACK = 0.25  # seconds a failing call may take beyond its one timeout (scheduling on a busy 2-vCPU machine)
FAILOVER_DEADLINE = 12.0  # seconds from the failure to a store that answers again (measured: 2.2-3.2 s)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[RedisSentinels]:
    group = RedisSentinels(tmp_path / "ha").start()
    yield group
    group.stop()


def _request(sid: str) -> dict[str, Any]:
    return dict(host="app.test", path="/", ip="192.0.2.1", session_id=sid)


async def _checks(gate: Gate, sids: list[str]) -> list[Verdict | BaseException]:
    """One check per session, all in flight together (one pipelined batch): each a verdict or its exception."""
    return await asyncio.gather(*(gate.check(**_request(sid)) for sid in sids), return_exceptions=True)


@pytest.mark.parametrize("how", ["killed", "hung"])
async def test_sentinel_failover_fails_closed_then_recovers_on_its_own(
    sentinels: RedisSentinels, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Requirement: when the master dies, the same store (no restart) "fails closed while there is no master
    (calls raise StoreUnavailable, never hang past the store's timeouts, never return wrong data), and
    recovers on its own once the new master is known"; requests in flight at the failure get StoreUnavailable,
    never another exception type.

    ``killed``: SIGKILL (a crash: connections refused at once). ``hung``: SIGSTOP for the whole failover (a
    frozen host: nothing answers, every call waits out its timeout), then SIGCONT: the old master wakes up
    still calling itself master, with a session that was revoked on the new one meanwhile, and the store
    must not go back to it.
    """
    store = open_store(f"{sentinels.url}?timeout={TIMEOUT}")
    assert isinstance(store, RedisStore)  # the store `[store] url` opens
    gate = _gate(store)
    master = sentinels.master.proc
    assert master is not None
    told: list[tuple[float, frozenset[str] | None]] = []  # what the revocation push says, and when
    stop_watching = store.watch(lambda keys: told.append((time.monotonic(), keys)))
    try:
        sids = [(await gate.sign_in(f"user{i}", ip="192.0.2.1"))[0] for i in range(4)]
        revoked = sids.pop()
        assert await gate.revoke(gate.key_of(revoked), "admin")
        assert await _told(told, gate.key_of(revoked), time.monotonic() - 1.0, 1.0)  # subscribed
        assert all(v.decision.allowed for v in await _checks(gate, sids))  # type: ignore[union-attr]
        await asyncio.gather(*(store.ping() for _ in range(4)))  # several pooled connections to the old master
        sentinels.wait_replicated()  # Redis replicates asynchronously: only what the replica has can survive
        caplog.set_level(logging.INFO, logger="lapse.store")

        # In flight at the failure: the master stopped, so the commands are sent and unanswered.
        os.kill(master.pid, signal.SIGSTOP)
        in_flight = [asyncio.ensure_future(gate.check(**_request(sid))) for sid in [*sids, revoked]]
        in_flight.append(asyncio.ensure_future(gate.sign_in("late", ip="192.0.2.1")))
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in in_flight)
        failed = time.monotonic()
        if how == "killed":
            sentinels.master.kill()
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert time.monotonic() - failed < TIMEOUT + SLACK

        # No master until the sentinels agree and promote the replica: every call fails closed, in time.
        failures: list[str] = []
        slowest = 0.0
        while True:
            started = time.monotonic()
            outcomes = await _checks(gate, [*sids, revoked])
            slowest = max(slowest, time.monotonic() - started)
            unexpected = [o for o in outcomes if not isinstance(o, (Verdict, StoreUnavailable))]
            assert not unexpected, unexpected
            for sid, outcome in zip([*sids, revoked], outcomes):  # never wrong: what answers, answers as before
                if isinstance(outcome, Verdict):
                    assert outcome.decision.allowed is (sid != revoked), (sid == revoked, outcome.decision)
            if all(isinstance(o, Verdict) for o in outcomes):
                break
            failures.extend(str(o) for o in outcomes if isinstance(o, StoreUnavailable))
            assert time.monotonic() - failed < FAILOVER_DEADLINE, f"no master yet: {sentinels.master_ports()}"
            await asyncio.sleep(0.05)
        recovered = time.monotonic() - failed
        assert failures and slowest < TIMEOUT + SLACK  # one timeout per call at most (a hung master's)
        assert sentinels.replica.port in sentinels.master_ports()  # it answers from the promoted replica
        assert outcomes[-1].decision.reason.value == "revoked"  # type: ignore[union-attr]

        # Recovered, the same object: the sessions made before, new ones, writes, decisions.
        assert sorted(s.key for s in await store.sessions()) == sorted(gate.key_of(sid) for sid in sids)
        new_sid, _ = await gate.sign_in("after", ip="192.0.2.1")
        assert (await gate.check(**_request(new_sid))).decision.allowed
        revoked_at = time.monotonic()
        assert await gate.revoke(gate.key_of(sids[0]), "admin")
        assert (await gate.check(**_request(sids[0]))).decision.reason.value == "revoked"
        # Connection monitors hear of it: the push, or "re-check everything" once subscribed again. A
        # subscription on a frozen master hears nothing and must find out (WATCH_PING) to move.
        assert await _told(told, gate.key_of(sids[0]), revoked_at, WATCH_RETRY + WATCH_PING + TIMEOUT + SLACK)
        pushed = next(at for at, keys in told if at >= revoked_at) - revoked_at
        promoted = RedisStore(f"redis://127.0.0.1:{sentinels.replica.port}/0")
        try:
            assert (await promoted.read(gate.key_of(new_sid)))[0] is not None  # written to the new master
        finally:
            await promoted.close()

        if how == "hung":  # the old master wakes up, still a master holding sids[0] live: never read from it
            os.kill(master.pid, signal.SIGCONT)
            awake = time.monotonic()
            while time.monotonic() - awake < 1.0:
                verdicts = await _checks(gate, sids)
                assert [v.decision.allowed for v in verdicts] == [False, True, True], verdicts  # type: ignore[union-attr]
                await asyncio.sleep(0.05)

        lines = [(r.levelname, r.getMessage()) for r in caplog.records
                 if r.name == "lapse.store" and r.getMessage().startswith("redis store")]  # not the watch's
        assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines  # one outage, logged once
        print(f"\nfailover ({how}): answered again {recovered:.2f} s after the failure; slowest failing call "
              f"{slowest * 1000:.0f} ms; {len(failures)} refusals: {sorted(set(_cause(f) for f in failures))}; "
              f"a revocation after it reached the watcher in {pushed:.2f} s")
    finally:
        stop_watching()
        if master.poll() is None:
            os.kill(master.pid, signal.SIGCONT)  # a stopped process cannot act on the teardown's SIGTERM
        await store.close()


async def _told(told: list[tuple[float, frozenset[str] | None]], key: str, since: float, within: float) -> bool:
    """Whether the watcher heard, after ``since`` and before ``since + within``, of ``key`` or of
    "something may have ended" (``None``: every monitor re-checks), polling every 20 ms."""
    while True:
        if any(at >= since and (keys is None or key in keys) for at, keys in told):
            return True
        if time.monotonic() > since + within:
            return False
        await asyncio.sleep(0.02)


def _cause(message: str) -> str:
    """What a StoreUnavailable says after the target and the operation (for the printed summary)."""
    return message.split(" failed: ", 1)[-1][:80]


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, Certificate]]]:
    """A TLS-only redis-server that demands a client certificate from its CA (``tls-auth-clients yes``);
    yields its port and the certificates: ``ca``, ``client`` (signed by it), ``stranger`` (another CA's).
    One for the module: five RSA keys take about a second on this machine."""
    folder = tmp_path_factory.mktemp("mtls")
    ca = certificate(folder, "ca")
    certs = {"ca": ca, "client": certificate(folder, "client", signed_by=ca),
             "stranger": certificate(folder, "stranger", signed_by=certificate(folder, "other-ca"))}
    server_cert = certificate(folder, "server", signed_by=ca)
    port = free_port()
    server = RedisServer(folder, port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(server_cert.cert),
                         "--tls-key-file", str(server_cert.key), "--tls-ca-cert-file", str(ca.cert),
                         "--tls-auth-clients", "yes").start()
    yield port, certs
    server.stop()


def _mtls_url(port: int, certs: dict[str, Certificate], client: str | None) -> str:
    url = f"rediss://127.0.0.1:{port}/0?timeout={TIMEOUT}&ssl_ca_certs={certs['ca'].cert}"
    return url if client is None else f"{url}&ssl_certfile={certs[client].cert}&ssl_keyfile={certs[client].key}"


async def test_mutual_tls_with_a_client_certificate(mutual_tls: tuple[int, dict[str, Certificate]]) -> None:
    """Requirement: "with ssl_certfile/ssl_keyfile of a client certificate signed by the CA, the store works
    (create, read, Gate.check)" against a server with ``tls-auth-clients yes``."""
    port, certs = mutual_tls
    store = open_store(_mtls_url(port, certs, "client"))
    try:
        session = make_session(9, expires_in=100.0)
        await store.create(session)
        assert (await store.read(session.key))[0] == session
        gate = _gate(store)  # type: ignore[arg-type]
        sid, _ = await gate.sign_in("alice", ip="192.0.2.1")
        assert (await gate.check(**_request(sid))).decision.allowed
        assert await gate.revoke(gate.key_of(sid), "admin")
        assert (await gate.check(**_request(sid))).decision.reason.value == "revoked"
    finally:
        await store.close()


@pytest.mark.parametrize(("client", "alert"), [(None, "certificate required"), ("stranger", "unknown ca")],
                         ids=["no-client-certificate", "another-ca"])
async def test_mutual_tls_refuses_a_client_without_a_good_certificate(
    mutual_tls: tuple[int, dict[str, Certificate]], client: str | None, alert: str
) -> None:
    """Requirement: "without a client certificate, opening/using the store fails closed with StoreUnavailable
    and a clear message (not a hang, not a raw ssl exception escaping); with a client certificate from
    another CA, the same"."""
    port, certs = mutual_tls
    store = open_store(_mtls_url(port, certs, client))  # opening does not connect: it cannot fail here
    try:
        gate = _gate(store)  # type: ignore[arg-type]
        session = make_session(10, expires_in=100.0)
        for attempt in (store.ping, lambda: store.create(session), lambda: store.read(session.key),
                        lambda: gate.check(**_request("some-cookie")), lambda: gate.sign_in("alice")):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as refused:
                await attempt()
            assert time.monotonic() - started < TIMEOUT
            # Which store and what failed, then why. TLS 1.3 ends the client's handshake before the server
            # has judged its certificate, so the server's alert arrives with the first reply, or is lost to
            # the reset of the closed connection when the command got there after the close (measured here:
            # ~2/3 of refusals without a certificate, ~1/100 with another CA's): either way a refusal.
            assert re.fullmatch(rf"redis store rediss://127\.0\.0\.1:{port}/0: \w+ failed: .*"
                                rf"({alert}|Connection reset by peer).*", str(refused.value)), refused.value
    finally:
        await store.close()
