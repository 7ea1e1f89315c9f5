"""Redis ran the command, then the link broke before its reply came back: nothing may run twice.

A TCP proxy between the store and a real redis-server forwards everything, except that it drops the link,
reply unsent, right after Redis answered a chosen command. Before the fix the store (its auto-pipeline, and
redis-py's own retry on the Cluster path) sent every unanswered command again: a revocation came back
ENDED, a sign-in SessionExists, a failure was counted twice and an audit event appended twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lapse.audit import AuditLog
from lapse.core.events import AuditEvent
from lapse.core.policy import Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.store import redis_scripts as lua
from lapse.store.base import StoreUnavailable
from lapse.store.redis import RedisStore

from ..core.helpers import ListSink
from ..redis_server import RedisServer
from .test_contract import T0, make_session


class LosingProxy:
    """Forwards a connection to Redis; ``lose_reply_to(marker)``: the next request holding ``marker`` runs, but
    its reply is dropped together with the link (client and server sides both aborted)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.marker: bytes | None = None
        self.lost = 0  # replies dropped so far
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> LosingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def lose_reply_to(self, marker: bytes) -> None:
        self.marker = marker

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        doomed = False

        async def upstream() -> None:
            nonlocal doomed
            while data := await client_r.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker, doomed = None, True
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if doomed:  # Redis has run it and answered: the answer never arrives
                    self.lost += 1
                    client_w.transport.abort()
                    server_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, RuntimeError):
            pass
        finally:
            client_w.transport.abort()
            server_w.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


async def _store(redis: RedisServer, name: str, batched: bool) -> tuple[RedisStore, LosingProxy]:
    """A store through the proxy; ``batched=False`` takes the path a Cluster takes (one command per call)."""
    proxy = await LosingProxy(redis.port).start()
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0?prefix={name}-{batched}:", lambda: T0 + 10)
    if not batched:
        store._batch = None
    await store.ping()
    for script in (lua.READ, lua.CREATE, lua.WRITE, lua.FAILURES):
        await store._r.script_load(script)  # so a NOSCRIPT round trip does not get in the way of the marker
    return store, proxy


BATCHED = pytest.mark.parametrize("batched", [True, False], ids=["pipelined", "per-command"])


@BATCHED
async def test_a_revocation_whose_reply_is_lost_is_one_revocation(redis: RedisServer, batched: bool) -> None:
    """Gate.revoke says True and every sink hears one session.revoked (contract §5: exactly one end event)."""
    store, proxy = await _store(redis, "revoke", batched)
    sink = ListSink()
    gate = Gate(store, compile_policy(PolicySpec(defaults=Layer({"idle": 600.0, "absolute": 3600.0}))),
                AuditLog([sink]), b"s" * 32)
    try:
        sid, _ = await gate.sign_in("alice", host="a.test")
        key = gate.key_of(sid)
        proxy.lose_reply_to(_sha(lua.WRITE))
        assert await gate.revoke(key, "admin") is True
        assert proxy.lost == 1
        stored, _ = await store.read(key)
        assert stored is not None and stored.end_reason == "admin"
        assert sink.count({"session.revoked"}) == 1
        assert sink.count({"session.ended", "session.expired"}) == 0
    finally:
        await store.close()
        await proxy.close()


@BATCHED
async def test_a_sign_in_whose_reply_is_lost_is_signed_in(redis: RedisServer, batched: bool) -> None:
    """CREATE sent again finds exactly its own bytes: created, not SessionExists."""
    store, proxy = await _store(redis, "create", batched)
    try:
        session = make_session(1, t=T0)
        proxy.lose_reply_to(_sha(lua.CREATE))
        await store.create(session)
        assert proxy.lost == 1
        assert (await store.read(session.key))[0] == session
        assert [s.key for s in await store.sessions("alice")] == [session.key]
    finally:
        await store.close()
        await proxy.close()


@BATCHED
async def test_a_failure_whose_reply_is_lost_is_counted_once(redis: RedisServer, batched: bool) -> None:
    """Not sent again: the caller fails closed (outcome unknown), the counter holds one."""
    store, proxy = await _store(redis, "failures", batched)
    try:
        proxy.lose_reply_to(_sha(lua.FAILURES))
        with pytest.raises(StoreUnavailable):
            await store.failures("user:bob", T0, 60, add=1)
        assert proxy.lost == 1
        assert await store.failures("user:bob", T0, 60) == 1
    finally:
        await store.close()
        await proxy.close()


@BATCHED
async def test_an_audit_entry_whose_reply_is_lost_is_appended_once(redis: RedisServer, batched: bool) -> None:
    store, proxy = await _store(redis, "audit", batched)
    try:
        event = AuditEvent(T0, "session.expired", "ok", "alice", "abcd", None, None, None, "idle", None)
        proxy.lose_reply_to(b"XADD")
        with pytest.raises(StoreUnavailable):
            await store.append_audit([event])
        assert proxy.lost == 1
        assert [e.event for e in await store.tail_audit(10)] == ["session.expired"]
    finally:
        await store.close()
        await proxy.close()


@BATCHED
async def test_a_read_whose_reply_is_lost_is_read_again(redis: RedisServer, batched: bool) -> None:
    """Reads still survive a broken link: sent again at once, on a fresh connection."""
    store, proxy = await _store(redis, "read", batched)
    try:
        session = make_session(2, t=T0)
        await store.create(session)
        proxy.lose_reply_to(_sha(lua.READ))
        assert (await store.read(session.key))[0] == session
        assert proxy.lost == 1
    finally:
        await store.close()
        await proxy.close()


async def test_an_identical_end_by_another_writer_is_not_taken_for_ones_own(tmp_path: Path) -> None:
    """The write id: a sweeper's end with the same bytes as ours, already stored, still reads as ENDED for us."""
    from lapse.core.decide import end
    from lapse.store.base import WriteResult

    server = RedisServer(tmp_path / "r").start()
    store = RedisStore(server.url + "?prefix=same:", lambda: T0 + 10)
    try:
        session = make_session(3, t=T0)
        await store.create(session)
        ended = end(session, "idle", T0 + 5)
        assert await store.write(session, ended) is WriteResult.APPLIED
        assert await store.write(session, ended) is WriteResult.ENDED
    finally:
        await store.close()
        server.stop()
