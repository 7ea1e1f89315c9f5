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

A store that does not answer within ``timeout`` is a store that is down: the
request fails closed (503).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..config import LoadedConfig
from .core import PREFIX, Enforcer, Facts, Judgement, Mode, Reply, Settings, StoreUnavailable, json_reply, running

T = TypeVar("T")

EVENTS = "/_lapse/events"
MAX_BODY = 16 * 1024 + 1  # the gateway refuses forms beyond 16 KiB; one more byte lets it see that


class Bridge:
    def __init__(self, loaded: LoadedConfig, settings: Settings, *, clock: Callable[[], float] | None = None,
                 timeout: float = 10.0) -> None:
        self.loaded, self.settings, self.clock, self.timeout = loaded, settings, clock, timeout
        self._lock = threading.Lock()
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

    def run(self, job: Callable[[Enforcer], Awaitable[T]]) -> T:
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
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_until_complete, args=(self._serve(ready),),
                                      name="lapse-loop", daemon=True)
            thread.start()
            self._enforcer = ready.result(self.timeout)
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
        atexit.register(self.close)

    async def _serve(self, ready: concurrent.futures.Future[Enforcer]) -> None:
        self._stop = asyncio.Event()
        try:
            async with running(self.loaded, self.settings, clock=self.clock) as enforcer:
                ready.set_result(enforcer)
                await self._stop.wait()
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)


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

    def endpoint(self, facts: Facts, sid: str | None, body: bytes, form_token: str | None = None) -> tuple[Reply, bool]:
        """A ``/_lapse/*`` request: (reply, whether the framework must sign its user out).

        The event stream is not served here: it would hold a worker thread for minutes per open tab.
        The widget, finding no stream, polls the passive ``/_lapse/session`` instead.
        """
        if facts.path == EVENTS:
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
            return self.bridge.run(job)
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


def facts_of_environ(environ: dict[str, Any]) -> Facts:
    """A WSGI environ (or Django's ``request.META``, which follows it) as ``Facts``."""
    headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = environ["CONTENT_TYPE"]
    host = headers.setdefault("host", environ.get("SERVER_NAME", ""))
    return Facts(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO") or "/",
                 environ.get("QUERY_STRING", ""), host, headers, environ.get("REMOTE_ADDR"))


def is_lapse(path: str) -> bool:
    return path.startswith(PREFIX)


__all__ = ["Bridge", "SyncLapse", "call_asgi", "facts_of_environ", "is_lapse"]
