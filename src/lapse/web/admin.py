"""``/_lapse/admin`` and ``/_lapse/sessions`` (CONTRACT.md §4, issue 8): seeing and ending sessions.

Both pages are judged like any request behind lapse (``Gateway._check``: the
caller's own idle and absolute limits apply to them), then:

- no live session: 303 to the login page, back here afterwards;
- ``/_lapse/admin`` for a user without the ``admin`` flag: 403;
- every action is a POST with the CSRF token of the caller's session
  (``Csrf.for_session``); a missing or wrong one is 403 and changes nothing.

Pages are server-rendered (Jinja2, autoescaped) with a strict Content Security
Policy: no inline script or style runs without this response's nonce. The
countdowns are a few lines of script that count down deadlines the server
computed (``data-deadline``, corrected for clock skew with ``server_time``);
they never talk to the server, so viewing the page keeps nobody alive.

Audit: ending a session writes ``session.revoked`` with reason ``admin``
(from the admin page) or ``logout`` (a user ending one of their own other
sessions, ASVS 5.0 7.5.2); an admin's action also writes ``admin.revoke``
naming the administrator (``user``), the session (``session``) and its owner
(``reason``), so the log says who did it (ASVS 5.0 7.4.5).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..audit import report as rep
from ..core.decide import app_deadlines, expires_at
from ..core.events import SUCCESS, AuditEvent, rfc3339
from ..core.session import HANDLE_LEN, Session
from ..store.base import AuditQuery
from .forms import read_form
from .net import requested_host
from .tokens import Csrf, new_nonce

if TYPE_CHECKING:
    from ..enforce import Verdict
    from .app import Gateway

log = logging.getLogger("lapse.web.admin")

ADMIN = "/_lapse/admin"
SESSIONS = "/_lapse/sessions"
ADMIN_REVOKED = "admin.revoke"
AUDIT_ROWS = 100
CHARTS_TTL = 60.0  # seconds a rendered chart image is reused


class Pages:
    """The handlers; ``Gateway`` registers ``routes()`` beside its own."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._cached: tuple[float, dict[str, Any], bytes | None] | None = None  # (when, report, png)
        self._lock = asyncio.Lock()

    def routes(self) -> list[Route]:
        return [
            Route(ADMIN, self.admin, methods=["GET"]),
            Route(ADMIN + "/revoke", self.admin_revoke, methods=["POST"]),
            Route(ADMIN + "/report.png", self.charts, methods=["GET"]),
            Route(SESSIONS, self.sessions, methods=["GET"]),
            Route(SESSIONS + "/end", self.end_own, methods=["POST"]),
        ]

    # --------------------------------------------------------------- who asks

    async def _caller(self, request: Request, *, admin: bool) -> tuple[Session, float, str | None] | Response:
        """The caller's live session (judged like any request), or the response that refuses them.

        A POST is judged passively here: it counts as the user's activity only once its CSRF token is
        verified (``_form_with_token``), so a forged cross-site form cannot keep a session alive.
        """
        verdict, ip, sid = await self._judge(request, passive=request.method != "GET")
        d = verdict.decision
        if not d.allowed or d.session is None:
            out = self.gw._verdict_headers(verdict, sid)
            if d.status == 403:
                return self.gw._error(403, "Access denied", "You don't have access to this page.", out)
            from .app import login_url

            out["Location"] = login_url(ADMIN if request.url.path.startswith(ADMIN) else SESSIONS,
                                        out.get("X-Lapse-Reason"))
            return Response(b"", 303, out)
        if admin:
            # An OIDC sign-in is an admin by its groups ([oidc] admin_groups) only, never by a local user
            # of the same name; any other session by its local user's admin flag.
            link = await self.gw.rt.store.get_link(d.session.key)
            if link is not None:
                allowed = link.admin
            else:
                user = await self.gw.rt.store.get_user(d.session.user)
                allowed = user is not None and user.admin and not user.disabled
            if not allowed:
                return self.gw._error(403, "Administrators only", "This page is for lapse administrators.")
        return d.session, verdict.now, ip

    async def _judge(self, request: Request, *, passive: bool) -> tuple[Verdict, str | None, str | None]:
        """The request judged; with the client's address and the session ID it presented."""
        headers, trusted, ip, sid = self.gw._facts(request)
        verdict = await self.gw._check(host=requested_host(headers, trusted), path=request.url.path, method=request.method, ip=ip,
                                       passive=passive, sid=sid)
        return verdict, ip, sid

    def _page(self, name: str, status: int = 200, **context: Any) -> Response:
        nonce = new_nonce()
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        headers = {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"}
        return self.gw._render(name, status, headers, nonce=nonce, **context)

    async def _form_with_token(self, request: Request, session: Session) -> dict[str, str] | Response:
        form = await read_form(request)
        if form is None:
            return self.gw._error(400, "Bad request", "The form could not be read.")
        if not Csrf.same(form.get("csrf_token"), self.gw.csrf.for_session(session.key)):
            return self.gw._error(403, "Request refused", "The request could not be verified. Reload the page and "
                                  "try again.")
        await self._judge(request, passive=False)  # verified: now it is the user's activity
        return form

    # ------------------------------------------------------------------ admin

    async def admin(self, request: Request) -> Response:
        caller = await self._caller(request, admin=True)
        if isinstance(caller, Response):
            return caller
        me, now, _ip = caller
        q = request.query_params
        policy = self.gw.gate.policy
        apps = [a.name for a in policy.spec.apps]
        user_filter = (q.get("user") or "").strip() or None
        app_filter = q.get("app") if q.get("app") in apps else None
        rows = [self._row(s, now, me, app_filter) for s in await self.gw.rt.store.sessions(user_filter)]
        rows = [r for r in rows if r is not None]

        search = {k: (q.get("a_" + k) or "").strip() for k in ("event", "user", "app", "session", "reason", "since")}
        since = _since(search["since"], now)
        query = AuditQuery(
            events=(search["event"],) if search["event"] else (),
            user=search["user"] or None,
            app=search["app"] or None,
            session=search["session"].lower() or None,
            reason=search["reason"] or None,
            since=since,
        )
        found = await self.gw.rt.store.search_audit(query, AUDIT_ROWS)
        report = await self._report(now)
        return self._page(
            "admin.html",
            title="Sessions · lapse admin",
            me=me,
            rows=rows,
            apps=apps,
            user_filter=user_filter or "",
            app_filter=app_filter or "",
            search=search,
            events=found,
            audit_rows=AUDIT_ROWS,
            report=report,
            server_time=now,
            csrf_token=self.gw.csrf.for_session(me.key),
            ended=_count(q.get("ended")),
            rfc3339=rfc3339,
        )

    def _row(self, s: Session, now: float, me: Session, app: str | None) -> dict[str, Any] | None:
        policy = self.gw.gate.policy
        if app is None:
            gi, ga = policy.generous_idle, policy.generous_absolute
            end = expires_at(s.auth_time, s.last_active_at, gi, ga)
            idle = None if math.isinf(gi) else s.last_active_at + gi
            absolute = s.auth_time + ga
            if end <= now:
                return None  # over; the sweeper will say so in a moment
        else:
            index = [a.name for a in policy.spec.apps].index(app)
            limits = policy.limits_of(index, None)
            if limits.allow_users is not None and s.user not in limits.allow_users and \
                    limits.allow_groups.isdisjoint(s.groups):  # type: ignore[union-attr]
                return None
            idle, absolute = app_deadlines(s, limits)
            if min(absolute, idle if idle is not None else math.inf) <= now:
                return None
        return {
            "session": s,
            "handle": s.handle,
            "idle_deadline": idle,
            "absolute_deadline": absolute,
            "mine": s.key == me.key,
            "samples": s.stats.n if s.stats else 0,
        }

    async def admin_revoke(self, request: Request) -> Response:
        caller = await self._caller(request, admin=True)
        if isinstance(caller, Response):
            return caller
        me, now, ip = caller
        form = await self._form_with_token(request, me)
        if isinstance(form, Response):
            return form
        store, gate = self.gw.rt.store, self.gw.gate
        handle, user = form.get("handle", "").strip().lower(), form.get("user", "").strip()
        if handle:
            targets = [s for s in await store.sessions() if s.key.startswith(handle)] if len(handle) >= 8 else []
            if len(targets) != 1:
                return self.gw._error(404, "No such session", "That session has already ended or is unknown.")
        elif user:
            targets = await store.sessions(user)
        else:
            return self.gw._error(400, "Bad request", "Name a session or a user.")
        ended = 0
        for s in targets:
            if await gate.revoke(s.key, "admin", ip=ip, resource=f"POST {ADMIN}/revoke"):
                ended += 1
                await self.gw.rt.audit.emit([AuditEvent(now, ADMIN_REVOKED, SUCCESS, me.user, s.key, None, ip,
                                                        f"POST {ADMIN}/revoke", s.user)])
        self._cached = None
        return Response(b"", 303, {"Location": f"{ADMIN}?ended={ended}",
                                   "Cache-Control": "no-store"})

    async def _report(self, now: float) -> dict[str, Any]:
        """The report over ``[report] window``, rebuilt at most every ``CHARTS_TTL`` seconds (a big log
        takes seconds to read: bench/README.md)."""
        async with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CHARTS_TTL:
                cfg = self.gw.rt.loaded.config.report
                report = rep.build(
                    await rep.from_store(self.gw.rt.store, now - cfg.window, now + 1),
                    await self.gw.rt.store.sessions(),
                    rep.Thresholds.from_config(cfg),
                    since=now - cfg.window, until=now + 1, source="store",
                )
                self._cached = (time.monotonic(), report, None)
            return self._cached[1]

    async def charts(self, request: Request) -> Response:
        """The report's charts as one PNG (the same panels as ``audit report --png``)."""
        caller = await self._caller(request, admin=True)
        if isinstance(caller, Response):
            return caller
        _me, now, _ip = caller
        from ..audit.plots import ChartsUnavailable, render_png

        report = await self._report(now)
        cached = self._cached
        png = cached[2] if cached is not None and cached[1] is report else None
        if png is None:
            try:
                png = await asyncio.to_thread(render_png, report)  # ~0.5 s of CPU: off the event loop
            except ChartsUnavailable as exc:
                return Response(str(exc).encode(), 501, {"Cache-Control": "no-store"},
                                media_type="text/plain; charset=utf-8")
            if cached is not None and cached[1] is report:
                self._cached = (cached[0], report, png)
        return Response(png, 200, {"Cache-Control": "private, no-store"}, media_type="image/png")

    # ----------------------------------------------------------- self-service

    async def sessions(self, request: Request) -> Response:
        caller = await self._caller(request, admin=False)
        if isinstance(caller, Response):
            return caller
        me, now, _ip = caller
        rows = [r for r in (self._row(s, now, me, None) for s in await self.gw.rt.store.sessions(me.user)) if r]
        rows.sort(key=lambda r: (not r["mine"], -r["session"].last_active_at))
        return self._page(
            "sessions.html",
            title="Your sessions",
            me=me,
            rows=rows,
            server_time=now,
            csrf_token=self.gw.csrf.for_session(me.key),
            ended=_count(request.query_params.get("ended")),
            rfc3339=rfc3339,
        )

    async def end_own(self, request: Request) -> Response:
        """End one of the caller's other sessions, or all of them (``handle=others``); never the current one."""
        caller = await self._caller(request, admin=False)
        if isinstance(caller, Response):
            return caller
        me, _now, ip = caller
        form = await self._form_with_token(request, me)
        if isinstance(form, Response):
            return form
        handle = form.get("handle", "").strip().lower()
        mine = [s for s in await self.gw.rt.store.sessions(me.user) if s.key != me.key]
        if handle != "others":
            mine = [s for s in mine if s.handle == handle[:HANDLE_LEN] and len(handle) >= HANDLE_LEN]
            if not mine:
                return self.gw._error(404, "No such session", "That session has already ended, or is not yours.")
        ended = sum([await self.gw.gate.revoke(s.key, "logout", ip=ip, resource=f"POST {request.url.path}") for s in mine])
        return Response(b"", 303, {"Location": f"{SESSIONS}?ended={ended}",
                                   "Cache-Control": "no-store"})


def _count(value: str | None) -> int | None:
    """The ``ended=N`` a page shows after an action (a number, never text from the URL)."""
    return int(value) if value is not None and value.isdigit() and len(value) < 7 else None


def _since(text: str, now: float) -> float | None:
    """``15m``, ``24h``, ``7d`` ago; anything else: no lower bound."""
    from ..core.durations import parse_duration

    if not text:
        return None
    try:
        return now - float(parse_duration(text) or 0)
    except ValueError:
        return None


__all__ = ["ADMIN", "ADMIN_REVOKED", "SESSIONS", "Pages"]
