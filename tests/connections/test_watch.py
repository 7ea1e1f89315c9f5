"""The store's push for long-lived connections (``store.watch``): ends are told at once in-process,
and within a second when another handle on the same SQLite file writes them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lapse.core.decide import revoke, sign_in
from lapse.core.policy import Limits
from lapse.store.memory import MemoryStore
from lapse.store.sqlite import SqliteStore
from lapse.store.watch import Watchable

LIMITS = Limits(None, None, 60.0, 3600.0, 10.0, {}, (), "allow", None, None, 60.0, 3600.0)


async def _new(store, key: str) -> None:
    d = sign_in(key, "alice", time.time(), LIMITS)
    await store.create(d.session)


async def _end(store, key: str) -> None:
    session, now = await store.read(key)
    await store.write(session, revoke(session, "admin", now).session)


def test_memory_store_tells_ends_at_once() -> None:
    async def go() -> None:
        store = MemoryStore()
        assert isinstance(store, Watchable)
        told: list[frozenset[str] | None] = []
        stop = store.watch(told.append)
        await _new(store, "k1")
        assert told == []  # a new session is no news for connections
        await _end(store, "k1")
        assert told == [frozenset({"k1"})]
        stop()
        await _new(store, "k2")
        await _end(store, "k2")
        assert told == [frozenset({"k1"})]

    asyncio.run(go())


def test_sqlite_store_tells_ends_by_another_handle_within_a_second(tmp_path: Path) -> None:
    async def go() -> None:
        here, there = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
        try:
            got = asyncio.Event()
            told: list[frozenset[str] | None] = []

            def callback(keys: frozenset[str] | None) -> None:
                told.append(keys)
                got.set()

            stop = here.watch(callback)
            await _new(there, "k1")
            await _new(there, "k2")
            await asyncio.sleep(0.6)
            assert told == []  # creations move the counter but end nothing
            started = time.monotonic()
            await _end(there, "k2")
            await asyncio.wait_for(got.wait(), 1.0)
            assert time.monotonic() - started < 1.0
            assert told == [frozenset({"k2"})]
            got.clear()
            await _end(here, "k1")  # this handle's own end: at once, before any poll
            assert told[-1] == frozenset({"k1"})
            stop()
        finally:
            await here.close()
            await there.close()

    asyncio.run(go())
