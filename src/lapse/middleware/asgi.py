"""ASGI middleware (Starlette, FastAPI, any ASGI app): lapse inside the app, on the app's own event loop.

The store is opened and the expiry sweeper started in the ASGI lifespan, on
the serving loop, so a request costs one awaited store round trip and no
thread hop. Without a lifespan (``TestClient`` used outside ``with``, a server
with lifespan off) requests fail with an error that says so, rather than
enforcing nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import LoadedConfig
from ..web.net import header_dict
from .core import (
    PREFIX,
    SESSION_FIELD,
    Enforcer,
    Facts,
    Mode,
    Reply,
    Settings,
    StoreUnavailable,
    form_token,
    loaded_config,
    running,
)

MAX_FORM = 16 * 1024  # a sign-out form is a few dozen bytes


def session_user(scope: Scope) -> str | None:
    """The default ``user_of`` for alongside mode: ``request.session["user"]``, as Starlette apps
    commonly keep it (``SessionMiddleware`` must wrap this middleware)."""
    user = scope["session"].get("user")
    return None if user in (None, "") else str(user)


class LapseMiddleware:
    """``app.add_middleware(LapseMiddleware, config="lapse.toml")`` (standalone), or with
    ``mode="alongside", login_url="/login"`` inside Starlette's ``SessionMiddleware``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: str | Path | LoadedConfig | None = None,
        mode: str = "standalone",
        app_name: str | None = None,
        login_url: str | None = None,
        public_paths: tuple[str, ...] | list[str] = (),
        user_of: Callable[[Scope], str | None] = session_user,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self.loaded = loaded_config(config)
        self.settings = Settings.of(mode, app=app_name, login_url=login_url, public_paths=public_paths)
        self.user_of = user_of
        self.clock = clock
        self.enforcer: Enforcer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        enf = self.enforcer
        if enf is None:
            raise RuntimeError("lapse middleware is not started: it opens its store in the ASGI lifespan "
                               "(uvicorn: lifespan on; Starlette's TestClient: use it as `with TestClient(app):`)")
        facts = facts_of(scope)
        alongside = enf.settings.mode is Mode.ALONGSIDE
        session: dict[str, Any] | None = None
        if alongside:
            if "session" not in scope:
                raise RuntimeError("alongside mode needs Starlette's SessionMiddleware outside LapseMiddleware")
            session = scope["session"]
        try:
            if kind == "http" and facts.path.startswith(PREFIX):
                await self._lapse(enf, facts, session, scope, receive, send)
                return
            proceed = await self._judge(enf, facts, session, scope, send)
        except StoreUnavailable as exc:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1011})
                return
            await send_reply(enf.unavailable(facts, exc), send)
            return
        if proceed is None:
            return
        await self.app(scope, receive, proceed)

    async def _judge(self, enf: Enforcer, facts: Facts, session: dict[str, Any] | None,
                     scope: Scope, send: Send) -> Send | None:
        """Judge an app request; the ``send`` to run the app with, or None when lapse answered."""
        user, sid = None, None
        if session is None:
            sid = enf.cookie_sid(facts)
        else:
            user, sid = self.user_of(scope), session.get(SESSION_FIELD)
            if user is None and sid is not None:  # the app signed its user out without clearing the session
                session.pop(SESSION_FIELD, None)
                await enf.end(sid, "logout")
                sid = None
        judgement = await enf.judge(facts, sid, user)
        if judgement.reply is not None:
            if judgement.sign_out and session is not None:
                session.clear()  # the Starlette way to sign out: the session cookie is emptied
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await send_reply(judgement.reply, send)
            return None
        scope["lapse.user"] = judgement.user
        if session is None:
            return send
        if user is not None and (sid is None or judgement.user != user):
            # Signed in before lapse was there, or another user signed in over it: a session of its own.
            sid = await enf.adopt(facts, user, replaces=sid)
            session[SESSION_FIELD] = sid
        scope["lapse.user"] = user
        return self._follow(enf, facts, session, sid, scope, send)

    def _follow(self, enf: Enforcer, facts: Facts, session: dict[str, Any], sid: str | None,
                scope: Scope, send: Send) -> Send:
        """Alongside: see what the app did to its session during this request, before the session
        cookie is written. Signed in: lapse's session starts now, so the absolute limit counts from
        the login itself. Signed out (session cleared): lapse's session ends (``logout``)."""

        async def following(message: Message) -> None:
            if message["type"] == "http.response.start":
                now_sid = session.get(SESSION_FIELD)
                if sid is not None and now_sid != sid:
                    await enf.end(sid, "logout")
                user = self.user_of(scope)
                if user is not None and now_sid is None:
                    session[SESSION_FIELD] = await enf.adopt(facts, user)
            await send(message)

        return following

    async def _lapse(self, enf: Enforcer, facts: Facts, session: dict[str, Any] | None,
                     scope: Scope, receive: Receive, send: Send) -> None:
        """``/_lapse/*``: the gateway's endpoints; in alongside mode login and logout go through the app."""
        if session is None:
            sid = enf.cookie_sid(facts)
        else:
            sid = session.get(SESSION_FIELD)
            form = await _form_token(receive) if facts.path == "/_lapse/logout" else None
            special = await enf.alongside_special(facts, sid, form)
            if special is not None:
                reply, sign_out = special
                if sign_out:
                    session.clear()
                await send_reply(reply, send)
                return

        async def no_lapse_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":  # the browser has no lapse cookie to clear
                message["headers"] = [(k, v) for k, v in message["headers"] if k.lower() != b"set-cookie"]
            await send(message)

        await enf.gateway(enf.gateway_scope(facts, sid, scope), receive, send if session is None else no_lapse_cookie)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Open the store and start the sweeper before the app reports it started; close after it stopped."""
        stack = AsyncExitStack()

        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    self.enforcer = await stack.enter_async_context(
                        running(self.loaded, self.settings, clock=self.clock)
                    )
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": f"lapse: {exc}"})
                    raise
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.enforcer = None
                await stack.aclose()
            await send(message)

        await self.app(scope, receive, wrapped)


def facts_of(scope: Scope) -> Facts:
    headers = header_dict(scope["headers"])
    client = scope.get("client")
    return Facts(scope.get("method", "GET"), scope["path"], scope.get("query_string", b"").decode("latin-1"),
                 headers.get("host", ""), headers, client[0] if client else None)


async def send_reply(reply: Reply, send: Send) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _form_token(receive: Receive) -> str | None:
    """``csrf_token`` from the (small) body of the widget's sign-out form."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_FORM or not message.get("more_body"):
            return form_token(body)


__all__ = ["LapseMiddleware", "session_user"]
