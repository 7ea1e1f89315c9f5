"""Checklist items 46-85 that lapse FAILS today: honest tests of what the standard asks.

Not collected by pytest (the file name does not match test_*.py); run them with
``pytest tests/standards/gaps_f_to_j.py``: each one fails until lapse is fixed. Every docstring says
what the standard asks, what lapse does instead (observed), and the proposed fix. Traceability:
docs/standards/f_to_j.md.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from lapse import totp

from ._f_to_j_harness import (
    T0,
    cookie,
    csrf_field,
    enrol,
    events,
    gateway,
    heartbeat,
    run,
    status,
)


def test_50_extending_a_warned_session_is_audited_as_a_renewal(tmp_path: Path) -> None:
    """[checklist 50 · OWASP Logging Vocabulary session_renewed] "When a user is warned of session to be
    expired/revoked and chooses to extend their session that activity should be logged."

    Observed: after ``session.warning`` (reason idle), ``POST /_lapse/session/activity`` answers 200 with
    the new ``idle_expires_in`` (600) but writes no audit event at all: the log cannot tell a user who
    chose "Stay signed in" from one who let the session lapse.
    Fix: ``Gateway.session_activity`` (src/lapse/web/app.py): when the session had been warned for the
    deadline the heartbeat moves (the ``_warned`` mark of ``_maybe_warn``), emit one ``session.renewed``
    event (outcome success, user, session hash, app, resource, reason ``idle``) and add the name to
    core/events.py and CONTRACT §5.
    """

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            h.clock.now = T0 + 500
            assert (await status(h, sid))["idle_expires_in"] == 100
            assert len(await events(h, "session.warning")) == 1
            before = len(await h.events())
            stay = await heartbeat(h, sid)
            assert stay.status_code == 200 and stay.json()["idle_expires_in"] == 600
            after = (await h.events())[before:]
            renewed = [e for e in after if e["event"] == "session.renewed"]
            assert [(e["user"], e["session"], e["app"]) for e in renewed] == [
                ("alice", h.rt.gate.key_of(sid), "main")], after

    run(main())


def test_54_every_signed_in_lapse_page_has_a_sign_out_control(tmp_path: Path) -> None:
    """[checklist 54 · ASVS 5.0 7.4.4, OWASP Logout Button, DISA APSC-DV-000090] Every page that requires
    authentication has visible access to logout.

    Observed: /_lapse/sessions and /_lapse/admin (the _console.html layout) carry a ``Sign out`` form
    posting to /_lapse/logout, but the signed-in account pages /_lapse/password and /_lapse/totp (base.html)
    have none: their only link is "Continue" to ``/``.
    Fix: give base.html's signed-in pages the same header form as _console.html (``<form method="post"
    action="/_lapse/logout">`` with the session's ``csrf_token``), passed by ``Account._page``
    (src/lapse/web/account.py) as ``csrf_token=gw.csrf.for_session(session.key)``.
    """

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            for page in ("/_lapse/sessions", "/_lapse/password", "/_lapse/totp"):
                r = await h.client.get(page, headers=cookie(sid))
                assert r.status_code == 200, page
                forms = re.findall(r'<form\b[^>]*\baction="/_lapse/logout"[^>]*>', r.text)
                assert any('method="post"' in f for f in forms), page

    run(main())


def test_58_changing_the_second_factor_offers_to_end_the_other_sessions(tmp_path: Path) -> None:
    """[checklist 58 · ASVS 5.0 7.4.3] The option to terminate all other sessions applies "after a
    successful change or removal of any authentication factor (... an MFA settings update)", not only a
    password change (which lapse does: tests/web/test_defense.py::test_password_change_offers_to_end_every_other_session).

    Observed: replacing the TOTP factor on /_lapse/totp (password + current code, then the new code) ends
    with "One-time codes are on"; no form offers ``end_others``, and the other session still gets 200 from
    /_lapse/auth.
    Fix: ``Account._show_secret``/``Account._confirm`` (src/lapse/web/account.py) and totp.html: the same
    ``end_others`` checkbox (checked by default) as password.html; on confirm revoke the user's other
    sessions with reason ``mfa_changed``, as ``change_password`` does with ``password_changed``.
    """

    async def main() -> None:
        async with gateway(tmp_path) as h:
            secret = await enrol(h, "alice")
            other = await h.sid(totp=totp.code_at(secret, T0))
            h.clock.now = T0 + 30
            sid = await h.sid(totp=totp.code_at(secret, h.clock.now))
            h.clock.now = T0 + 60
            page = await h.client.get("/_lapse/totp", headers=cookie(sid))
            form = {"csrf_token": csrf_field(page.text), "step": "password", "current": "correct horse battery",
                    "code": totp.code_at(secret, h.clock.now)}
            shown = await h.client.post("/_lapse/totp", data=form, headers=cookie(sid))
            new = re.search(r'name="secret" value="([A-Z2-7]+)"', shown.text).group(1)  # type: ignore[union-attr]
            seal = html.unescape(re.search(r'name="seal" value="([^"]+)"', shown.text).group(1))  # type: ignore[union-attr]
            assert 'name="end_others"' in shown.text, "no option to sign out the other sessions"
            done = await h.client.post("/_lapse/totp", data={
                "csrf_token": form["csrf_token"], "step": "confirm", "secret": new, "seal": seal,
                "code": totp.code_at(new, h.clock.now), "end_others": "1"}, headers=cookie(sid))
            assert done.status_code == 200
            r = await h.auth(other)
            assert (r.status_code, r.headers.get("x-lapse-reason")) == (401, "revoked")

    run(main())


def test_68_an_mfa_requirement_is_signalled_with_acr_values(tmp_path: Path) -> None:
    """[checklist 68 · RFC 9470 §3] A request whose authentication is too weak (not too old) is refused
    with ``error="insufficient_user_authentication"`` and ``acr_values`` naming the level needed, so the
    client can ask for it; ``max_age`` alone tells it nothing.

    Observed (proxy mode, API client, fresh password-only session, route with ``mfa = true``,
    ``max_auth_age = "1h"``): 401 ``{"reason": "step_up"}`` with
    ``WWW-Authenticate: Bearer error="insufficient_user_authentication", max_age=3600``: an age the session
    already meets, and no ``acr_values``; a client that obeys re-authenticates with the password only and
    loops.
    Fix: ``Gateway.proxy`` (src/lapse/web/app.py, the STEP_UP branch): when the rule has ``mfa`` and the
    session lacks it, add ``acr_values="<lapse's MFA acr>"`` (documented, e.g. the RFC 8176-style
    ``"mfa"``) and an ``error_description``; send ``max_age`` only when the age is what failed.
    """

    async def main() -> None:
        async with gateway(tmp_path, mode="proxy") as h:
            sid = await h.sid()
            r = await h.client.get("/pay/mfa/x", headers=cookie(sid, "application/json"))
            assert (r.status_code, r.json()) == (401, {"reason": "step_up"})
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith('Bearer error="insufficient_user_authentication"')
            assert re.search(r'acr_values="[^"]+"', challenge), challenge

    run(main())

