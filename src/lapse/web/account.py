"""A signed-in user's own account: change the password, set up one-time codes.

Both ask for the current password first (a session alone must not be enough to
take over an account), count wrong passwords towards the login throttle, and
carry the session's CSRF token. A password change offers to end every other
session of the user, ticked by default (ASVS 5.0 7.4.3); the session in use
stays. TOTP enrolment shows a QR code and asks for one code before the factor
is kept, so a mis-scanned secret never locks anyone out; recovery codes are
shown once.
"""

from __future__ import annotations

import asyncio
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
from ..store.base import User
from .attempts import password_keys
from .forms import read_form
from .tokens import Csrf, valid_id

if TYPE_CHECKING:
    from .app import Gateway

PASSWORD = "/_lapse/password"
TOTP = "/_lapse/totp"


class Account:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _whoami(self, request: Request, here: str) -> tuple[Session, User] | Response:
        """The caller's live session and user, or where to send them (sign in first)."""
        gw = self.gw
        headers, trusted, ip, sid = gw._facts(request)
        host = (headers.get("x-forwarded-host") if trusted else None) or headers.get("host", "")
        verdict = await gw._check(host=host, path=here, method="GET", ip=ip, passive=True, sid=sid)
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

    def _page(self, name: str, session: Session, user: User, status: int = 200, **context: Any) -> Response:
        csrf = self.gw.csrf.for_session(session.key)
        return self.gw._render(name, status, title=context.pop("title"), user=user.name, csrf_token=csrf,
                               has_totp=totp.enrolled(user.extra), **context)

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
        others = len([s for s in await self.gw.rt.store.sessions(user.name) if s.key != session.key])
        return self._page("password.html", session, user, title="Change password", others=others)

    async def change_password(self, request: Request) -> Response:
        who = await self._whoami(request, PASSWORD)
        if isinstance(who, Response):
            return who
        session, user = who
        gw, store = self.gw, self.gw.rt.store
        form = await self._form_checked(request, session)
        if form is None:
            return gw._error(403, "Request refused", "The form could not be verified. Reload the page and try again.")
        others = [s for s in await store.sessions(user.name) if s.key != session.key]

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
            ended = sum([await gw.gate.revoke(s.key, "password_changed", ip=ip, resource=f"POST {PASSWORD}") for s in others])
        return self._page("password.html", session, user, title="Password changed", others=len(others) - ended,
                          changed=True, ended=ended)

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
            return await self._confirm(session, user, form, ip)
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
        return self._show_secret(session, user, totp.new_secret())

    async def _current_code_ok(self, user: User, code: str, ip: str | None) -> bool:
        """A current code or recovery code, under the same lock-out as at sign-in, spent once."""
        attempts, resource = self.gw.attempts, f"POST {TOTP}"
        now = await self.gw.rt.store.now()
        if await attempts.locked([f"totp:{user.name.lower()}"], now, user=user.name, ip=ip, resource=resource):
            return False
        return await attempts.spend_code(user.name, code, now, ip, resource)

    def _show_secret(self, session: Session, user: User, secret: str, message: str | None = None) -> Response:
        link = totp.uri(secret, user.name)
        svg = qrcode.make(link, image_factory=qrcode.image.svg.SvgPathImage, border=2).to_string(encoding="unicode")
        seal = self.gw.csrf.bind("totp-enrol", f"{session.key}:{secret}")
        return self._page("totp.html", session, user, title="Set up one-time codes", step="confirm",
                          secret=secret, seal=seal, qr_svg=svg, uri=link, message=message)

    async def _confirm(self, session: Session, user: User, form: dict[str, str], ip: str | None) -> Response:
        gw, store = self.gw, self.gw.rt.store
        secret = form.get("secret", "")
        if not Csrf.same(form.get("seal"), gw.csrf.bind("totp-enrol", f"{session.key}:{secret}")):
            return gw._error(403, "Request refused", "The set-up form was changed. Start again.")
        now = await store.now()
        factor, codes = totp.enrol(secret)
        checked = totp.verify(factor, form.get("code", ""), now)
        if checked is None or not form.get("code", "").strip().isdigit():
            return self._show_secret(session, user, secret, "That code did not match. Check the app's clock and "
                                     "try the newest code.")
        fresh = await store.get_user(user.name) or user
        await store.put_user(replace(fresh, extra={**fresh.extra, "totp": checked.to_dict(gw.rt.sealer, fresh.name)}))
        await gw.rt.audit.emit([AuditEvent(now, "user.totp_enrolled", ev.SUCCESS, user.name, session.key, None, ip,
                                           f"POST {TOTP}")])
        return self._page("totp.html", session, user, title="One-time codes are on", step="done", codes=codes)
