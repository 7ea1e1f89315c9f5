"""Redis: the user's index never loses a session being created.

``create`` adds the index entry, then (one round trip later) the record. Before the fix, ``sessions(user)``
run in between removed the entry (its record was missing), so ``revoke_user`` and ``max_sessions`` never
saw that session again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lapse.store import redis_scripts as lua
from lapse.store.base import WriteResult
from lapse.store.redis import INDEX_GRACE, RedisStore

from ..redis_server import RedisServer
from .conftest import FakeClock
from .test_contract import T0, make_session


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


def _store(redis: RedisServer, name: str, clock: FakeClock) -> RedisStore:
    return RedisStore(f"{redis.url}?prefix={name}:", clock)


async def test_a_listing_between_index_entry_and_record_keeps_the_entry(redis: RedisServer) -> None:
    """The exact interleaving: sessions('alice') runs after create's index entry, before its record."""
    clock = FakeClock()
    store = _store(redis, "between", clock)
    try:
        old, new = make_session(1), make_session(2)
        await store.create(old)
        seen_between: list[str] = []
        real_eval = store._eval

        async def eval_(script: str, keys: Any, args: Any = (), **kw: Any) -> Any:
            if script is lua.CREATE:
                seen_between.extend(s.key for s in await store.sessions("alice"))
            return await real_eval(script, keys, args, **kw)

        store._eval = eval_  # type: ignore[method-assign]
        await store.create(new)
        store._eval = real_eval  # type: ignore[method-assign]
        assert seen_between == [old.key]  # the new record was not there yet
        assert sorted(s.key for s in await store.sessions("alice")) == sorted([old.key, new.key])
    finally:
        await store.close()


async def test_an_entry_without_a_record_is_dropped_after_the_grace(redis: RedisServer) -> None:
    """A crash between entry and record: kept INDEX_GRACE seconds, then forgotten."""
    clock = FakeClock()
    store = _store(redis, "grace", clock)
    try:
        orphan = make_session(3)
        await store._r.zadd(store._user_index("alice"), {b"\x01" * 16: orphan.created_at})
        assert await store.sessions("alice") == []
        assert await store._r.zcard(store._user_index("alice")) == 1
        clock.advance(INDEX_GRACE + 1)
        assert await store.sessions("alice") == []
        assert await store._r.zcard(store._user_index("alice")) == 0
    finally:
        await store.close()


async def test_the_set_older_versions_kept_is_still_read(redis: RedisServer) -> None:
    """Upgrade: sessions indexed by an older version (the ``u:`` set) are listed and revoked; an entry there
    without a record moves to the new index with the grace, then goes; ended ones go at once."""
    clock = FakeClock()
    store = _store(redis, "legacy", clock)
    try:
        live, ended = make_session(4), make_session(5)
        for s in (live, ended):
            await store.create(s)
            await store._r.zrem(store._user_index("alice"), bytes.fromhex(s.key))
            await store._r.sadd(store._user_key("alice"), bytes.fromhex(s.key))  # as an older version indexed it
        await store._r.sadd(store._user_key("alice"), b"\x02" * 16)  # no record (yet?)
        assert await store.write(ended, ended.with_(ended_at=T0, end_reason="logout")) is WriteResult.APPLIED
        assert [s.key for s in await store.sessions("alice")] == [live.key]
        assert await store._r.smembers(store._user_key("alice")) == {bytes.fromhex(live.key)}
        assert await store._r.zrange(store._user_index("alice"), 0, -1) == [b"\x02" * 16]
        clock.advance(INDEX_GRACE + 1)
        assert [s.key for s in await store.sessions("alice")] == [live.key]
        assert await store._r.zcard(store._user_index("alice")) == 0
    finally:
        await store.close()


async def test_purge_forgets_both_indexes(redis: RedisServer, tmp_path: Path) -> None:
    clock = FakeClock()
    store = _store(redis, "purge", clock)
    try:
        s = make_session(6)
        await store.create(s)
        await store._r.sadd(store._user_key("alice"), bytes.fromhex(s.key))
        await store.write(s, s.with_(ended_at=T0, end_reason="logout"))
        assert await store.purge(T0 + 1) == 1
        assert await store._r.exists(store._user_key("alice"), store._user_index("alice")) == 0
    finally:
        await store.close()
