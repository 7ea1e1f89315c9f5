"""The auto-pipeline's cheaper paths keep its rules: held connections, its one timer, packing, write ids.

What these guard (store/redis_batch.py, store/redis.py): a connection held between batches is checked
before anything is sent on it, as the pool checks its own; a batch's timer turns only its own expiry into
a timeout, never a cancellation from outside; ``pack`` writes what redis-py would; write ids never repeat,
also in a forked child; and the read after an applied write hands back the record written, undecoded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from lapse.store import redis as redis_store
from lapse.store.base import StoreUnavailable, WriteResult
from lapse.store.redis import RedisStore
from lapse.store.redis_batch import pack
from lapse.store.redis_codec import session_keys, shard_of, tag

from ..redis_server import RedisServer
from .test_contract import T0, active, make_session


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


def _clients(server: RedisServer) -> int:
    info = server.command("INFO", "clients").decode()
    return int(next(line.split(":")[1] for line in info.splitlines() if line.startswith("connected_clients:")))


async def test_a_held_connection_is_reused_and_checked_before_it_is_sent_on(server: RedisServer) -> None:
    """Standalone: batches after the first open nothing new; a connection Redis closed (a restart, a CLIENT
    KILL) is connected again before a command that must not run twice is sent on it, so it runs, once.
    (redis-py 8's pool skips that check while maintenance notifications are "auto": ``connect`` turns them
    off on a standalone Redis, for the pool's own connections too.)"""
    store = RedisStore(server.url, lambda: T0)
    other = Redis(host="127.0.0.1", port=server.port)
    try:
        session = make_session(1, expires_in=100.0)
        await store.create(session)
        for _ in range(3):
            await store.read(session.key)
        assert store._batch is not None and len(store._batch._idle) == 1
        clients = _clients(server)
        for _ in range(20):
            assert (await store.read(session.key))[0] == session
        assert _clients(server) == clients  # the same held connection, batch after batch

        await other.client_kill_filter(_type="normal", skipme=True)  # Redis closes every store connection
        await asyncio.sleep(0.1)  # their FINs arrive
        # FAILURES may not run twice (resend=False): on a dead link it would fail as "outcome unknown".
        assert await store.failures("ip:192.0.2.9", T0, 60.0, add=1) == 1
        assert await store.failures("ip:192.0.2.9", T0, 60.0) == 1  # counted once
        assert await store.claim("nonce", "one") == "one"
        await other.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.1)
        assert await store.release("nonce")  # pooled, not pipelined, and not sent twice: the pool checks too
        assert (await store.read(session.key))[0] == session
    finally:
        await other.aclose()
        await store.close()


def test_only_a_standalone_redis_holds_connections() -> None:
    """Under Sentinel the pool's checkout stays: it drops idle connections when the master moves."""
    assert RedisStore("redis://127.0.0.1:1/0")._batch._hold is True  # type: ignore[union-attr]
    assert RedisStore("redis+sentinel://127.0.0.1:1/mymaster")._batch._hold is False  # type: ignore[union-attr]


async def test_a_cancelled_flush_is_no_timeout_and_a_hung_redis_is(server: RedisServer) -> None:
    """The batch's timer cancels its flush and says so as a timeout; a cancellation from outside (the event
    loop closing) stays a cancellation: its callers hear at once that the pipeline was cancelled. Both on
    a held connection, whose replies Redis (stopped) never sends."""
    timed, cancelled = (RedisStore(server.url + "?timeout=0.5", lambda: T0) for _ in range(2))
    try:
        session = make_session(2, expires_in=100.0)
        await timed.create(session)
        for store in (timed, cancelled):
            await store.read(session.key)
            assert len(store._batch._idle) == 1  # type: ignore[union-attr]
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            reading = asyncio.ensure_future(cancelled.read(session.key))
            await asyncio.sleep(0.05)
            (flush,) = cancelled._batch._flushing  # type: ignore[union-attr]
            flush.cancel()
            with pytest.raises(StoreUnavailable, match="pipeline was cancelled"):
                await reading
            assert time.monotonic() - started < 0.4  # not the timer's doing

            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no reply from Redis within 0.5 s"):
                await timed.read(session.key)
            assert 0.45 < time.monotonic() - started < 1.0
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        for store in (timed, cancelled):
            assert (await store.read(session.key))[0] == session  # the same store, no restart
    finally:
        await timed.close()
        await cancelled.close()


async def test_the_read_after_a_write_hands_back_the_record_written(server: RedisServer, monkeypatch) -> None:
    """Redis holds the bytes just written: the next read that finds them there decodes nothing, and what it
    hands back is what a fresh decode of those bytes gives."""
    store = RedisStore(server.url, lambda: T0 + 10)
    fresh = RedisStore(server.url, lambda: T0 + 10)
    try:
        one = make_session(3, expires_in=100.0)
        await store.create(one)
        read, _ = await store.read(one.key)
        moved = active(read, T0 + 5)
        assert await store.write(read, moved) is WriteResult.APPLIED

        decoded: list[str] = []
        real = store._decode
        monkeypatch.setattr(store, "_decode", lambda key, blob: decoded.append(key) or real(key, blob))
        again, _ = await store.read(one.key)
        assert decoded == []
        assert again == (await fresh.read(one.key))[0] == moved

        other = active(again, T0 + 7)
        assert await fresh.write(again, other) is WriteResult.APPLIED  # another replica moves it on
        assert (await store.read(one.key))[0] == other  # new bytes: decoded, never the remembered record
        assert decoded == [one.key]
    finally:
        await store.close()
        await fresh.close()


_ARG = st.binary(max_size=1500) | st.text(max_size=300) | st.integers() | st.floats(allow_nan=False)


@given(st.lists(_ARG, min_size=1, max_size=20))
def test_pack_writes_what_redis_py_writes(args: list[object]) -> None:
    command = ("EVALSHA", *args)
    assert pack(command) == b"".join(Connection().pack_command(*command))


def test_pack_takes_long_commands_and_refuses_what_redis_py_refuses() -> None:
    command = ("ZREM", b"k", *range(2000), b"x" * 70_000)
    assert pack(command) == b"".join(Connection().pack_command(*command))
    for bad in (True, None, [1], {"a": 1}):
        with pytest.raises(Exception, match="cannot send|Invalid input"):
            pack(("SET", b"k", bad))


@given(st.binary(min_size=1, max_size=40))
def test_a_sessions_keys_are_the_layouts(member: bytes) -> None:
    """``_session_keys`` builds from keys made once per shard what ``redis_codec.session_keys`` lays out."""
    store = RedisStore("redis://127.0.0.1:1/0?prefix=app:")
    record, due, ended = session_keys(b"app:", member)
    assert store._session_keys(member) == (record, due, ended, tag(b"app:", shard_of(member)) + b"w" + member)
    assert store._record_key(member) == record


def test_write_ids_never_repeat_also_in_a_forked_child() -> None:
    ids = {redis_store._write_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not be the parent's next ones
        try:
            os.write(write_end, redis_store._write_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 100).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    mine = redis_store._write_id()
    assert child and child[:16] != mine[:16]
    assert child not in ids | {mine}


async def test_a_refused_connection_is_still_a_broken_link(tmp_path: Path) -> None:
    """No Redis at all: the checkout fails as a broken link (sent nowhere), and the store fails closed."""
    store = RedisStore("redis://127.0.0.1:1/0?timeout=0.5", lambda: T0)
    try:
        with pytest.raises(StoreUnavailable, match="read failed"):
            await store.read(make_session(4, expires_in=1.0).key)
        with pytest.raises(RedisConnectionError):
            await store._batch.call(pack(("PING",)))  # type: ignore[union-attr]
    finally:
        await store.close()


def test_maintenance_notifications_are_turned_off_only_where_the_client_has_the_option() -> None:
    """redis-py 7.0-8.0 ship ``redis.maint_notifications`` but their async client takes no such keyword:
    passing it there would stop the store from starting at all."""

    class Before81:
        def __init__(self, host: str = "", port: int = 0) -> None: ...

    assert redis_store.checked_options(Before81) == {}
    here = redis_store.checked_options(Redis)
    assert set(here) <= {"maint_notifications_config"}
    Redis(**here)  # accepted by the installed client
