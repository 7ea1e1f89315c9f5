"""Every store adapter, held to one contract (tests/store/test_contract.py).

Adding an adapter is one line in ``ADAPTERS``. ``async def`` tests run under a
plain ``asyncio.run`` (the hook below): no pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lapse.store.memory import MemoryStore
from lapse.store.redis import RedisStore
from lapse.store.sqlite import SqliteStore

from ..redis_server import shared_server

T0 = 1_700_000_000.25


class FakeClock:
    """A settable clock: the store's clock in tests."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass(frozen=True)
class Adapter:
    name: str
    open: Callable[[Path, FakeClock], Any]  # a store living in this folder
    shared: bool  # opening the same folder again gives a second handle on the same data


def open_redis(place: Path, clock: FakeClock) -> RedisStore:
    """On one real redis-server for the whole run; each folder gets its own key prefix (its own data)."""
    prefix = "t" + hashlib.sha256(str(place).encode()).hexdigest()[:12] + ":"
    return RedisStore(f"{shared_server().url}?prefix={prefix}", clock)


ADAPTERS = [
    Adapter("memory", lambda place, clock: MemoryStore(clock), shared=False),
    Adapter("sqlite", lambda place, clock: SqliteStore(place / "x.db", clock), shared=True),
    Adapter("redis", open_redis, shared=True),
]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests with ``asyncio.run``."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**args))
        return True
    return None


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
def adapter(request: pytest.FixtureRequest) -> Adapter:
    return request.param


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(adapter: Adapter, tmp_path: Path, clock: FakeClock) -> Any:
    s = adapter.open(tmp_path, clock)
    yield s
    run(s.close())


@pytest.fixture
def twin(adapter: Adapter, store: Any, tmp_path: Path, clock: FakeClock) -> Any:
    """A second handle on ``store``'s data (another connection where the adapter has them)."""
    if not adapter.shared:
        yield store
        return
    s = adapter.open(tmp_path, clock)
    yield s
    run(s.close())
