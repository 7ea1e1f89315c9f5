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
from ..web.net import client_ip, header_dict
from .core import (
    PREFIX,
    SESSION_FIELD,
    Enforcer,
    Facts,
    Mode,
    Reply,
    Settings,
    StoreUnavailable,
    app_host,
    form_token,
    loaded_config,
    presented,
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
        app_host(self.loaded, app_name)  # an ambiguous or wrong app_name fails here, not at the first request
        self.user_of = user_of
        self.alongside = self.settings.mode is Mode.ALONGSIDE
        self.clock = clock
        self.enforcer: Enforcer | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await (self._lifespan if kind == "lifespan" else self.app)(scope, receive, send)
            return
        enf = self.enforcer
        if enf is None:
            raise RuntimeError("lapse middleware is not started: it opens its store in the ASGI lifespan "
                               "(uvicorn: lifespan on; Starlette's TestClient: use it as `with TestClient(app):`)")
        if enf.checks_host:
            wrong = enf.wrong_host(_header(scope, b"host"))
            if wrong is not None:
                await refuse(scope, send, wrong)
                return
        path, root = paths(scope)
        if self.alongside or (kind == "http" and path.startswith(PREFIX, len(root))):
            await self._other(enf, scope, receive, send)
            return
        if enf.is_public(path):
            scope["lapse.user"] = None
            await self.app(scope, receive, send)
            return
        # The hot path, as forward-auth's: only the headers judging needs, one awaited gate check.
        host, ip, passive, cookie = peek(enf, scope)
        sid, judged = enf.cookies.presented(cookie)
        try:
            verdict = await enf.rt.gate.check(host=host, path=path, method=scope.get("method", "GET"), ip=ip,
                                              passive_header=passive, session_id=judged)
        except StoreUnavailable as exc:
            await refuse(scope, send, enf.unavailable(facts_of(scope), exc), 1011)
            return
        d = verdict.decision
        if d.allowed and d.session is not None:
            scope["lapse.user"] = d.session.user
            await self.app(scope, receive, send)
            return
        await refuse(scope, send, enf.refusal(facts_of(scope), verdict, sid))

    async def _other(self, enf: Enforcer, scope: Scope, receive: Receive, send: Send) -> None:
        """Alongside mode, and ``/_lapse/*`` in either mode."""
        session: dict[str, Any] | None = None
        if self.alongside:
            if "session" not in scope:
                raise RuntimeError("alongside mode needs Starlette's SessionMiddleware outside LapseMiddleware")
            session = scope["session"]
        try:
            path, root = paths(scope)
            if session is None or (scope["type"] == "http" and path.startswith(PREFIX, len(root))):
                await self._lapse(enf, facts_of(scope), session, scope, receive, send)
                return
            proceed = await self._judge(enf, session, scope, send)
        except StoreUnavailable as exc:
            await refuse(scope, send, enf.unavailable(facts_of(scope), exc), 1011)
            return
        if proceed is not None:
            await self.app(scope, receive, proceed)

    async def _judge(self, enf: Enforcer, session: dict[str, Any], scope: Scope, send: Send) -> Send | None:
        """Alongside: judge an app request; the ``send`` to run the app with, or None when lapse answered."""
        user, sid = self.user_of(scope), session.get(SESSION_FIELD)
        if user is None and sid is not None:  # the app signed its user out without clearing the session
            session.pop(SESSION_FIELD, None)
            await enf.end(sid, "logout")
            sid = None
        judged = None
        if user is not None and sid is not None:
            host, ip, passive, _ = peek(enf, scope)
            verdict = await enf.rt.gate.check(host=host, path=paths(scope)[0], method=scope.get("method", "GET"),
                                              ip=ip, passive_header=passive, session_id=presented(sid))
            d = verdict.decision
            if not (d.allowed and d.session is not None):
                judgement = await enf.refused(facts_of(scope), verdict, sid, user)
                if judgement.sign_out:
                    session.clear()  # the Starlette way to sign out: the session cookie is emptied
                await refuse(scope, send, judgement.reply)  # type: ignore[arg-type]
                return None
            judged = d.session.user
        if user is not None and (sid is None or judged != user):
            # Signed in before lapse was there, or another user signed in over it: a session of its own.
            sid = await enf.adopt(facts_of(scope), user, replaces=sid)
            session[SESSION_FIELD] = sid
        scope["lapse.user"] = user
        return self._follow(enf, session, sid, scope, send)

    def _follow(self, enf: Enforcer, session: dict[str, Any], sid: str | None, scope: Scope, send: Send) -> Send:
        """Alongside: see what the app did to its session during this request, before the session
        cookie is written. Signed in: lapse's session starts now, so the absolute limit counts from
        the login itself. Signed out (session cleared, or only its user removed): lapse's session ends
        (``logout``) now, so a copy of the signed, pre-logout session cookie is refused later."""
        request = dict(scope)  # as it came in: the app's routing may add to the scope

        async def following(message: Message) -> None:
            if message["type"] == "http.response.start":
                now_sid, user = session.get(SESSION_FIELD), self.user_of(scope)
                if sid is not None and (now_sid != sid or user is None):
                    await enf.end(sid, "logout")
                    session.pop(SESSION_FIELD, None)
                    now_sid = None
                if user is not None and now_sid is None:
                    session[SESSION_FIELD] = await enf.adopt(facts_of(request), user)
            await send(message)

        return following

    async def _lapse(self, enf: Enforcer, facts: Facts, session: dict[str, Any] | None,
                     scope: Scope, receive: Receive, send: Send) -> None:
        """``/_lapse/*``: the gateway's endpoints; in alongside mode login and logout go through the app."""
        if session is None:
            sid = enf.cookie_sid(facts)
        else:
            sid = session.get(SESSION_FIELD)
            wants_form = facts.method == "POST" and facts.local in ("/_lapse/login", "/_lapse/logout")
            form = await _form_token(receive) if wants_form else None
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


def peek(enf: Enforcer, scope: Scope) -> tuple[str, str | None, bool, str]:
    """(host, client IP, passive, Cookie header) from the raw ASGI headers, decoding only those;
    the forwarded ones count only when the peer is a trusted proxy. One pass, no dict: every app
    request runs this."""
    host = activity = b""
    cookie = forwarded = real = None
    for name, value in scope["headers"]:  # ASGI header names are lower-case; repeats join as header_dict's
        if name == b"cookie":
            cookie = value if cookie is None else cookie + b"; " + value
        elif name == b"host":
            host = value
        elif name == b"x-lapse-activity":
            activity = value
        elif name == b"x-forwarded-for":
            forwarded = value if forwarded is None else forwarded + b", " + value
        elif name == b"x-real-ip":
            real = value
    client = scope.get("client")
    ip = peer = client[0] if client else None
    if (forwarded is not None or real is not None) and enf.trust(peer):
        sent = {"x-forwarded-for": forwarded, "x-real-ip": real}
        ip = client_ip(peer, {k: v.decode("latin-1") for k, v in sent.items() if v is not None}, enf.trust)
    return (enf.app_host or host.decode("latin-1"), ip, activity.lower() == b"passive",
            cookie.decode("latin-1") if cookie else "")


def paths(scope: Scope) -> tuple[str, str]:
    """(the public path, the app's mount prefix). Servers differ on whether ``path`` already holds
    ``root_path`` (uvicorn's does, Starlette's TestClient's not): read as Starlette's routing reads it,
    so the same URL is judged as under WSGI (``SCRIPT_NAME + PATH_INFO``)."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if not root or path == root or path.startswith(root + "/"):
        return path, root
    return root + path, root


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def facts_of(scope: Scope) -> Facts:
    """The whole request (every header decoded): for refusals and ``/_lapse``, off the hot path."""
    headers = header_dict(scope["headers"])
    client = scope.get("client")
    path, root = paths(scope)
    return Facts(scope.get("method", "GET"), path, scope.get("query_string", b"").decode("latin-1"),
                 headers.get("host", ""), headers, client[0] if client else None, root)


async def refuse(scope: Scope, send: Send, reply: Reply, ws_code: int = 1008) -> None:
    """Lapse answers instead of the app: a WebSocket is closed (policy violation, or server error)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": ws_code})
    else:
        await send_reply(reply, send)


async def send_reply(reply: Reply, send: Send) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _form_token(receive: Receive) -> str | None:
    """``csrf_token`` from the (small) body of the widget's sign-out (or sign-in-again) form."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_FORM or not message.get("more_body"):
            return form_token(body)


__all__ = ["LapseMiddleware", "session_user"]
