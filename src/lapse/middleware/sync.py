"""The bridge the sync adapters (WSGI, Flask, Django) use to reach the async gate and store.

One event loop on one daemon thread per process. Why: the gate, the store and
the gateway's ``/_lapse`` endpoints are async (the very code the gateway and
the ASGI middleware run), and a store handle belongs to one loop (SQLite's
connection, a Redis pool). ``asyncio.run`` per request would open the store
and lose the sweeper every time; a loop per worker thread would open a store
and a sweeper per thread. One loop per process holds one store handle and one
sweeper, and a request thread only waits on a future: bench/middleware.py
measures what that costs. The loop starts on first use, so a pre-forking
server (gunicorn) gets one per worker, after the fork.

Judging without the hop. Handing a request to the loop thread and back costs
more than judging it (bench/middleware.py measures both). The embedded stores
(SQLite, memory) never suspend: each method runs to completion, as sqlite.py
says (the bridge turns SQLite's group commit off, which would suspend a write). So a request thread runs its judge, adopt or end itself, to completion,
while it holds the bridge's lock; and the loop thread holds that same lock
whenever it is not waiting in ``select``. Every piece of the gate and the store
therefore runs in one thread at a time, and a request thread's job runs as if
it were one more task that ran between two turns of the loop, which is exactly
the atomicity the async code already assumes. Other stores, and the ``/_lapse``
endpoints (Starlette's code may well wait on the loop), still make the hop.

A store that does not answer within ``timeout`` is a store that is down: the
request fails closed (503).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import selectors
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from ..config import LoadedConfig
from ..store.memory import MemoryStore
from ..store.sqlite import SqliteStore
from .core import (
    PREFIX,
    Enforcer,
    Facts,
    Judgement,
    Mode,
    Reply,
    Settings,
    StoreUnavailable,
    app_host,
    json_reply,
    running,
)

T = TypeVar("T")

EVENTS = "/_lapse/events"
MAX_BODY = 16 * 1024 + 1  # the gateway refuses forms beyond 16 KiB; one more byte lets it see that


NEVER_SUSPEND = (SqliteStore, MemoryStore)
"""Stores whose methods run to completion without waiting on the loop: judged in the request thread."""


class Bridge:
    def __init__(self, loaded: LoadedConfig, settings: Settings, *, clock: Callable[[], float] | None = None,
                 timeout: float = 10.0) -> None:
        self.loaded, self.settings, self.clock, self.timeout = loaded, settings, clock, timeout
        app_host(loaded, settings.app)  # an ambiguous or wrong app name fails here, not at the first request
        self._lock = threading.Lock()  # guards starting and stopping
        self._turn = threading.Lock()  # who may touch the gate and the store now (see the module's doc)
        self._direct = False
        self._pid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._enforcer: Enforcer | None = None

    @property
    def enforcer(self) -> Enforcer:
        if self._enforcer is None or self._pid != os.getpid():
            self._start()
        assert self._enforcer is not None
        return self._enforcer

    def run(self, job: Callable[[Enforcer], Coroutine[Any, Any, T]]) -> T:
        """``job(enforcer)``'s result: in this thread when the store never suspends, else on the loop."""
        enforcer = self.enforcer
        if not self._direct:
            return self.on_loop(job)
        if not self._turn.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"no turn at the session store within {self.timeout:g}s")
        try:
            return drive(job(enforcer))
        finally:
            self._turn.release()

    def on_loop(self, job: Callable[[Enforcer], Awaitable[T]]) -> T:
        """Run ``job(enforcer)`` on the loop and wait for it; no answer in time is a store outage."""
        enforcer = self.enforcer
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(job(enforcer), self._loop)  # type: ignore[arg-type]
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreUnavailable(f"no answer from the session store within {self.timeout:g}s") from None

    def close(self) -> None:
        """Stop the sweeper and close the store (at interpreter exit, or when a test is done)."""
        with self._lock:
            if self._loop is None or self._stop is None or self._pid != os.getpid():
                return
            self._loop.call_soon_threadsafe(self._stop.set)
            if self._thread is not None:
                self._thread.join(self.timeout)
            self._loop = self._enforcer = None

    def _start(self) -> None:
        with self._lock:
            if self._enforcer is not None and self._pid == os.getpid():
                return
            ready: concurrent.futures.Future[Enforcer] = concurrent.futures.Future()
            self._turn = turn = threading.Lock()  # a fresh one: after a fork, the parent's may look held
            loop = asyncio.SelectorEventLoop(_TurnTaking(turn))
            thread = threading.Thread(target=_hold_while_running, args=(turn, loop, self._serve(ready)),
                                      name="lapse-loop", daemon=True)
            thread.start()
            self._enforcer = ready.result(self.timeout)
            self._direct = isinstance(self._enforcer.rt.store, NEVER_SUSPEND)
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
        atexit.register(self.close)

    async def _serve(self, ready: concurrent.futures.Future[Enforcer]) -> None:
        self._stop = asyncio.Event()
        try:
            async with running(self.loaded, self.settings, clock=self.clock) as enforcer:
                if isinstance(enforcer.rt.store, SqliteStore):
                    # Before the sweeper's first write: a request thread must never meet a write queued
                    # for this loop's group commit (it could neither wait for it nor settle it).
                    enforcer.rt.store.group_commit = False
                ready.set_result(enforcer)
                await self._stop.wait()
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)


class _TurnTaking(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector: the loop thread gives up its turn only while it waits for something to do."""

    def __init__(self, turn: threading.Lock) -> None:
        super().__init__()
        self._turn = turn

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._turn.release()
        try:
            return super().select(timeout)
        finally:
            self._turn.acquire()


def _hold_while_running(turn: threading.Lock, loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, None]) -> None:
    with turn:
        loop.run_until_complete(main)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits on an event loop to its end, here and now."""
    try:
        while True:
            if coro.send(None) is not None:  # a future: only a loop could wake it
                raise RuntimeError("a job the bridge runs in the request thread waited on the event loop")
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        coro.close()


class SyncLapse:
    """What a sync adapter asks, each question one round trip to the loop; store outages become 503s."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.settings = bridge.settings

    @property
    def alongside(self) -> bool:
        return self.settings.mode is Mode.ALONGSIDE

    def judge(self, facts: Facts, sid: str | None, user: str | None = None) -> Judgement:
        try:
            return self.bridge.run(lambda e: e.judge(facts, sid, user))
        except StoreUnavailable as exc:
            return Judgement(self.bridge.enforcer.unavailable(facts, exc))

    def adopt(self, facts: Facts, user: str, replaces: str | None = None) -> str:
        return self.bridge.run(lambda e: e.adopt(facts, user, replaces))

    def end(self, sid: str | None, reason: str) -> None:
        self.bridge.run(lambda e: e.end(sid, reason))

    def unavailable(self, facts: Facts, exc: BaseException) -> Reply:
        return self.bridge.enforcer.unavailable(facts, exc)

    def cookie_sid(self, facts: Facts) -> str | None:
        return self.bridge.enforcer.cookie_sid(facts)

    def wrong_host(self, facts: Facts) -> Reply | None:
        """400 for a Host no ``[[apps]]`` entry claims, when no app is named (``Enforcer.wrong_host``)."""
        enforcer = self.bridge.enforcer
        return enforcer.wrong_host(facts.host) if enforcer.checks_host else None

    def endpoint(self, facts: Facts, sid: str | None, body: bytes, form_token: str | None = None) -> tuple[Reply, bool]:
        """A ``/_lapse/*`` request: (reply, whether the framework must sign its user out).

        The event stream is not served here: it would hold a worker thread for minutes per open tab.
        The widget, finding no stream, polls the passive ``/_lapse/session`` instead.
        """
        if facts.local == EVENTS:
            return json_reply(404, {"error": "no event stream with a sync server; poll /_lapse/session"},
                              [("Cache-Control", "no-store")]), False

        async def job(e: Enforcer) -> tuple[Reply, bool]:
            if self.alongside:
                special = await e.alongside_special(facts, sid, form_token)
                if special is not None:
                    return special
            reply = await call_asgi(e.gateway, e.gateway_scope(facts, sid), body)
            if self.alongside:  # the browser has no lapse cookie to set or clear
                reply.headers = [(k, v) for k, v in reply.headers if k.lower() != "set-cookie"]
            return reply, False

        try:
            return self.bridge.on_loop(job)
        except StoreUnavailable as exc:
            return self.unavailable(facts, exc), False


async def call_asgi(app: Any, scope: dict[str, Any], body: bytes) -> Reply:
    """One request to an ASGI app, its whole response collected (no streaming: see ``endpoint``)."""
    reply = Reply(500, [])
    chunks: list[bytes] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])
                             if k.lower() != b"content-length"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    reply.body = b"".join(chunks)
    return reply


def url_path(environ: dict[str, Any], *, wsgi_strings: bool = True) -> tuple[str, str]:
    """(the public path, the mount prefix): ``SCRIPT_NAME + PATH_INFO``, so a rule for
    ``/billing/admin/*`` holds for an app mounted at ``/billing`` as it does behind the gateway.
    WSGI hands the bytes over as latin-1 strings: read them as UTF-8, as Werkzeug does. Django's
    ``request.META`` holds them decoded already (``wsgi_strings=False``)."""
    root = (environ.get("SCRIPT_NAME") or "").rstrip("/")
    path = root + (environ.get("PATH_INFO") or "/")
    if wsgi_strings and not path.isascii():
        path, root = _utf8(path), _utf8(root)
    return path, root


def _utf8(wsgi_string: str) -> str:
    try:
        return wsgi_string.encode("latin-1").decode("utf-8", "replace")
    except UnicodeEncodeError:  # not a WSGI string at all: the server decoded it already
        return wsgi_string


def facts_of_environ(environ: dict[str, Any], *, wsgi_strings: bool = True) -> Facts:
    """A WSGI environ (or Django's ``request.META``, which follows it) as ``Facts``."""
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    host = headers.setdefault("host", environ.get("SERVER_NAME", ""))
    path, root = url_path(environ, wsgi_strings=wsgi_strings)
    return Facts(environ.get("REQUEST_METHOD", "GET"), path, environ.get("QUERY_STRING", ""), host, headers,
                 environ.get("REMOTE_ADDR"), root)


_JUDGED = (("host", "HTTP_HOST"), ("cookie", "HTTP_COOKIE"), ("accept", "HTTP_ACCEPT"),
           ("x-lapse-activity", "HTTP_X_LAPSE_ACTIVITY"), ("x-forwarded-for", "HTTP_X_FORWARDED_FOR"),
           ("x-real-ip", "HTTP_X_REAL_IP"))
"""The headers judging an app request reads (``core.Enforcer``: cookie, client IP, passive, refusal)."""


def judged_facts(environ: dict[str, Any], *, wsgi_strings: bool = True) -> Facts:
    """``facts_of_environ`` with only the headers judging reads: an app request's hot path.
    ``/_lapse`` requests need every header (``facts_of_environ``): the gateway sees them all."""
    headers = {name: environ[key] for name, key in _JUDGED if key in environ}
    host = headers.setdefault("host", environ.get("SERVER_NAME", ""))
    path, root = url_path(environ, wsgi_strings=wsgi_strings)
    return Facts(environ.get("REQUEST_METHOD", "GET"), path, environ.get("QUERY_STRING", ""), host, headers,
                 environ.get("REMOTE_ADDR"), root)


def is_lapse(path: str) -> bool:
    """Is this path inside the app (``PATH_INFO``, below the mount) one of lapse's own endpoints?"""
    return path.startswith(PREFIX)


__all__ = ["Bridge", "SyncLapse", "call_asgi", "drive", "facts_of_environ", "is_lapse", "judged_facts", "url_path"]
