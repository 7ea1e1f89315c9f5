"""A signed-in user's own account: change the password, set up one-time codes.

Both ask for the current password first (a session alone must not be enough to
take over an account), count wrong passwords towards the login throttle, and
carry the session's CSRF token. Changing a factor (a new password, one-time
codes set up or replaced) offers to end every other session of the user, ticked
by default (ASVS 5.0 7.4.3), and renews the session in use: a new ID, the old
one ended with reason ``reauth`` (OWASP: renew the ID on any privilege change).
TOTP enrolment shows a QR code and asks for one code before the factor is kept,
so a mis-scanned secret never locks anyone out; recovery codes are shown once.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import qrcode
import qrcode.image.svg
from starlette.requests import Request
from starlette.responses import Response

from .. import totp
from ..core import events as ev
from ..core.events import AuditEvent
from ..core.session import Session
from ..identity import UserError, check_password, hash_password, verify_password
from ..sealed import SealError
from ..store.base import User
from .attempts import password_keys
from .forms import read_form
from .net import requested_host
from .tokens import Csrf, valid_id

if TYPE_CHECKING:
    from .app import Gateway

PASSWORD = "/_lapse/password"
TOTP = "/_lapse/totp"
ENROL_WINDOW = 600  # seconds a set-up form (its secret and seal) may be confirmed in


class Account:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _whoami(self, request: Request, here: str) -> tuple[Session, User] | Response:
        """The caller's live session and user, or where to send them (sign in first)."""
        gw = self.gw
        _headers, _trusted, ip, sid = gw._facts(request)
        verdict = await gw._check(host=self._host(request), path=here, method="GET", ip=ip, passive=True, sid=sid)
        d = verdict.decision
        if d.allowed and d.session is not None and await gw.rt.store.get_link(d.session.key) is not None:
            # Signed in through the IdP: the name is the IdP's, and so are password and second factor.
            return gw._error(403, "Managed by your sign-in provider", "Your password and second factor are "
                             "managed by your organisation's sign-in provider, not here.")
        user = await gw.rt.store.get_user(d.session.user) if d.allowed and d.session else None
        if not d.allowed or d.session is None or user is None or user.disabled or not valid_id(sid):
            reason = d.reason.value if d.reason else "missing"
            return Response(b"", 303, {"Location": f"/_lapse/login?next={here}&reason={reason}",
                                       "Cache-Control": "no-store"})
        return d.session, user

    def _host(self, request: Request) -> str:
        headers, trusted, _ip, _sid = self.gw._facts(request)
        return requested_host(headers, trusted)

    def _page(self, name: str, session: Session, user: User, status: int = 200,
              headers: dict[str, str] | None = None, **context: Any) -> Response:
        """An account page; its forms (sign-out included) carry this session's CSRF token."""
        csrf = self.gw.csrf.for_session(session.key)
        return self.gw._render(name, status, headers, title=context.pop("title"), user=user.name, csrf_token=csrf,
                               has_totp=totp.enrolled(user.extra), **context)

    async def _others(self, session: Session) -> list[Session]:
        """The user's other live sessions, which a change of factor offers to end."""
        return [s for s in await self.gw.rt.store.sessions(session.user) if s.key != session.key]

    async def _end_others(self, others: list[Session], reason: str, ip: str | None, resource: str) -> int:
        return sum([await self.gw.gate.revoke(s.key, reason, ip=ip, resource=resource) for s in others])

    async def _renew(self, request: Request, session: Session, here: str) -> tuple[Session, dict[str, str]]:
        """A new session in place of this one after the user re-authenticated to change a factor (a
        privilege change: OWASP renews the ID); the old ID ends (``reauth``). The new one keeps mfa,
        groups and device, with this request's IP and auth_time now. Returns it and its cookie header."""
        gw = self.gw
        _headers, _trusted, ip, sid = gw._facts(request)
        new_sid, decision = await gw.gate.sign_in(
            session.user, host=self._host(request), path=here, ip=ip, mfa=session.mfa, groups=session.groups,
            replaces=sid, login=f"POST {here}", device=session.device,
        )
        assert decision.session is not None
        return decision.session, {"Set-Cookie": gw.cookies.session(new_sid)}  # _render adds no-store

    async def _form_checked(self, request: Request, session: Session) -> dict[str, str] | None:
        form = await read_form(request)
        if form is None or not Csrf.same(form.get("csrf_token"), self.gw.csrf.for_session(session.key)):
            return None
        return form

    async def _password_ok(self, user: User, password: str, ip: str | None, resource: str) -> bool | Response:
        """The current password, under the login throttle: the attempt is counted before the check (so
        concurrent guesses on a stolen session cannot outrun it), and a right one gives it back."""
        gw = self.gw
        now = await gw.rt.store.now()
        keys = password_keys(user.name, ip)
        if not await gw.attempts.reserve(keys, now, user=user.name, ip=ip, resource=resource):
            page = gw._error(429, "Too many attempts", "Please wait a few minutes and try again.")
            page.headers["Retry-After"] = str(int(gw.login_cfg.window))
            return page
        if await asyncio.to_thread(verify_password, user, password):
            await gw.attempts.password_right(keys, now)
            return True
        await gw.rt.audit.emit([AuditEvent(now, ev.LOGIN, ev.FAILURE, user.name, None, None, ip, resource,
                                           "bad_credentials")])
        return False

    # ------------------------------------------------------------ password

    async def password_page(self, request: Request) -> Response:
        who = await self._whoami(request, PASSWORD)
        if isinstance(who, Response):
            return who
        session, user = who
        return self._page("password.html", session, user, title="Change password", others=len(await self._others(session)))

    async def change_password(self, request: Request) -> Response:
        who = await self._whoami(request, PASSWORD)
        if isinstance(who, Response):
            return who
        session, user = who
        gw, store = self.gw, self.gw.rt.store
        form = await self._form_checked(request, session)
        if form is None:
            return gw._error(403, "Request refused", "The form could not be verified. Reload the page and try again.")
        others = await self._others(session)

        def again(message: str, status: int = 200) -> Response:
            return self._page("password.html", session, user, status, title="Change password", others=len(others),
                              message=message)

        ip = gw._facts(request)[2]
        ok = await self._password_ok(user, form.get("current", ""), ip, f"POST {PASSWORD}")
        if isinstance(ok, Response):
            return ok
        if not ok:
            return again("Your current password is not right.")
        new = form.get("new", "")
        if new != form.get("confirm", ""):
            return again("The new passwords do not match.")
        try:
            check_password(new)
        except UserError as exc:
            return again(str(exc).capitalize() + ".")
        password_hash = await asyncio.to_thread(hash_password, new)
        await store.put_user(replace(user, password_hash=password_hash))
        now = await store.now()
        await gw.rt.audit.emit([AuditEvent(now, "user.password_changed", ev.SUCCESS, user.name, session.key,
                                           None, ip, f"POST {PASSWORD}")])
        ended = 0
        if form.get("end_others"):
            ended = await self._end_others(others, "password_changed", ip, f"POST {PASSWORD}")
        renewed, cookie = await self._renew(request, session, PASSWORD)
        return self._page("password.html", renewed, user, headers=cookie, title="Password changed",
                          others=len(others) - ended, changed=True, ended=ended)

    # ---------------------------------------------------------------- TOTP

    async def totp_page(self, request: Request) -> Response:
        who = await self._whoami(request, TOTP)
        if isinstance(who, Response):
            return who
        session, user = who
        return self._page("totp.html", session, user, title="One-time codes", step="password")

    async def totp_enrol(self, request: Request) -> Response:
        who = await self._whoami(request, TOTP)
        if isinstance(who, Response):
            return who
        session, user = who
        gw = self.gw
        form = await self._form_checked(request, session)
        if form is None:
            return gw._error(403, "Request refused", "The form could not be verified. Reload the page and try again.")
        ip = gw._facts(request)[2]
        if form.get("step") == "confirm":
            return await self._confirm(request, session, user, form)
        ok = await self._password_ok(user, form.get("current", ""), ip, f"POST {TOTP}")
        if isinstance(ok, Response):
            return ok
        if not ok:
            return self._page("totp.html", session, user, title="One-time codes", step="password",
                              message="Your password is not right.")
        if totp.enrolled(user.extra) and not await self._current_code_ok(
            user, form.get("code", ""), ip
        ):
            # Replacing a factor takes the factor: a stolen session plus a phished password must not
            # be enough to lock the owner out of their second factor and keep it for oneself.
            return self._page("totp.html", session, user, title="One-time codes", step="password",
                              message="To replace your one-time codes, enter a current code (or a recovery code).")
        return await self._show_secret(session, user, totp.new_secret())

    async def _current_code_ok(self, user: User, code: str, ip: str | None) -> bool:
        """A current code or recovery code, under the same lock-out as at sign-in, spent once."""
        attempts, resource = self.gw.attempts, f"POST {TOTP}"
        now = await self.gw.rt.store.now()
        if await attempts.locked([f"totp:{user.name.lower()}"], now, user=user.name, ip=ip, resource=resource):
            return False
        return await attempts.spend_code(user.name, code, now, ip, resource)

    async def _show_secret(self, session: Session, user: User, secret: str, message: str | None = None) -> Response:
        link = totp.uri(secret, user.name)
        svg = qrcode.make(link, image_factory=qrcode.image.svg.SvgPathImage, border=2).to_string(encoding="unicode")
        issued = int(await self.gw.rt.store.now())
        seal = self._seal(session, user, secret, issued)
        return self._page("totp.html", session, user, title="Set up one-time codes", step="confirm",
                          secret=secret, seal=seal, issued=issued, qr_svg=svg, uri=link, message=message,
                          others=len(await self._others(session)))

    def _seal(self, session: Session, user: User, secret: str, issued: int) -> str:
        """The set-up form's proof: this session, this secret, this moment, and the factor it replaces (a
        form shown before the factor changed, or kept past ``ENROL_WINDOW``, cannot set a factor later)."""
        try:
            factor = totp.Factor.from_extra(user.extra, self.gw.rt.sealer, user.name)
            current = "none" if factor is None else factor.secret  # not its counters: spending a code moves them
        except SealError:
            current = "unopenable"
        replaced = hashlib.sha256(current.encode()).hexdigest()
        return self.gw.csrf.bind("totp-enrol", f"{session.key}:{secret}:{issued}:{replaced}")

    async def _confirm(self, request: Request, session: Session, user: User, form: dict[str, str]) -> Response:
        gw, store = self.gw, self.gw.rt.store
        ip, resource = gw._facts(request)[2], f"POST {TOTP}"
        secret, issued = form.get("secret", ""), form.get("issued", "")
        now = await store.now()
        fresh = await store.get_user(user.name) or user
        if not issued.isdigit() or not Csrf.same(form.get("seal"), self._seal(session, fresh, secret, int(issued))):
            return gw._error(403, "Request refused", "The set-up form was changed. Start again.")
        if not 0 <= now - int(issued) <= ENROL_WINDOW:
            return gw._error(403, "Request refused", "The set-up form is too old. Start again.")
        factor, codes = totp.enrol(secret)
        checked = totp.verify(factor, form.get("code", ""), now)
        if checked is None or not form.get("code", "").strip().isdigit():
            return await self._show_secret(session, user, secret, "That code did not match. Check the app's clock and "
                                     "try the newest code.")
        await store.put_user(replace(fresh, extra={**fresh.extra, "totp": checked.to_dict(gw.rt.sealer, fresh.name)}))
        await gw.rt.audit.emit([AuditEvent(now, "user.totp_enrolled", ev.SUCCESS, user.name, session.key, None, ip,
                                           resource)])
        others = await self._others(session)
        ended = await self._end_others(others, "mfa_changed", ip, resource) if form.get("end_others") else 0
        renewed, cookie = await self._renew(request, session, TOTP)
        return self._page("totp.html", renewed, user, headers=cookie, title="One-time codes are on", step="done",
                          codes=codes, others=len(others) - ended, ended=ended)
