"""Checklist items 46-85 that lapse FAILS today: honest tests of what the standard asks.

Not collected by pytest (the file name does not match test_*.py); run them with
``pytest tests/standards/gaps_f_to_j.py``: each one fails until lapse is fixed. Every docstring says
what the standard asks, what lapse does instead (observed), and the proposed fix. Traceability:
docs/standards/f_to_j.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from ._f_to_j_harness import (
    T0,
    cookie,
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


def test_55_logout_clears_cookies_and_storage_with_clear_site_data(tmp_path: Path) -> None:
    """[checklist 55 · OWASP Session CS Clear-Site-Data, ASVS 5.0 14.3.1, DISA APSC-DV-000060] The logout
    response carries ``Clear-Site-Data`` including ``"cookies"`` (and ``"storage"``) besides the expiring
    Set-Cookie ("The application must clear temporary storage and cookies when the session is terminated").

    Observed: ``POST /_lapse/logout`` → 200 with ``Set-Cookie: __Host-lapse=; ...Max-Age=0`` and
    ``Clear-Site-Data: "cache", "storage"``: no ``"cookies"``, so the upstream apps' own cookies (their
    session state, CSRF cookies) survive the sign-out in the browser.
    Fix: ``Gateway.logout`` (src/lapse/web/app.py): send ``"cache", "cookies", "storage"`` (documented in
    docs/gateway.md, noting that browsers scope "cookies" to the registrable domain).
    """

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            out = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(sid))
            assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
            directives = {d.strip() for d in out.headers["clear-site-data"].split(",")}
            assert {'"cookies"', '"storage"', '"cache"'} <= directives, directives

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

