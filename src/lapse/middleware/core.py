"""What the ASGI, WSGI and Django adapters share: judge a request, answer refusals, serve ``/_lapse``.

The adapters only translate their framework's request into ``Facts`` and a
``Reply`` back into their framework's response. Every decision goes through
``enforce.Gate``; every ``/_lapse`` endpoint (session status, the active
heartbeat and its CSRF check, events, widget, login, logout) is the gateway's
own ASGI app, called with the request's facts, so the middleware and the
gateway cannot drift apart.

Two modes:

standalone
    lapse owns the session cookie and the login page (``/_lapse/login``),
    exactly as the gateway in proxy mode does. Paths in ``public_paths`` are
    served without a session.
alongside
    the framework owns the login. When it says someone is signed in, lapse
    opens its own session for them (``session.created``) and keeps its ID in
    the framework's session under ``SESSION_FIELD``; every request is judged
    by the gate, and a refusal signs the user out through the framework. A
    framework session is one app, so a refusal for idle or absolute also ends
    the lapse session (``session.expired``), where the gateway would leave a
    multi-app session alive for laxer apps.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from ..config import LoadedConfig, load_config
from ..core.decide import Reason
from ..core.device import from_user_agent
from ..core.policy import glob_regex
from ..enforce import Verdict, run_sweeper
from ..outage import OutageLog
from ..runtime import Runtime, open_runtime
from ..store.base import StoreUnavailable
from ..web.app import Gateway, safe_next
from ..web.net import Trust, client_ip
from ..web.tokens import Cookies, Csrf, presented, valid_id

log = logging.getLogger("lapse.middleware")

PREFIX = "/_lapse/"
SESSION_FIELD = "_lapse_session"
"""Alongside mode: the key under which the framework's session keeps lapse's session ID."""
WIDGET_TAG = '<script src="/_lapse/widget.js" defer></script>'


class Mode(StrEnum):
    STANDALONE = "standalone"
    ALONGSIDE = "alongside"


@dataclass(frozen=True)
class Settings:
    """How the middleware is used in one app; the policy itself comes from the TOML file."""

    mode: Mode = Mode.STANDALONE
    app: str | None = None  # judge every request as this ``[[apps]]`` entry, whatever the Host header says
    login_url: str = "/_lapse/login"  # alongside: the framework's login page (gets ?next=...&reason=...)
    public_paths: tuple[str, ...] = ()  # standalone: globs served without a session

    @classmethod
    def of(cls, mode: str | Mode = Mode.STANDALONE, *, app: str | None = None, login_url: str | None = None,
           public_paths: Iterable[str] = ()) -> Settings:
        mode = Mode(mode)
        if login_url is None:
            if mode is Mode.ALONGSIDE:
                raise ValueError("alongside mode needs login_url: the framework's own login page")
            login_url = "/_lapse/login"
        return cls(mode, app, login_url, tuple(public_paths))


@dataclass(frozen=True, slots=True)
class Facts:
    """One request as every adapter can describe it."""

    method: str
    path: str  # the public URL's path, mount prefix included, without the query string: what is judged
    query: str
    host: str
    headers: dict[str, str]  # lower-case names
    peer: str | None  # the TCP peer
    root: str = ""  # the mount prefix (WSGI ``SCRIPT_NAME``, ASGI ``root_path``)

    @property
    def uri(self) -> str:
        return self.path + ("?" + self.query if self.query else "")

    @property
    def local(self) -> str:
        """The path inside the app (below its mount): where ``/_lapse/*`` is recognised and served."""
        return self.path[len(self.root):] or "/"

    @property
    def passive(self) -> bool:
        return self.headers.get("x-lapse-activity", "").lower() == "passive"

    @property
    def wants_html(self) -> bool:
        return "text/html" in self.headers.get("accept", "")


@dataclass(slots=True)
class Reply:
    """A response the adapter sends as is."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True, slots=True)
class Judgement:
    """The answer for one app request: go on (``reply`` is None) or send ``reply``."""

    reply: Reply | None
    user: str | None = None
    sign_out: bool = False  # alongside: the framework's sign-in must end now
    verdict: Verdict | None = None


NO_STORE = ("Cache-Control", "no-store")


class Enforcer:
    """The middleware's one object per process: the runtime's gate plus the gateway's ``/_lapse`` app."""

    def __init__(self, runtime: Runtime, settings: Settings) -> None:
        self.rt = runtime
        self.settings = settings
        cfg = runtime.loaded.config
        self.trust = Trust(cfg.server.trusted_proxies)
        self.cookies = Cookies(cfg.server.effective_cookie_name, cfg.server.cookie_secure)
        self.csrf = Csrf(runtime.secrets.csrf_key)
        self.gateway = Gateway(runtime)
        self.app_host = app_host(runtime.loaded, settings.app)
        self.checks_host = self.app_host is None and bool(runtime.loaded.config.apps)
        self._public = glob_regex(settings.public_paths)
        self._outage = OutageLog(log, "store unavailable, failing closed")

    # ------------------------------------------------------------------ facts

    def host(self, facts: Facts) -> str:
        return self.app_host or facts.host

    def wrong_host(self, host: str) -> Reply | None:
        """Without ``app_name`` the Host header names the app, and the client writes that header: a
        Host no ``[[apps]]`` entry claims would get the laxer ``[defaults]``. Refuse it (400, as
        Django's ``ALLOWED_HOSTS`` and Werkzeug's ``trusted_hosts`` do) before anything is judged."""
        if not self.checks_host or self.rt.gate.policy.claims_host(host):
            return None
        return json_reply(400, {"error": "host", "detail": "no [[apps]] entry claims this host name"}, [NO_STORE])

    def client_ip(self, facts: Facts) -> str | None:
        return client_ip(facts.peer, facts.headers, self.trust)

    def cookie_sid(self, facts: Facts) -> str | None:
        return self.sid_in(facts.headers.get("cookie", ""))

    def sid_in(self, cookie_header: str) -> str | None:
        """Lapse's cookie from a ``Cookie`` header."""
        return self.cookies.session_id(cookie_header)

    def is_public(self, path: str) -> bool:
        return self._public is not None and self._public.match(path) is not None

    # --------------------------------------------------------------- judging

    async def check(self, facts: Facts, sid: str | None, *, passive: bool | None = None) -> Verdict:
        return await self.rt.gate.check(
            host=self.host(facts), path=facts.path, method=facts.method, ip=self.client_ip(facts),
            passive_header=facts.passive if passive is None else passive, session_id=presented(sid),
        )

    async def judge(self, facts: Facts, sid: str | None, user: str | None = None) -> Judgement:
        """Standalone: ``sid`` from lapse's cookie. Alongside: ``sid`` from the framework's session and
        ``user`` the framework's signed-in user (None: nobody signed in, nothing to enforce)."""
        if self.settings.mode is Mode.STANDALONE:
            if self.is_public(facts.path):
                return Judgement(None)
        elif user is None:
            return Judgement(None)
        elif sid is None:
            return Judgement(None, user)  # the adapter adopts the framework's sign-in (``adopt``)
        verdict = await self.check(facts, sid)
        d = verdict.decision
        if d.allowed and d.session is not None:
            return Judgement(None, d.session.user, verdict=verdict)
        return await self.refused(facts, verdict, sid, user)

    async def refused(self, facts: Facts, verdict: Verdict, sid: str | None, user: str | None = None) -> Judgement:
        """The gate said no. Standalone: answer it. Alongside: a refusal for idle, absolute or revoked
        also ends lapse's session and signs the framework out; 403 (this path is not theirs) does not."""
        d = verdict.decision
        if self.settings.mode is Mode.STANDALONE:
            return Judgement(self.refusal(facts, verdict, sid), verdict=verdict)
        if d.status == 403:
            return Judgement(self.refusal(facts, verdict, None), user, verdict=verdict)
        if d.session is not None and not d.session.ended:
            await self.rt.gate.revoke(d.session.key, (d.reason or Reason.REVOKED).value)
        return Judgement(self.refusal(facts, verdict, None), user, sign_out=True, verdict=verdict)

    async def adopt(self, facts: Facts, user: str, replaces: str | None = None) -> str:
        """Alongside: open a lapse session for the framework's signed-in ``user``; its new ID."""
        sid, _ = await self.rt.gate.sign_in(
            user, host=self.host(facts), path=facts.path, ip=self.client_ip(facts),
            replaces=replaces if valid_id(replaces) else None, device=from_user_agent(facts.headers.get("user-agent")),
        )
        return sid

    async def end(self, sid: str | None, reason: str) -> None:
        """End a lapse session the framework has ended (its logout); a no-op for unknown IDs."""
        if valid_id(sid):
            await self.rt.gate.revoke(self.rt.gate.key_of(sid), reason)  # type: ignore[arg-type]

    def refusal(self, facts: Facts, verdict: Verdict, sid: str | None) -> Reply:
        """401/403 as the proxy answers them: a browser goes to the login page, an API client gets JSON."""
        d = verdict.decision
        reason = d.reason.value if d.reason else "missing"
        headers = [NO_STORE, ("X-Lapse-Reason", reason)]
        if sid is not None and (d.session is None or d.session.ended):
            headers.append(("Set-Cookie", self.cookies.clear()))
        if d.status == 403:
            return json_reply(403, {"reason": reason}, headers)
        if facts.wants_html:
            return Reply(303, [*headers, ("Location", self.login_location(facts.uri, reason, facts.root))])
        if d.reason is Reason.STEP_UP:
            step = verdict.effective.step_up
            max_age = int(step.max_auth_age) if step else 0
            headers.append(("WWW-Authenticate", f'Bearer error="insufficient_user_authentication", max_age={max_age}'))
        return json_reply(401, {"reason": reason}, headers)

    def login_location(self, next_uri: str, reason: str | None, root: str = "") -> str:
        """``login_url?next=...&reason=...``; lapse's own ``/_lapse/login`` lives below the app's mount."""
        query = "next=" + quote(safe_next(next_uri), safe="/")
        if reason:
            query += "&reason=" + quote(reason)
        url = self.settings.login_url
        if url.startswith(PREFIX):
            url = root + url
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}{query}"

    # ------------------------------------------------------------- /_lapse/*

    def gateway_scope(self, facts: Facts, sid: str | None, body_scope: dict[str, Any] | None = None) -> dict[str, Any]:
        """An ASGI scope for the gateway's ``/_lapse`` app. Alongside mode presents the framework-held
        session ID as lapse's cookie; with ``app`` set the Host is that app's, so ``?path=`` resolves
        to the same app as the pages do."""
        headers = dict(facts.headers)
        if self.settings.mode is Mode.ALONGSIDE:
            headers.pop("cookie", None)
            if sid is not None:
                headers["cookie"] = f"{self.cookies.name}={sid}"
        if self.app_host:
            headers["host"] = self.app_host
            headers.pop("x-forwarded-host", None)
        scope = dict(body_scope or {})
        scope.update({
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
            "method": facts.method, "path": facts.local, "raw_path": facts.local.encode(),
            "query_string": facts.query.encode("latin-1"), "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
            "client": (facts.peer, 0) if facts.peer else None, "server": None,
        })
        return scope

    async def alongside_special(self, facts: Facts, sid: str | None, form_token: str | None) -> tuple[Reply, bool] | None:
        """Alongside mode's own ``/_lapse/login`` and ``/_lapse/logout``: both go through the framework.

        Returns (reply, sign the framework out) or None for the endpoints the gateway serves as is.
        """
        if facts.local == "/_lapse/login":
            # The widget sends people here at expiry, and "Sign in again now" before the absolute
            # deadline: the framework signs out (ending lapse's session too) and shows its login page.
            # A session that still lives ends only by a POST with its CSRF token: a GET (a link from
            # another site) shows a confirmation and ends nothing (forced-logout CSRF).
            params = {k: v[0] for k, v in parse_qs(facts.query).items()}
            next_uri, reason = params.get("next", "/"), params.get("reason") or None
            to_login = Reply(303, [NO_STORE, ("Location", self.login_location(next_uri, reason, facts.root))])
            if not valid_id(sid):
                return to_login, sid is not None
            verdict = await self.check(facts, sid, passive=True)
            d = verdict.decision
            if d.session is None or d.session.ended or d.reason in LAPSED:
                if d.session is not None and not d.session.ended:
                    await self.rt.gate.revoke(d.session.key, (d.reason or Reason.REVOKED).value)
                return to_login, True
            key = d.session.key
            if facts.method != "POST":
                return relogin_page(next_uri, reason, self.csrf.for_session(key)), False
            token = facts.headers.get("x-csrf-token") or form_token
            if not Csrf.same(token, self.csrf.for_session(key)):
                return json_reply(403, {"error": "csrf", "detail": "missing or wrong csrf_token"}, [NO_STORE]), False
            await self.rt.gate.revoke(key, "reauth", ip=self.client_ip(facts), resource=f"POST {facts.path}")
            return to_login, True
        if facts.local == "/_lapse/logout" and facts.method == "POST":
            if valid_id(sid):
                key = self.rt.gate.key_of(sid)  # type: ignore[arg-type]
                session, _ = await self.rt.store.read(key)
                if session is not None and not session.ended:
                    token = facts.headers.get("x-csrf-token") or form_token
                    if not Csrf.same(token, self.csrf.for_session(key)):
                        return json_reply(403, {"error": "csrf", "detail": "missing or wrong csrf_token"},
                                          [NO_STORE]), False
                    await self.rt.gate.revoke(key, "logout", ip=self.client_ip(facts), resource=f"POST {facts.path}")
            return Reply(303, [NO_STORE, ("Location", self.login_location(facts.root + "/", "signed_out", facts.root))]), True
        return None

    def unavailable(self, facts: Facts, exc: BaseException) -> Reply:
        """The store cannot answer: 503, fail closed, one log line per outage."""
        self._outage.refused(exc)
        headers = [NO_STORE, ("Retry-After", "5")]
        if facts.wants_html:
            return Reply(503, [*headers, ("Content-Type", "text/html; charset=utf-8")],
                         b"<!doctype html><title>Service unavailable</title>"
                         b"<h1>Sign-in service unavailable</h1><p>Please try again in a moment.</p>")
        return json_reply(503, {"error": "unavailable", "detail": "the session store cannot answer"}, headers)


LAPSED = frozenset({Reason.MISSING, Reason.UNKNOWN, Reason.IDLE, Reason.ABSOLUTE, Reason.REVOKED})
"""Refusals after which the session is over anyway: ``/_lapse/login`` may end it without a CSRF token."""


def relogin_page(next_uri: str, reason: str | None, csrf_token: str) -> Reply:
    """Alongside, ``GET /_lapse/login`` with a live session: a button that POSTs the CSRF token to sign in again."""
    query = "next=" + quote(safe_next(next_uri), safe="/") + ("&reason=" + quote(reason) if reason else "")
    body = ("<!doctype html><meta charset=utf-8><title>Sign in again</title>"
            "<h1>Sign in again?</h1><p>You are still signed in. Signing in again ends this session first.</p>"
            f'<form method="post" action="/_lapse/login?{html.escape(query)}">'
            f'<input type="hidden" name="csrf_token" value="{html.escape(csrf_token)}">'
            '<button type="submit">Sign out and sign in again</button></form>'
            f'<p><a href="{html.escape(safe_next(next_uri))}">Stay signed in</a></p>').encode()
    return Reply(200, [NO_STORE, ("Content-Type", "text/html; charset=utf-8"), ("X-Frame-Options", "DENY"),
                       ("Content-Security-Policy", "default-src 'none'; form-action 'self'; frame-ancestors 'none'"),
                       ("Referrer-Policy", "same-origin")], body)


def form_token(body: bytes) -> str | None:
    """``csrf_token`` from an urlencoded form body (the widget's sign-out form), if there is one."""
    values = parse_qs(body[:16 * 1024].decode("utf-8", "replace")).get("csrf_token")
    return values[0] if values else None


def json_reply(status: int, body: dict[str, Any], headers: list[tuple[str, str]]) -> Reply:
    return Reply(status, [*headers, ("Content-Type", "application/json")], json.dumps(body).encode())


def app_host(loaded: LoadedConfig, name: str | None) -> str | None:
    """A Host header that the named app's ``hosts`` match (wildcards get a label); None without a name.

    A middleware serves one app. Without a name, a file naming several apps would let each
    request's Host header pick whose policy applies: refused here, when the adapter is built."""
    apps = loaded.config.apps
    if name is None:
        names = sorted({app.name for app in apps})
        if len(names) > 1:
            raise ValueError(f"{loaded.source} names several [[apps]] ({', '.join(names)}): say which one this "
                             "app is (app_name=..., Django: LAPSE['app']), else the client's Host header would choose")
        return None
    for app in apps:
        if app.name == name:
            return re.sub(r"^\*\.", "app.", str(app.hosts[0]))
    raise ValueError(f"no [[apps]] entry named {name!r} in {loaded.source}")


def loaded_config(config: str | Path | LoadedConfig | None) -> LoadedConfig:
    """The same TOML file the gateway reads (``None``: ``$LAPSE_CONFIG``, else ``./lapse.toml``, else defaults)."""
    return config if isinstance(config, LoadedConfig) else load_config(config)


@asynccontextmanager
async def running(loaded: LoadedConfig, settings: Settings, *,
                  clock: Callable[[], float] | None = None) -> AsyncIterator[Enforcer]:
    """An ``Enforcer`` with its store open and the expiry sweeper running, as ``lapse serve`` runs them,
    so a session whose user never comes back still gets its one ``session.expired``."""
    async with AsyncExitStack() as stack:
        kwargs = {} if clock is None else {"clock": clock}
        rt = await stack.enter_async_context(open_runtime(loaded, **kwargs))
        stop = asyncio.Event()
        sweeper = asyncio.create_task(
            run_sweeper(rt.gate, loaded.config.store.sweep_interval, loaded.config.audit.retention, stop)
        )
        try:
            yield Enforcer(rt, settings)
        finally:
            stop.set()
            await sweeper


__all__ = [
    "Enforcer", "Facts", "Judgement", "Mode", "Reply", "SESSION_FIELD", "Settings", "StoreUnavailable",
    "WIDGET_TAG", "app_host", "form_token", "loaded_config", "presented", "running",
]
