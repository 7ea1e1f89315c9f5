"""The gateway's ASGI app: CONTRACT.md §4 on the wire, thin over ``enforce.Gate``.

Every handler gathers facts (cookie, trusted client IP, the original request),
asks the gate, and turns the verdict into HTTP. Forward-auth is dispatched
before any routing: it is the hot path. Any store failure becomes a 503 with a
clear page or JSON and one log line: the gateway fails closed, never open.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import Message, Receive, Scope, Send

from ..core import events as ev
from ..core.decide import Reason
from ..core.device import from_user_agent
from ..core.events import AuditEvent
from ..core.policy import normalize_host
from ..enforce import Gate, Verdict
from ..identity import verify_password
from ..monitor import Connections, Facts
from ..outage import OutageLog
from ..runtime import Runtime
from ..store.base import StoreUnavailable, User
from ..totp import enrolled
from .account import PASSWORD, TOTP, Account
from .attempts import Attempts, password_keys
from .forms import read_form
from .forwarding import unsafe_path, upstream_path
from .metrics import Metrics
from .net import Trust, Unjudgeable, canonical_path, client_ip, header_dict, original_request, reencoded, requested_host
from .proxy import Upstream
from .streams import guard, lasting
from .tokens import Cookies, Csrf, new_nonce, parse_cookies, presented, valid_id

log = logging.getLogger("lapse.web")

NO_STORE = "no-store"
_NO_STORE = (b"cache-control", b"no-store")
_EMPTY = (b"content-length", b"0")
_CANNOT_JUDGE = [_NO_STORE, (b"x-lapse-reason", b"forbidden"), _EMPTY]
"""Forward-auth's answer when it cannot tell which request it is asked about: a refusal, never a guess."""
_AUTH_HEADERS = frozenset(
    {b"host", b"cookie", b"x-forwarded-for", b"x-real-ip", b"x-original-method", b"x-original-uri",
     b"x-forwarded-method", b"x-forwarded-uri", b"x-forwarded-host", b"x-lapse-activity"}
)
"""The request headers forward-auth reads; the rest are never decoded."""
LOGIN = "/_lapse/login"
FRAMING = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
"""Every page lapse renders: none may be framed (clickjacking on sign-in, password and set-up forms)."""
UNKNOWN_COOKIE_LIMIT = 50  # unknown session cookies from one IP per login window before it is throttled
EVENTS_EVERY = 1.0  # seconds between an event stream's looks at its session
KEEPALIVE = 15.0  # a comment line at least this often, so proxies keep the stream open
STREAM_LIFETIME = 300.0  # then the client reconnects (and may land on another replica)
WIDGET = Path(__file__).with_name("static") / "widget.js"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def safe_next(value: str | None) -> str:
    """Only a same-site relative path; anything else (``//evil``, ``https://``, ``/\\evil``) goes to ``/``."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 0x20 or c == "\\" for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def location_of(target: str) -> str:
    """A ``safe_next`` path as a ``Location`` header: ASCII (headers are Latin-1 at best), the rest
    percent-encoded as UTF-8, escapes already there kept, a ``%`` that starts none encoded itself;
    so it can never fail to send, and it decodes back to ``target``."""
    return quote(_LONE_PERCENT.sub("%25", target), safe="/?#[]@!$&'()*+,;=:~%")


def _step_up_challenge(verdict: Verdict) -> str:
    """RFC 9470 for an API client: what would satisfy the route. ``max_age`` when the sign-in is too old
    (or the network changed: a fresh sign-in is what helps); ``acr_values="mfa"`` (RFC 8176's name for
    more than one factor) when a second factor is missing, without a ``max_age`` the session already meets."""
    why = next((e.reason for e in verdict.decision.events if e.event == ev.STEP_UP_REQUIRED), None)
    step = verdict.effective.step_up
    challenge = 'Bearer error="insufficient_user_authentication"'
    if why == "mfa":
        return challenge + ', error_description="a second factor is required", acr_values="mfa"'
    return challenge + f", max_age={int(step.max_auth_age) if step else 0}"


def login_url(next_uri: str, reason: str | None) -> str:
    query = "next=" + quote(next_uri, safe="/")
    return f"{LOGIN}?{query}&reason={reason}" if reason else f"{LOGIN}?{query}"


_MISSING = [_NO_STORE, (b"x-lapse-reason", b"missing"), (b"location", login_url("/", "missing").encode()), _EMPTY]
"""Forward-auth's answer without a session when it cannot tell the request: sign-in is needed whatever it was."""


class Gateway:
    """The ASGI application. ``runtime`` supplies the gate (policy, store, audit) and the config."""

    def __init__(self, runtime: Runtime, metrics: Metrics | None = None) -> None:
        self.rt = runtime
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_audit(runtime.audit)  # issue 8: expiries, step-ups, sink drops
        cfg = runtime.loaded.config
        self.trust = Trust(cfg.server.trusted_proxies)
        self.cookies = Cookies(cfg.server.effective_cookie_name, cfg.server.cookie_secure)
        self._public_host = normalize_host(urlsplit(str(cfg.server.public_url)).netloc)
        # Behind https, every answer a browser reads says so for a year (NIST SP 800-63B 7.1: no fall-back to
        # plain http once signed in). Not on /_lapse/auth: proxies do not pass its headers to the browser.
        https = urlsplit(str(cfg.server.public_url)).scheme == "https"
        self._hsts = (b"strict-transport-security", b"max-age=31536000") if https else None
        self.csrf = Csrf(runtime.secrets.csrf_key)
        self.login_cfg = cfg.login
        self.attempts = Attempts(runtime.store, runtime.audit, runtime.sealer, cfg.login.window, cfg.login.max_attempts)
        self._outage = OutageLog(log, "store unavailable, failing closed")
        self._misconfigured = OutageLog(log, "forward-auth refused, the proxy is misconfigured")
        self.pages = Environment(loader=PackageLoader("lapse.web"), autoescape=True)
        self.upstream = (
            Upstream(cfg.server.upstream, inject_widget=cfg.server.inject_widget)
            if cfg.server.mode == "proxy" and cfg.server.upstream
            else None
        )
        self.account = Account(self)
        routes = [
            Route(LOGIN, self.login_page, methods=["GET"]),
            Route(LOGIN, self.login, methods=["POST"]),
            Route("/_lapse/logout", self.logout, methods=["POST"]),
            Route(PASSWORD, self.account.password_page, methods=["GET"]),
            Route(PASSWORD, self.account.change_password, methods=["POST"]),
            Route(TOTP, self.account.totp_page, methods=["GET"]),
            Route(TOTP, self.account.totp_enrol, methods=["POST"]),
            Route("/_lapse/session", self.session_status, methods=["GET"]),
            Route("/_lapse/session/activity", self.session_activity, methods=["POST"]),
            Route("/_lapse/healthz", self.healthz, methods=["GET"]),
            Route("/_lapse/events", self.events, methods=["GET"]),
            Route("/_lapse/widget.js", self.widget, methods=["GET"]),
        ]
        self.oidc = None
        if cfg.oidc is not None:  # sign-in through an OpenID provider (web/oidc.py)
            from .oidc import OidcWeb

            self.oidc = OidcWeb(self, cfg.oidc)
            routes += self.oidc.routes()
        from .admin import Pages  # issue 8: the admin and self-service pages

        self.pages_admin = Pages(self)
        routes += self.pages_admin.routes()
        self._widget = WIDGET.read_bytes() if WIDGET.exists() else b"/* lapse widget: not built */\n"
        self._widget_tag = hashlib.sha256(self._widget).hexdigest()[:16]
        # (session, deadline kind) -> the deadline (whole seconds) the client was warned of: told once each.
        # Per process: with several workers a warning (and its renewal) may be told once by each.
        self._warned: dict[tuple[str, str], int] = {}
        self._flooding: dict[str, float] = {}  # IP -> until when its session cookies go unread
        self.closing = asyncio.Event()  # set on shutdown: event streams end so draining does not wait
        # Long-lived connections (WebSockets, streams): a monitor each, woken by the store's push.
        self.connections = Connections(lambda: self.rt.gate, runtime.audit, runtime.store)
        self.websockets = None
        if self.upstream is not None:
            from .websocket import WebSocketProxy  # the websockets library only where it is used

            self.websockets = WebSocketProxy(self)
        self.router = Router(routes)

    @property
    def gate(self) -> Gate:
        """Always the runtime's gate (a reload swaps its policy in place)."""
        return self.rt.gate

    # ------------------------------------------------------------------ dispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/_lapse/auth":
                await self.forward_auth(scope, receive, send)
                return
            if self._hsts is not None:
                send = self._with_hsts(send)
            if not path.startswith("/_lapse/") and self.upstream is not None:
                await self._respond(self.proxy, scope, receive, send)
                return
            try:
                await self.router(scope, receive, send)
            except StoreUnavailable as exc:
                await self._unavailable(exc, scope)(scope, receive, send)
            return
        if scope["type"] == "websocket":
            if self.websockets is not None and not scope["path"].startswith("/_lapse/"):
                try:
                    await self.websockets(scope, receive, send)
                except StoreUnavailable as exc:
                    self._outage.refused(exc)
                    await send({"type": "websocket.close", "code": 1011, "reason": "session store unavailable"})
                return
            await send({"type": "websocket.close", "code": 1008, "reason": "websockets are proxied in proxy mode only"})
            return
        if scope["type"] == "lifespan":
            await self.router(scope, receive, send)

    def _with_hsts(self, send: Send) -> Send:
        hsts = self._hsts

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == hsts[0] for name, _ in headers):  # type: ignore[index]
                    message = {**message, "headers": [*headers, hsts]}
            await send(message)

        return sending

    async def _respond(
        self, handler: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            response = await handler(Request(scope, receive))
        except StoreUnavailable as exc:
            response = self._unavailable(exc, scope)
        await response(scope, receive, send)

    def _unavailable(self, exc: Exception, scope: Scope) -> Response:
        self._outage.refused(exc)
        headers = {"Cache-Control": NO_STORE, "Retry-After": "5"}
        if _wants_html(header_dict(scope["headers"])):
            page = self.pages.get_template("unavailable.html").render(title="Sign-in service unavailable", retry_url="/")
            return HTMLResponse(page, 503, headers)
        return JSONResponse({"error": "unavailable", "detail": "the session store cannot answer"}, 503, headers)

    # ----------------------------------------------------------------- helpers

    def _facts(self, request: Request) -> tuple[dict[str, str], bool, str | None, str | None]:
        """(headers, peer trusted, trusted client IP, the session ID presented or None)."""
        headers = header_dict(request.scope["headers"])
        peer = request.scope["client"][0] if request.scope.get("client") else None
        trusted = self.trust(peer)
        ip = client_ip(peer, headers, self.trust)
        sid = parse_cookies(headers.get("cookie", "")).get(self.cookies.name)
        return headers, trusted, ip, sid

    async def _check(
        self, *, host: str, path: str, method: str, ip: str | None, passive: bool, sid: str | None
    ) -> Verdict:
        started = time.perf_counter()
        # From an IP that floods unknown cookies, each is still looked up (a user behind the same NAT
        # keeps a valid session), but an unknown one is refused without an audit event each.
        flooding = sid is not None and bool(self._flooding) and ip in self._flooding and await self._still_flooding(ip)  # type: ignore[arg-type]
        verdict = await self.gate.check(
            host=host, path=path, method=method, ip=ip, passive_header=passive, session_id=presented(sid),
            quiet_unknown=flooding,
        )
        if verdict.decision.reason is Reason.UNKNOWN and ip is not None and not flooding:
            await self._count_unknown(ip, verdict.now)
        if self.metrics is not None:
            d = verdict.decision
            self.metrics.decided(d.allowed, d.reason.value if d.reason else None, time.perf_counter() - started)
        return verdict

    async def _count_unknown(self, ip: str, now: float) -> None:
        """Unknown session cookies from one IP, counted in the store (every replica adds to one count);
        past ``UNKNOWN_COOKIE_LIMIT`` per login window, that IP's unknown cookies go unaudited for a window
        (one ``auth.throttled`` says so)."""
        window = self.login_cfg.window
        if await self.rt.store.failures(f"cookie:{ip}", now, window, add=True) < UNKNOWN_COOKIE_LIMIT:
            return
        if len(self._flooding) >= 10_000:
            self._flooding.clear()
        self._flooding[ip] = now + window
        await self.rt.audit.emit([AuditEvent(now, ev.THROTTLED, ev.FAILURE, None, None, None, ip, None,
                                             "unknown_cookies")])

    async def _still_flooding(self, ip: str) -> bool:
        if await self.rt.store.now() < self._flooding[ip]:
            return True
        del self._flooding[ip]
        return False

    def unservable(self, host: str, raw_path: str) -> tuple[int, str] | None:
        """Proxy mode: (status, why) for a request lapse must not judge, because the upstream could
        serve something other than what was judged: a path that servers normalise differently
        (400), or a Host no app claims (421: the client would choose which app's limits apply)."""
        if unsafe_path(raw_path):
            return 400, "The address contains '.', '..' or empty path segments, a backslash, or double encoding."
        policy = self.gate.policy
        if policy.spec.apps and not policy.claims_host(host) and normalize_host(host) != self._public_host:
            return 421, "This gateway does not serve that host name."
        return None

    def _verdict_headers(self, verdict: Verdict, sid: str | None) -> dict[str, str]:
        d = verdict.decision
        headers = {"Cache-Control": NO_STORE}
        if not d.allowed:
            headers["X-Lapse-Reason"] = d.reason.value if d.reason else "missing"
            if sid is not None and (d.session is None or d.session.ended):
                # The cookie of an ended or unknown session is cleared; a refusal for one app
                # (idle there, forbidden, step-up) leaves the session and its cookie alone.
                headers["Set-Cookie"] = self.cookies.clear()
        return headers

    # ------------------------------------------------------------ forward-auth

    async def forward_auth(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The hot path, in plain ASGI: no request or response objects, only the headers it needs."""
        try:
            status, out = await self._forward_auth(scope)
        except StoreUnavailable as exc:
            await self._unavailable(exc, scope)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b""})

    async def _forward_auth(self, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]]]:
        headers = header_dict(scope["headers"], _AUTH_HEADERS)
        peer = scope["client"][0] if scope.get("client") else None
        trusted = self.trust(peer)
        ip = client_ip(peer, headers, self.trust) if trusted else peer
        try:
            original = original_request(headers, peer, trusted)
        except Unjudgeable as exc:
            self._misconfigured.refused(exc)
            if self.cookies.session_id(headers.get("cookie", "")) is None:
                return 401, _MISSING  # no session: sign-in is needed whatever was asked for
            # A refusal, not a sign-in (401 would send the user to a login that cannot help), and no guess.
            return 403, _CANNOT_JUDGE
        if reencoded(original.uri.split("?", 1)[0]):  # a server decoding twice would serve another path
            return 403, _CANNOT_JUDGE
        sid = self.cookies.session_id(headers.get("cookie", ""))
        verdict = await self._check(
            host=original.host, path=original.path, method=original.method, ip=ip,
            passive=headers.get("x-lapse-activity", "").lower() == "passive", sid=sid,
        )
        d = verdict.decision
        if d.allowed and d.session is not None:
            out = [_NO_STORE, (b"remote-user", d.session.user.encode()),
                   (b"remote-groups", ",".join(d.session.groups).encode()), _EMPTY]
            deadline = d.deadline
            if deadline is not None:
                out.append((b"x-lapse-expires-in", str(max(0, int(deadline - verdict.now))).encode()))
            return 200, out
        named = self._verdict_headers(verdict, sid)
        if d.status == 401:
            # Where the proxy should send the browser: the original URI, URL-encoded (nginx cannot encode it).
            named["Location"] = login_url(original.uri, named["X-Lapse-Reason"])
        return d.status, [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in named.items()] + [_EMPTY]

    # ------------------------------------------------------------------- proxy

    async def proxy(self, request: Request) -> Response:
        assert self.upstream is not None
        headers, trusted, ip, sid = self._facts(request)
        host = headers.get("host", "")
        raw_path = upstream_path(request.scope)
        passive = headers.get("x-lapse-activity", "").lower() == "passive"
        if headers.get("upgrade"):  # WebSockets come as their own scope; other upgrades are not proxied
            return JSONResponse({"error": "upgrades other than websocket are not proxied"}, 501)
        refused = self.unservable(host, raw_path)
        if refused is not None:
            status, detail = refused
            if _wants_html(headers):
                return self._error(status, "Request refused", detail, {"Cache-Control": NO_STORE})
            return JSONResponse({"error": "refused", "detail": detail}, status, {"Cache-Control": NO_STORE})
        path = canonical_path(raw_path)  # judged; the upstream gets ``raw_path``, encoding intact
        verdict = await self._check(host=host, path=path, method=request.method, ip=ip, passive=passive, sid=sid)
        d = verdict.decision
        if d.allowed and d.session is not None:
            response = await self.upstream.forward(request, d.session, ip, peer_trusted=trusted,
                                                   lapse_cookies=self.cookies.names)
            if sid is not None and lasting(response):  # event streams, long polls: cut at the deadline
                guard(response, self.connections, Facts(host, path, request.method, ip, sid,  # type: ignore[arg-type]
                                                         f"{request.method} {path}"), verdict)
            return response
        out = self._verdict_headers(verdict, sid)
        reason = d.reason.value if d.reason else "missing"
        if d.status == 403:
            return self._error(403, "Forbidden", "You don't have access to this application.", out)
        if _wants_html(headers):
            uri = raw_path + (("?" + request.scope["query_string"].decode("latin-1")) if request.scope["query_string"] else "")
            out["Location"] = login_url(uri, reason)
            return Response(b"", 303, out)
        if d.reason is Reason.STEP_UP:
            out["WWW-Authenticate"] = _step_up_challenge(verdict)
        return JSONResponse({"reason": reason}, 401, out)

    # ------------------------------------------------------------------ login

    def _render(self, name: str, code: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Response:
        page = self.pages.get_template(name).render(**context)
        return HTMLResponse(page, code, {"Cache-Control": NO_STORE, **FRAMING, **(headers or {})})

    def _error(self, status: int, heading: str, detail: str, headers: dict[str, str] | None = None) -> Response:
        return self._render("error.html", status, headers, title=heading, status=status, heading=heading, detail=detail)

    async def login_page(self, request: Request, *, message: str | None = None, status: int = 200,
                         username: str = "", next_: str | None = None, reason: str | None = None,
                         need_totp: bool = False) -> Response:
        headers, _trusted, _ip, sid = self._facts(request)
        nonce = parse_cookies(headers.get("cookie", "")).get(self.cookies.csrf_name)
        set_cookie = {}
        if not valid_id(nonce):
            nonce = new_nonce()
            set_cookie["Set-Cookie"] = self.cookies.login_nonce(nonce)
        reason = reason if reason is not None else request.query_params.get("reason")
        target = safe_next(next_ if next_ is not None else request.query_params.get("next"))
        if not username and valid_id(sid):
            # Signed in and asked to confirm (step-up): the account is known, only the secrets are asked.
            session, _ = await self.rt.store.read(self.gate.key_of(sid))  # type: ignore[arg-type]
            # Not for a single-sign-on session: its name is the IdP's, and confirming it is the IdP's job.
            if session is not None and not session.ended and await self.rt.store.get_link(session.key) is None:
                username = session.user
        if username and not need_totp:
            user = await self.rt.store.get_user(username)
            need_totp = user is not None and enrolled(user.extra) and reason == "step_up"
        return self._render(
            "login.html",
            status,
            set_cookie,
            title="Sign in",
            reason=reason,
            message=message,
            next=target,
            csrf_token=self.csrf.for_login(nonce),  # type: ignore[arg-type]
            username=username,
            need_totp=need_totp,
            step_up=reason == "step_up",
            app=None,
            action=LOGIN,
            sso_url=self.oidc.login_link(target, reason) if self.oidc is not None else None,
        )

    async def login(self, request: Request) -> Response:
        headers, _trusted, ip, old_sid = self._facts(request)
        form = await read_form(request)
        if form is None:
            return self._error(400, "Bad request", "The sign-in form could not be read.")
        username = form.get("username", "").strip()
        password = form.get("password", "")
        target = safe_next(form.get("next"))
        nonce = parse_cookies(headers.get("cookie", "")).get(self.cookies.csrf_name)
        if not valid_id(nonce) or not Csrf.same(form.get("csrf_token"), self.csrf.for_login(nonce)):  # type: ignore[arg-type]
            return await self.login_page(request, message="The form expired. Please try again.", status=403,
                                         username=username, next_=target, reason="")

        store, audit = self.rt.store, self.rt.audit
        now = await store.now()
        resource = f"POST {LOGIN}"
        keys = password_keys(username or None, ip)
        if not await self.attempts.reserve(keys, now, user=username or None, ip=ip, resource=resource):
            return await self._throttled(request, "Too many attempts. Please wait a few minutes.",
                                         username=username, next_=target, reason="")

        user = await store.get_user(username) if username else None
        ok = await asyncio.to_thread(verify_password, user, password)  # argon2 takes ~50 ms: off the loop
        if not ok or user is None or user.disabled:
            why = "disabled" if ok and user is not None and user.disabled else "bad_credentials"
            await audit.emit([AuditEvent(now, ev.LOGIN, ev.FAILURE, username or None, None, None, ip, resource, why)])
            return await self.login_page(request, message="Wrong user name or password.", status=200,
                                         username=username, next_=target, reason="")

        await self.attempts.password_right(keys, now)
        mfa = False
        if enrolled(user.extra):
            checked = await self._second_factor(request, user, form.get("totp", ""), target, ip, now, resource)
            if isinstance(checked, Response):
                return checked
            mfa = True
        host = headers.get("host", "")
        location = location_of(target)  # before the session exists: nothing may fail after it
        sid, decision = await self.gate.sign_in(
            user.name, host=host, path=target.split("?", 1)[0], ip=ip, groups=user.groups, mfa=mfa,
            replaces=old_sid if valid_id(old_sid) else None, login=resource,
            device=from_user_agent(headers.get("user-agent")),
        )
        return Response(b"", 303, {"Location": location, "Set-Cookie": self.cookies.session(sid),
                                   "Cache-Control": NO_STORE})

    async def _throttled(self, request: Request, message: str, **ask: Any) -> Response:
        """The sign-in page again with 429 and ``Retry-After`` (the whole window: counts are per window)."""
        page = await self.login_page(request, message=message, status=429, **ask)
        page.headers["Retry-After"] = str(int(self.login_cfg.window))
        return page

    async def _second_factor(
        self, request: Request, user: User, code: str, target: str, ip: str | None, now: float, resource: str
    ) -> Response | None:
        """The one-time code of a user who has one: None when accepted (and spent), else the page to show.

        Wrong codes count towards their own lockout (``totp:NAME``), counted before each check so
        concurrent guesses cannot outrun it: guessing six digits is bounded by the login throttle's
        numbers, and each is audited.
        """
        ask: dict[str, Any] = {"username": user.name, "next_": target, "reason": "", "need_totp": True}
        if not code.strip():
            return await self.login_page(request, message="Enter the one-time code from your authenticator app "
                                         "(or a recovery code), with your password.", **ask)
        accepted = await self.attempts.try_code(user.name, code, now, ip, resource)
        if accepted is None:
            return await self._throttled(request, "Too many wrong codes. Please wait a few minutes.", **ask)
        if not accepted:
            return await self.login_page(request, message="That code is not valid (or was already used).", **ask)
        return None

    async def logout(self, request: Request) -> Response:
        headers, _trusted, ip, sid = self._facts(request)
        form = await read_form(request) or {}
        token = headers.get("x-csrf-token") or form.get("csrf_token")
        idp_logout = None
        if valid_id(sid):
            key = self.gate.key_of(sid)  # type: ignore[arg-type]
            session, _ = await self.rt.store.read(key)
            verified = Csrf.same(token, self.csrf.for_session(key))
            if session is not None and not session.ended:  # signing out twice is not an error
                if not verified:
                    return self._error(403, "Sign-out refused", "The sign-out request could not be verified. "
                                       "Reload the page and try again.")
                await self.gate.revoke(key, "logout", ip=ip, resource=f"POST {request.url.path}")
            # RP-initiated logout: on to the IdP's end_session_endpoint, also when the session had already
            # expired (a user signing out of a stale page at a shared machine must leave the IdP too).
            if session is not None and verified and self.oidc is not None:
                idp_logout = await self.oidc.end_session_url(key)
        # Cleared only when the browser presented the cookie: a cross-site form posts without it (SameSite)
        # and must not be able to wipe the site's cookies and storage. "cookies" clears the apps' own too
        # (for the whole registrable domain): they were reached through this session (ASVS 5.0 14.3.1).
        out = {"Set-Cookie": self.cookies.clear(), "Clear-Site-Data": '"cache", "cookies", "storage"'} if sid else {}
        if idp_logout is not None:
            return Response(b"", 303, {**out, "Location": idp_logout, "Cache-Control": NO_STORE})
        return self._render("signed_out.html", 200, out, title="Signed out", login_url=LOGIN)

    # ------------------------------------------------------------ session API

    async def _session_body(self, request: Request, *, active: bool) -> tuple[dict[str, Any], Verdict, str | None]:
        headers, trusted, ip, sid = self._facts(request)
        host = requested_host(headers, trusted)
        path = request.query_params.get("path") or "/"
        path = path.split("?", 1)[0] if path.startswith("/") else "/"
        verdict = await self._check(host=host, path=path, method="GET", ip=ip, passive=not active, sid=sid)
        d = verdict.decision
        if not d.allowed or d.session is None:
            return {"authenticated": False, "reason": d.reason.value if d.reason else "missing"}, verdict, sid
        limits = verdict.effective.limits
        now = verdict.now
        body = {
            "authenticated": True,
            "user": d.session.user,
            "idle_expires_in": None if d.idle_deadline is None else round(max(0.0, d.idle_deadline - now), 3),
            "absolute_expires_in": round(max(0.0, (d.absolute_deadline or now) - now), 3),
            "warn_before": limits.warn_before,
            "idle_timeout": limits.idle,
            "server_time": round(now, 3),
            "csrf_token": self.csrf.for_session(d.session.key),
        }
        await self._maybe_warn(verdict, request)
        return body, verdict, sid

    async def _maybe_warn(self, verdict: Verdict, request: Request) -> None:
        """``session.warning`` the first time a client is told that a deadline is near (once per deadline)."""
        d = verdict.decision
        assert d.session is not None
        limits, now = verdict.effective.limits, verdict.now
        for reason, deadline in (("idle", d.idle_deadline), ("absolute", d.absolute_deadline)):
            if deadline is None or deadline - now > limits.warn_before:
                continue
            mark = (d.session.key, reason)
            if self._warned.get(mark) == round(deadline):
                continue
            if len(self._warned) >= 100_000:
                self._warned.clear()
            self._warned[mark] = round(deadline)
            resource = f"{request.method} {request.url.path}"
            await self.rt.audit.emit([AuditEvent(now, ev.WARNING, ev.SUCCESS, d.session.user, d.session.key,
                                                 limits.app, verdict.decision.session.ip, resource, reason)])

    async def session_status(self, request: Request) -> Response:
        body, verdict, sid = await self._session_body(request, active=False)
        headers = self._verdict_headers(verdict, sid) if not body["authenticated"] else {"Cache-Control": NO_STORE}
        headers.pop("X-Lapse-Reason", None)
        return JSONResponse(body, 200, headers)

    async def session_activity(self, request: Request) -> Response:
        headers, _trusted, _ip, sid = self._facts(request)
        if not valid_id(sid):
            return JSONResponse({"authenticated": False, "reason": "missing" if sid is None else "unknown"}, 401,
                                {"Cache-Control": NO_STORE})
        expected = self.csrf.for_session(self.gate.key_of(sid))  # type: ignore[arg-type]
        if not Csrf.same(headers.get("x-csrf-token"), expected):
            return JSONResponse({"error": "csrf", "detail": "missing or wrong X-CSRF-Token"}, 403,
                                {"Cache-Control": NO_STORE})
        body, verdict, sid = await self._session_body(request, active=True)
        status = 200 if body["authenticated"] else verdict.decision.status
        await self._maybe_renewed(verdict, request)
        return JSONResponse(body, status, self._verdict_headers(verdict, sid))

    async def _maybe_renewed(self, verdict: Verdict, request: Request) -> None:
        """``session.renewed`` when the user keeps a session that was warned of its idle deadline (the
        "stay signed in" answer to the warning: OWASP's ``session_renewed``), once per warning."""
        d = verdict.decision
        if not d.allowed or d.session is None or d.idle_deadline is None:
            return
        warned = self._warned.get((d.session.key, "idle"))
        if warned is None or round(d.idle_deadline) <= warned:
            return
        del self._warned[(d.session.key, "idle")]
        limits = verdict.effective.limits
        await self.rt.audit.emit([AuditEvent(verdict.now, ev.RENEWED, ev.SUCCESS, d.session.user, d.session.key,
                                             limits.app, d.session.ip, f"POST {request.url.path}", "idle")])

    async def events(self, request: Request) -> Response:
        """Server-sent events: the session's deadlines when they change, then ``expired`` (passive)."""
        first, _, _ = await self._session_body(request, active=False)

        async def stream() -> AsyncIterator[str]:
            body: dict[str, Any] = first
            last: tuple[float, float] | None = None
            quiet = 0.0
            started = time.monotonic()
            while True:
                if not body["authenticated"]:
                    yield f"event: expired\ndata: {json.dumps({'reason': body['reason']})}\n\n"
                    return
                mark = (_deadline(body, "idle_expires_in"), _deadline(body, "absolute_expires_in"))
                if mark != last:
                    yield f"event: session\ndata: {json.dumps(body)}\n\n"
                    last, quiet = mark, 0.0
                elif quiet >= KEEPALIVE:
                    yield ": keep-alive\n\n"
                    quiet = 0.0
                if self.closing.is_set() or time.monotonic() - started > STREAM_LIFETIME:
                    yield "event: reconnect\ndata: {}\n\n"  # EventSource comes back, maybe to another replica
                    return
                try:
                    await asyncio.wait_for(self.closing.wait(), EVENTS_EVERY)
                except TimeoutError:
                    pass
                quiet += EVENTS_EVERY
                if await request.is_disconnected():
                    return
                try:
                    body, _, _ = await self._session_body(request, active=False)
                except StoreUnavailable as exc:
                    log.error("event stream: store unavailable: %s", exc)
                    yield "event: unavailable\ndata: {}\n\n"
                    return

        headers = {"Cache-Control": NO_STORE, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def widget(self, request: Request) -> Response:
        etag = f'"{self._widget_tag}"'
        headers = {"Cache-Control": "public, max-age=300", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(b"", 304, headers)
        return Response(self._widget, 200, headers, media_type="text/javascript; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        started = time.perf_counter()
        await self.rt.store.ping()
        return JSONResponse({"status": "ok", "store_ms": round((time.perf_counter() - started) * 1000, 3)}, 200,
                            {"Cache-Control": NO_STORE})


def _deadline(body: dict[str, Any], field: str) -> float:
    """A deadline as an instant (to the tenth of a second), so a stream speaks only when it moves."""
    value = body.get(field)
    return -1.0 if value is None else round(body["server_time"] + value, 1)


def _wants_html(headers: dict[str, str]) -> bool:
    return "text/html" in headers.get("accept", "")




__all__ = ["Gateway", "location_of", "login_url", "safe_next"]
