"""What the contract suite cannot see on Redis: its clock, its round trips, a Cluster, and an outage.

The contract suite (test_contract.py) already holds the Redis adapter to the
same rules as memory and SQLite; these tests run real ``redis-server``
processes of their own.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lapse.audit import AuditLog
from lapse.core.decide import end
from lapse.core.events import AuditEvent
from lapse.core.policy import Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.store.base import StoreUnavailable, User, WriteResult
from lapse.store.redis import RedisStore

from ..redis_server import RedisCluster, RedisServer, certificate, redis_binary, round_trips
from ..support import free_port, port_open
from .test_contract import T0, active, make_session

HASH_KEY = b"k" * 32


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


def _gate(store: RedisStore, idle: str = "30m") -> Gate:
    from lapse.core.durations import parse_duration

    policy = compile_policy(PolicySpec(defaults=Layer(settings={"idle": parse_duration(idle), "absolute": 8 * 3600.0})))
    return Gate(store, policy, AuditLog([]), HASH_KEY)


def _calls(server: RedisServer) -> int:
    return round_trips(server.command("INFO", "commandstats").decode())


def _redis_time(server: RedisServer) -> float:
    lines = server.command("TIME")  # a two-element array: *2, $n, seconds, $n, microseconds
    sec, usec = lines.split(b"\r\n")[2], lines.split(b"\r\n")[4]
    return int(sec) + int(usec) / 1e6


async def test_one_round_trip_per_decision_and_redis_clock(server: RedisServer, monkeypatch) -> None:
    """A decision that changes nothing is one command, one that writes two; the host's clock is never read."""
    store = RedisStore(server.url)
    try:
        gate = _gate(store)
        monkeypatch.setattr(time, "time", lambda: 1e9)  # a host clock years off: Redis's TIME must win
        sid, signed = await gate.sign_in("alice", host="app.test", ip="192.0.2.1")
        assert abs(signed.session.created_at - _redis_time(server)) < 5
        check = dict(host="app.test", path="/", ip="192.0.2.1", session_id=sid)
        await gate.check(**check)  # the first visit after sign-in may write (its activity step)
        before = _calls(server)
        verdicts = [await gate.check(**check) for _ in range(50)]
        spent = _calls(server) - before
        writes = sum(v.decision.changed for v in verdicts)
        assert all(v.decision.allowed for v in verdicts)
        assert spent == 50 + writes and writes <= 2  # coalesced: at most one write per second of activity
        t1 = _redis_time(server)
        _, now = await store.read(gate.key_of(sid))
        assert t1 <= now <= _redis_time(server)
    finally:
        await store.close()


async def test_outage_fails_closed_fast_logs_once_and_recovers(server: RedisServer, caplog) -> None:
    """Redis hung (SIGSTOP) or gone (stopped): StoreUnavailable within the timeout; back: served again."""
    import os
    import signal

    store = RedisStore(server.url + "?timeout=0.3")
    try:
        gate = _gate(store)
        sid, _ = await gate.sign_in("alice")
        check = dict(host="app.test", path="/", session_id=sid)
        assert (await gate.check(**check)).decision.allowed
        caplog.set_level(logging.INFO, logger="lapse.store")

        os.kill(server.proc.pid, signal.SIGSTOP)  # hung: every call must time out
        try:
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="read failed"):
                    await gate.check(**check)
                assert time.monotonic() - started < 1.0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert (await gate.check(**check)).decision.allowed  # the same client, no restart

        server.stop()  # gone: refused connections
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await gate.check(**check)
        server.start()  # the same port, empty (no persistence in tests)
        await store.ping()
        assert (await gate.check(**check)).decision.reason.value == "unknown"
        sid2, _ = await gate.sign_in("alice")
        assert (await gate.check(host="app.test", path="/", session_id=sid2)).decision.allowed

        lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lapse.store"]
        assert [level for level, _ in lines] == ["ERROR", "WARNING", "ERROR", "WARNING"]  # once per outage
        assert "failing closed" in lines[0][1] and "answers again" in lines[1][1]
        assert sid not in " ".join(m for _, m in lines)
    finally:
        await store.close()


async def test_a_three_master_cluster(cluster: RedisCluster) -> None:
    """The whole port on a real Cluster: sessions on every master, their indexes sharded, one script per write."""
    store = RedisStore(cluster.url, clock=lambda: T0)  # a fixed clock, so expiry is ours to move
    other = RedisStore(cluster.url, clock=lambda: T0)
    try:
        sessions = [make_session(i, user=f"u{i % 3}", expires_in=100.0 + i) for i in range(60)]
        for s in sessions:
            await store.create(s)
        assert all(b"keys=" in node.command("INFO", "keyspace") for node in cluster.nodes)  # spread over masters
        assert await other.count_live() == 60
        moved = active(sessions[0], T0 + 5)
        assert await other.write(sessions[0], moved) is WriteResult.APPLIED
        assert (await store.read(sessions[0].key))[0] == moved
        assert [s.key for s in await store.sessions("u1")] == sorted(s.key for s in sessions if s.user == "u1")
        due = await store.due(T0 + 130, 100)
        assert [s.key for s in due] == [s.key for s in sessions[1:31]]  # [0] moved on: its bound is later
        gate = _gate(store)
        assert await gate.revoke_user("u2", "admin") == 20
        assert await other.count_live() == 40
        assert await store.purge(T0 + 1) == 20
        await store.put_user(User("alice", "h", groups=("ops",), created_at=T0))
        assert [u.name for u in await other.users()] == ["alice"]
        await store.append_audit([AuditEvent(T0, "session.created", "success", "alice")])
        assert (await other.tail_audit(5))[0].user == "alice"
        # The stream is in another slot than the session: on a Cluster the events follow the write.
        last = sessions[1]
        ended = [AuditEvent(T0 + 6, "session.revoked", "success", last.user, last.key, None, None, None, "admin")]
        assert await store.write(last, end(last, "admin", T0 + 6), ended) is WriteResult.APPLIED
        assert await other.write(last, end(last, "idle", T0 + 7), ended) is WriteResult.ENDED
        assert (await other.tail_audit(5))[-2:] == [AuditEvent(T0, "session.created", "success", "alice"), *ended]
        assert await store.failures("ip:192.0.2.1", T0, 60.0, add=True) == 1
        assert await other.failures("ip:192.0.2.1", T0 + 1, 60.0) == 1
    finally:
        await store.close()
        await other.close()


async def test_an_end_and_its_event_are_one_script(server: RedisServer) -> None:
    """Issue 8, standalone and Sentinel: the event is appended by the write script, before the record changes,
    so a stream that refuses it leaves the session as it was (the sweeper ends it again, with its event)."""
    store = RedisStore(server.url, clock=lambda: T0)
    try:
        s = make_session(1)
        created = [AuditEvent(T0, "session.created", "success", s.user, s.key)]
        await store.create(s, created)
        ended = [AuditEvent(T0 + 5, "session.expired", "success", s.user, s.key, None, None, None, "idle")]
        audit_key = store.target.prefix + "audit"
        server.command("DEL", audit_key)
        server.command("SET", audit_key, "not-a-stream")
        with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
            await store.write(s, end(s, "idle", T0 + 5), ended)
        assert (await store.read(s.key))[0] == s
        server.command("DEL", audit_key)
        calls = _calls(server)
        assert await store.write(s, end(s, "idle", T0 + 5), ended) is WriteResult.APPLIED
        assert _calls(server) - calls == 1  # the end and its event: one round trip
        assert await store.tail_audit(5) == ended
    finally:
        await store.close()


async def _told_within_a_second(here: RedisStore, there: RedisStore, sessions: list) -> list:
    """``here`` watches; ``there`` ends the sessions: each end reaches ``here`` over pub/sub."""
    told: list[frozenset[str] | None] = []
    got = asyncio.Event()

    def callback(keys: frozenset[str] | None) -> None:
        told.append(keys)
        got.set()

    stop = here.watch(callback)
    try:
        await asyncio.sleep(0.3)  # the subscription is made by a task: let it start
        for s in sessions:
            await there.create(s)
        assert told == []  # new sessions are no news for connections
        gate = _gate(there)
        started = time.monotonic()
        assert await gate.revoke(sessions[0].key, "admin")
        await asyncio.wait_for(got.wait(), 1.0)
        assert time.monotonic() - started < 1.0
        return told
    finally:
        stop()


async def test_ends_are_pushed_to_every_replica(server: RedisServer) -> None:
    """Issue 9 on Redis: a revocation by one replica reaches the connection monitors of another within 1 s."""
    here, there = RedisStore(server.url), RedisStore(server.url)
    try:
        sessions = [make_session(i, expires_in=100.0) for i in range(2)]
        told = await _told_within_a_second(here, there, sessions)
        assert told == [frozenset({sessions[0].key})]
    finally:
        await here.close()
        await there.close()


async def test_ends_are_pushed_on_a_cluster(cluster: RedisCluster) -> None:
    here, there = RedisStore(cluster.url), RedisStore(cluster.url)
    try:
        sessions = [make_session(100 + i, expires_in=100.0) for i in range(2)]
        told = await _told_within_a_second(here, there, sessions)
        assert told == [frozenset({sessions[0].key})]
    finally:
        await here.close()
        await there.close()


async def test_reads_in_one_turn_are_one_pipeline(server: RedisServer) -> None:
    """Auto-pipelining: reads issued together share a round trip; the same read is sent once, fresh for all."""
    store = RedisStore(server.url)
    try:
        one, two = make_session(1, expires_in=100.0), make_session(2, expires_in=100.0)
        await store.create(one)
        await store.create(two)
        await asyncio.gather(*(store.read(s.key) for s in [one, two] * 20))  # loads the script, opens connections
        before = _calls(server)
        replies = await asyncio.gather(*(store.read(s.key) for s in [one] * 10 + [two] * 5))
        assert _calls(server) - before == 2  # one command per distinct session
        assert [r[0] for r in replies] == [one] * 10 + [two] * 5
        assert len({id(r[0]) for r in replies}) == 2  # identical records: the identical object (Gate reuses)

        # A caller that gives up cancels no other caller's read of the same record.
        first = asyncio.ensure_future(store.read(one.key))
        second = asyncio.ensure_future(store.read(one.key))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second)[0] == one
        assert first.cancelled()

        moved = active(one, T0 + 5)
        assert await store.write(one, moved) is WriteResult.APPLIED
        assert (await store.read(one.key))[0] == moved  # new bytes: decoded again, never the old object
    finally:
        await store.close()


async def test_through_a_real_sentinel(server: RedisServer, tmp_path: Path) -> None:
    """``redis+sentinel://``: lapse asks a real Sentinel where the master is, then works there."""
    port = free_port()
    folder = tmp_path / "sentinel"
    folder.mkdir()
    conf = folder / "sentinel.conf"  # Sentinel rewrites its config file: it must be its own
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                    f"sentinel monitor lapsemaster 127.0.0.1 {server.port} 1\n")
    log = open(folder / "sentinel.log", "wb")  # noqa: SIM115  (the process owns it)
    proc = subprocess.Popen([redis_binary(), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 10
        while b"+monitor master lapsemaster" not in (folder / "sentinel.log").read_bytes() or not port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "sentinel.log").read_text()
            await asyncio.sleep(0.02)
        store = RedisStore(f"redis+sentinel://127.0.0.1:{port}/lapsemaster")
        try:
            session = make_session(7, expires_in=100.0)
            await store.create(session)
            assert (await store.read(session.key))[0] == session
            assert (await RedisStore(server.url).read(session.key))[0] == session  # it went to the master
            assert await _gate(store).revoke(session.key, "admin")
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_over_tls(tmp_path: Path) -> None:
    """``rediss://``: a real TLS listener with a certificate lapse is told to trust, and one it is not."""
    folder = tmp_path / "tls"
    folder.mkdir()
    made = certificate(folder, "server")  # self-signed: the server's certificate and its own CA
    port = free_port()
    cert = made.cert
    tls = RedisServer(folder, port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                      "--tls-key-file", str(made.key), "--tls-ca-cert-file", str(cert),
                      "--tls-auth-clients", "no").start()
    try:
        store = RedisStore(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
        untrusting = RedisStore(f"rediss://127.0.0.1:{port}/0")  # the system's CAs: a self-made cert fails
        try:
            session = make_session(8, expires_in=100.0)
            await store.create(session)
            assert (await store.read(session.key))[0] == session
            with pytest.raises(StoreUnavailable):
                await untrusting.ping()
        finally:
            await store.close()
            await untrusting.close()
    finally:
        tls.stop()
