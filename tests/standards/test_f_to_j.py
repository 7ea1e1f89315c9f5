"""Standards checklist items 46-85 (sections F-J) as black-box acceptance tests.

Each test names its item (../shared/research/standards-checklist.md) and drives lapse only through its
public surface: /_lapse/auth, /_lapse/session(/activity), login, logout, the account and admin pages,
the OIDC endpoints, the CLI and the audit events. Time is the store's clock, moved by the test.
The traceability table is docs/standards/f_to_j.md; items lapse fails are in gaps_f_to_j.py.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

from lapse import totp
from lapse.core.events import rfc3339

from ._f_to_j_harness import (
    CONFIG,
    T0,
    Harness,
    admin,
    authorize_query,
    cookie,
    csrf_field,
    enrol,
    events,
    gateway,
    heartbeat,
    new_sid,
    oidc,
    run,
    session_cookie,
    status,
)

FIREFOX_ANDROID = "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0"


def lapse_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``lapse`` command on the same config, store and secret as the gateway under test."""
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(mode="forward-auth", upstream="http://127.0.0.1:9"))
    return subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), *args], capture_output=True,
                          text=True, timeout=30, env=os.environ.copy())


async def keep_active(h: Harness, sid: str, until: float, every: float = 500, path: str = "/docs") -> None:
    """Heartbeats every ``every`` seconds up to ``until`` (clock time), so only other limits can bite."""
    while h.clock.now + every < until:
        h.clock.now += every
        assert (await heartbeat(h, sid, path)).status_code == 200

# --------------------------------------------------------------------- F. countdown warnings


def test_46_idle_warning_starts_exactly_warn_before_the_idle_deadline(tmp_path: Path) -> None:
    """[checklist 46 · NIST 800-63B-4 5.2/8.1] The server tells the client a timeout is near 2 minutes
    before it (warn_before 2m, idle 10m): not a second earlier, and it records that it warned."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            h.clock.now = T0 + 600 - 120 - 1
            early = await status(h, sid)
            assert (early["idle_expires_in"], early["warn_before"]) == (121, 120)
            assert await events(h, "session.warning") == []
            h.clock.now = T0 + 600 - 120 + 1
            late = await status(h, sid)
            assert late["idle_expires_in"] == 119 and late["idle_expires_in"] <= late["warn_before"]
            assert late["server_time"] == T0 + 481
            [warning] = await events(h, "session.warning")
            assert (warning["reason"], warning["app"], warning["user"], warning["outcome"]) == (
                "idle", "main", "alice", "success")
            assert warning["session"] == h.rt.gate.key_of(sid)

    run(main())


def test_47_the_warning_gives_seconds_and_warn_before_is_per_app(tmp_path: Path) -> None:
    """[checklist 47 · NIST SP 800-53 AC-12(3)] The warning carries the remaining seconds and the server
    time (not just "soon"), and the lead time is the app's own (pay: 30 s, the default app: 2 min)."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            assert (await status(h, sid, "/pay/x"))["warn_before"] == 30
            assert (await status(h, sid, "/docs"))["warn_before"] == 120
            h.clock.now = T0 + 300 - 31
            assert (await status(h, sid, "/pay/x"))["idle_expires_in"] == 31
            assert await events(h, "session.warning") == []
            h.clock.now = T0 + 300 - 29
            body = await status(h, sid, "/pay/x")
            assert isinstance(body["idle_expires_in"], int | float) and body["idle_expires_in"] == 29
            assert body["server_time"] == T0 + 271
            assert [(e["app"], e["reason"]) for e in await events(h, "session.warning")] == [("pay", "idle")]

    run(main())


def test_48_absolute_warning_and_no_heartbeat_moves_the_absolute_deadline(tmp_path: Path) -> None:
    """[checklist 48 · NIST 800-63B-4 8.1] Before the fixed re-authentication the client is warned
    (reason absolute); the "stay" heartbeat then succeeds but cannot move the absolute deadline."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            for t in range(500, 3500, 500):  # active all along: only the absolute limit (1 h) is left
                h.clock.now = T0 + t
                assert (await heartbeat(h, sid)).status_code == 200
            h.clock.now = T0 + 3600 - 121
            assert (await status(h, sid))["absolute_expires_in"] == 121
            assert [e for e in await events(h, "session.warning") if e["reason"] == "absolute"] == []
            h.clock.now = T0 + 3600 - 119
            assert (await status(h, sid))["absolute_expires_in"] == 119
            warned = [e for e in await events(h, "session.warning") if e["reason"] == "absolute"]
            assert len(warned) == 1 and warned[0]["app"] == "main"
            stay = await heartbeat(h, sid)
            assert stay.status_code == 200 and stay.json()["absolute_expires_in"] == 119
            h.clock.now = T0 + 3600
            r = await h.auth(sid, "/docs")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")

    run(main())


def test_49_the_server_expires_idle_sessions_without_any_client_code(tmp_path: Path) -> None:
    """[checklist 49 · OWASP Session Mgmt CS, Automatic Client Logout] Client warnings are a courtesy:
    a raw HTTP client with no widget is refused at T_idle + ε, served at T_idle − ε, and the session
    that nobody comes back to ends with exactly one session.expired (reason idle)."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            kept, dropped = await h.sid(), await h.sid()
            h.clock.now = T0 + 600 - 1
            ok = await h.auth(kept, "/docs")
            assert (ok.status_code, ok.headers["x-lapse-expires-in"]) == (200, "600")  # served, and active
            h.clock.now = T0 + 600 + 1
            r = await h.auth(dropped, "/docs")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "idle")
            assert "location" in r.headers and "alice" not in r.text
            key = h.rt.gate.key_of(dropped)
            denied = [e for e in await events(h, "session.denied") if e["session"] == key]
            assert [(e["reason"], e["resource"]) for e in denied] == [("idle", "GET /docs")]
            h.clock.now = T0 + 3600 + 1  # past the most generous idle limit any app grants (org: 1 h)
            await h.rt.gate.sweep_once()
            await h.rt.gate.sweep_once()
            expired = [e for e in await events(h, "session.expired") if e["session"] == key]
            assert [(e["reason"], e["outcome"], e["user"]) for e in expired] == [("idle", "success", "alice")]

    run(main())


def test_51_timeouts_and_logout_tell_the_user_why(tmp_path: Path) -> None:
    """[checklist 51 · NIST SP 800-53 AC-12(2), DISA APSC-DV-000100] After a timeout or sign-out the
    browser lands on a page that names the reason (reason=idle|absolute|revoked in the URL and a
    sentence on the page); an API client gets 401 with the reason as a machine-readable code."""

    async def main() -> None:
        async with gateway(tmp_path, mode="proxy") as h:
            sid = await h.sid()
            expected = {"idle": "You were signed out after a period of inactivity.",
                        "absolute": "Your session reached its time limit. Please sign in again.",
                        "revoked": "Your session was ended."}

            async def told(sid: str, reason: str) -> None:
                browser = await h.client.get("/docs?x=1", headers=cookie(sid))
                assert browser.status_code == 303
                assert browser.headers["location"] == f"/_lapse/login?next=/docs%3Fx%3D1&reason={reason}"
                page = await h.client.get(browser.headers["location"], headers={"accept": "text/html"})
                assert page.status_code == 200 and expected[reason] in page.text
                api = await h.client.get("/docs", headers=cookie(sid, "application/json"))
                assert (api.status_code, api.json()) == (401, {"reason": reason})

            kept = await h.sid()
            h.clock.now = T0 + 601
            await told(sid, "idle")
            for t in range(500, 3600, 500):  # active all along: only the absolute limit is left
                h.clock.now = T0 + t
                assert (await heartbeat(h, kept)).status_code == 200
            h.clock.now = T0 + 3600
            await told(kept, "absolute")
            other = await h.sid()
            token = (await status(h, other))["csrf_token"]
            out = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(other))
            assert out.status_code == 200 and "<h1>You are signed out.</h1>" in out.text
            await told(other, "revoked")

    run(main())


# ------------------------------------------------------------------- G. logout and termination


def test_52_a_logged_out_cookie_resumes_nothing_in_any_app(tmp_path: Path) -> None:
    """[checklist 52 · ASVS 4.0.3 V3.3.1] After logout the saved cookie is refused by every app the
    sign-in served (the forward-auth of each downstream host and path), by the session API, and no
    answer is cacheable."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            places = (("app.test", "/docs"), ("app.test", "/pay/x"), ("wide.test", "/"))
            for host, uri in places:
                assert (await h.auth(sid, uri, host=host)).status_code == 200
            token = (await status(h, sid))["csrf_token"]
            out = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(sid))
            assert out.status_code == 200 and out.headers["cache-control"] == "no-store"
            assert out.headers["set-cookie"].startswith("__Host-lapse=;") and "Max-Age=0" in out.headers["set-cookie"]
            for host, uri in places:
                r = await h.auth(sid, uri, host=host)
                assert (r.status_code, r.headers["x-lapse-reason"], r.headers["cache-control"]) == (
                    401, "revoked", "no-store"), (host, uri)
            assert (await status(h, sid)) == {"authenticated": False, "reason": "revoked"}
            beat = await h.client.post("/_lapse/session/activity", headers={**session_cookie(sid),
                                                                             "x-csrf-token": token})
            assert beat.status_code == 401 and beat.json()["authenticated"] is False
            revoked = await events(h, "session.revoked")
            assert [(e["reason"], e["session"]) for e in revoked] == [("logout", h.rt.gate.key_of(sid))]

    run(main())


# ------------------------------------------------- H. listing and ending sessions, account events


def test_54_every_signed_in_lapse_page_has_a_sign_out_control(tmp_path: Path) -> None:
    """[checklist 54 · ASVS 5.0 7.4.4, OWASP Logout Button, DISA APSC-DV-000090] Every page that requires
    authentication has visible access to logout: the session list and the account pages each carry a
    ``Sign out`` button in a form posting to /_lapse/logout with the session's CSRF token, and that form
    does end the session."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            for page in ("/_lapse/sessions", "/_lapse/password", "/_lapse/totp"):
                sid = await h.sid()
                r = await h.client.get(page, headers=cookie(sid))
                assert r.status_code == 200, page
                form = re.search(r'<form\b[^>]*\baction="/_lapse/logout"[^>]*>(.*?)</form>', r.text, re.S)
                assert form is not None and 'method="post"' in form.group(0), page
                assert re.search(r'<button type="submit"[^>]*>Sign out</button>', form.group(1)), page
                token = re.search(r'name="csrf_token"\s+value="([^"]+)"', form.group(1))
                assert token is not None, page
                out = await h.client.post("/_lapse/logout", data={"csrf_token": token.group(1)}, headers=cookie(sid))
                assert out.status_code == 200, page
                gone = await h.auth(sid)
                assert (gone.status_code, gone.headers["x-lapse-reason"]) == (401, "revoked"), page
            assert [e["reason"] for e in await events(h, "session.revoked")] == ["logout"] * 3

    run(main())


def test_57_users_see_their_sessions_and_ending_one_takes_a_fresh_password(tmp_path: Path) -> None:
    """[checklist 57 · ASVS 4.0.3 V3.3.4 / ASVS 5.0 7.5.2] From one browser the user sees every session
    (device, IP, signed-in and last-active times, never a raw ID) and ends another one only "having
    re-entered login credentials" (here: a privileged rule of 5 minutes on POST /_lapse/sessions/end)."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            here = await h.sid()
            h.clock.now = T0 + 1
            h.client.headers["user-agent"] = FIREFOX_ANDROID
            phone = await h.sid()
            del h.client.headers["user-agent"]
            h.clock.now = T0 + 400  # the password was entered 400 s ago
            page = await h.client.get("/_lapse/sessions", headers=cookie(here))
            assert page.status_code == 200
            row = next(r for r in page.text.split("<tr>") if "Firefox on Android" in r)
            signed_in = rfc3339(T0 + 1)[:19].replace("T", " ") + " UTC"  # created = last active
            assert "127.0.0.1" in row and row.count(signed_in) == 2
            assert here not in page.text and phone not in page.text  # handles only, never session IDs
            handle = re.search(r'name="handle" value="([0-9a-f]{12})"', row).group(1)  # type: ignore[union-attr]
            end = {"handle": handle, "csrf_token": csrf_field(page.text)}
            stale = await h.client.post("/_lapse/sessions/end", data=end, headers=cookie(here))
            assert stale.status_code == 303
            assert stale.headers["location"] == "/_lapse/login?next=/_lapse/sessions&reason=step_up"
            assert (await h.auth(phone)).status_code == 200
            again = await h.login(cookies={"__Host-lapse": here})  # re-enter the password
            fresh = new_sid(again)
            assert again.status_code == 303 and fresh and fresh != here
            page = await h.client.get("/_lapse/sessions", headers=cookie(fresh))
            done = await h.client.post("/_lapse/sessions/end", data={**end, "csrf_token": csrf_field(page.text)},
                                       headers=cookie(fresh))
            assert (done.status_code, done.headers["location"]) == (303, "/_lapse/sessions?ended=1")
            r = await h.auth(phone)
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "revoked")
            ended = [(e["reason"], e["session"]) for e in await events(h, "session.revoked")]
            assert ended == [("reauth", h.rt.gate.key_of(here)), ("logout", h.rt.gate.key_of(phone))]

    run(main())


def test_58_changing_the_second_factor_offers_to_end_the_other_sessions(tmp_path: Path) -> None:
    """[checklist 58 · ASVS 5.0 7.4.3] The option to terminate all other sessions applies "after a
    successful change or removal of any authentication factor (... an MFA settings update)", not only a
    password change (tests/web/test_defense.py::test_password_change_offers_to_end_every_other_session):
    replacing the TOTP factor offers ``end_others``, ticked by default, and confirming with it ends the
    other session (reason ``mfa_changed``, naming the request) while the user stays signed in."""

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
            assert 'name="end_others" value="1" checked' in shown.text
            done = await h.client.post("/_lapse/totp", data={
                "csrf_token": form["csrf_token"], "step": "confirm", "secret": new, "seal": seal,
                "issued": re.search(r'name="issued" value="(\d+)"', shown.text).group(1),
                "code": totp.code_at(new, h.clock.now), "end_others": "1"}, headers=cookie(sid))
            assert done.status_code == 200 and "1 other" in done.text
            r = await h.auth(other)
            assert (r.status_code, r.headers.get("x-lapse-reason")) == (401, "revoked")
            ended = [(e["reason"], e["resource"]) for e in await events(h, "session.revoked")]
            assert ended == [("mfa_changed", "POST /_lapse/totp"), ("reauth", "POST /_lapse/totp")]
            assert (await h.auth(new_sid(done))).status_code == 200  # type: ignore[arg-type]

    run(main())


def test_59_disabling_or_deleting_a_user_ends_their_sessions_at_once(tmp_path: Path) -> None:
    """[checklist 59 · ASVS 5.0 7.4.2] `lapse users disable` ends every session of that user on its next
    request (not at its next timeout), with session.revoked reason user_disabled; deleting likewise."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            a1, a2, bob = await h.sid(), await h.sid(), await h.sid(user="bob")
            r = lapse_cli(tmp_path, "users", "disable", "alice")
            assert r.returncode == 0, r.stderr
            for sid in (a1, a2):
                refused = await h.auth(sid)
                assert (refused.status_code, refused.headers["x-lapse-reason"]) == (401, "revoked")
            assert (await h.auth(bob)).status_code == 200
            assert (await h.login()).status_code == 200  # a disabled user cannot sign in again
            keys = {h.rt.gate.key_of(a1), h.rt.gate.key_of(a2)}
            revoked = await events(h, "session.revoked")
            assert {e["session"] for e in revoked} == keys and {e["reason"] for e in revoked} == {"user_disabled"}
            assert [e["user"] for e in await events(h, "user.disabled")] == ["alice"]
            assert lapse_cli(tmp_path, "users", "delete", "bob").returncode == 0
            assert (await h.auth(bob)).headers["x-lapse-reason"] == "revoked"
            assert [e["reason"] for e in await events(h, "session.revoked") if e["user"] == "bob"] == ["user_deleted"]

    run(main())


def test_62_by_default_a_user_may_have_any_number_of_sessions(tmp_path: Path) -> None:
    """[checklist 62 · ASVS 4.0.3 V3.7 preamble] Blocking simultaneous sessions is opt-in
    (``max_sessions``); by default a new sign-in ends no earlier one."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sids = [await h.sid() for _ in range(5)]
            assert [(await h.auth(s)).status_code for s in sids] == [200] * 5
            assert await events(h, "session.revoked") == []
            assert len(await events(h, "session.created")) == 5

    run(main())


# ---------------------------------------------------------------- I. re-authentication, step-up


def test_65_sensitive_routes_need_the_factor_they_name_even_right_after_a_password_login(tmp_path: Path) -> None:
    """[checklist 65 · ASVS 5.0 7.5.1 / 7.5.3] A route marked ``mfa = true`` challenges a session that
    entered only a password a second ago; a route that asks for recent authentication alone lets it
    through; the same user signed in with both factors passes the MFA route."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            secret = await enrol(h, "alice")
            sid = await h.sid(user="bob")  # bob has no second factor
            assert (await h.auth(sid, "/pay/admin/x", method="POST")).status_code == 200
            r = await h.auth(sid, "/pay/mfa/transfer", method="POST")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "step_up")
            assert r.headers["location"] == "/_lapse/login?next=/pay/mfa/transfer&reason=step_up"
            [required] = await events(h, "session.step_up_required")
            assert (required["user"], required["resource"], required["app"]) == ("bob", "POST /pay/mfa/transfer", "pay")
            strong = await h.sid(totp=totp.code_at(secret, T0))
            assert (await h.auth(strong, "/pay/mfa/transfer", method="POST")).status_code == 200

    run(main())


def test_66_reauthentication_after_a_timeout_takes_every_factor_again(tmp_path: Path) -> None:
    """[checklist 66 · NIST 800-63B rev3 7.2, 800-63B-4 2.2.3/2.3.3] After an idle or an absolute timeout,
    the old cookie plus the password is not enough for a user with a second factor: no session until
    the code too is given; then a NEW session ID, and the old one is ended (reason reauth)."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            secret = await enrol(h, "alice")
            old = await h.sid(totp=totp.code_at(secret, T0))
            for timeout, at in (("idle", T0 + 601), ("absolute", None)):
                if at is None:
                    await keep_active(h, old, until=h.clock.now + 3600)
                    h.clock.now = (await h.rt.store.read(h.rt.gate.key_of(old)))[0].auth_time + 3600
                else:
                    h.clock.now = at
                r = await h.auth(old, "/docs")
                assert (r.status_code, r.headers["x-lapse-reason"]) == (401, timeout)
                password_only = await h.login(cookies={"__Host-lapse": old})
                assert password_only.status_code == 200 and 'name="totp"' in password_only.text
                assert new_sid(password_only) is None
                both = await h.login(cookies={"__Host-lapse": old}, totp=totp.code_at(secret, h.clock.now))
                new = new_sid(both)
                assert both.status_code == 303 and new and new != old
                assert (await h.auth(new, "/docs")).status_code == 200
                assert (await h.auth(old, "/docs")).headers["x-lapse-reason"] == "revoked"
                assert (await events(h, "session.revoked"))[-1]["session"] == h.rt.gate.key_of(old)
                old = new
            assert [e["reason"] for e in await events(h, "session.revoked")] == ["reauth", "reauth"]

    run(main())


def test_67_a_session_is_never_stronger_than_the_sign_in_that_made_it(tmp_path: Path) -> None:
    """[checklist 67 · NIST 800-63B-4 5.1] A password-only sign-in stays password-only: an MFA route
    challenges it, also after the user enrols a second factor during that session."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            await enrol(h, "alice")  # the account gains a factor; this session never presented it
            h.clock.now = T0 + 10
            r = await h.auth(sid, "/pay/mfa/x")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "step_up")
            assert (await h.auth(sid, "/docs")).status_code == 200  # otherwise a good session

    run(main())


def test_78_no_one_skips_the_second_factor_and_old_codes_are_refused(tmp_path: Path) -> None:
    """[checklist 78 · PCI DSS 4.0 8.5.1, ASVS 5.0 6.5.1/6.5.5] An administrator with a second factor
    gets no session on the password alone; a code older than the documented skew window (one 30 s step
    either side) or from the future is refused and audited; the current code succeeds."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            await admin(h)
            secret = await enrol(h, "root")
            alone = await h.login(user="root")
            assert alone.status_code == 200 and new_sid(alone) is None
            for when in (T0 - 60, T0 + 60):
                r = await h.login(user="root", totp=totp.code_at(secret, when))
                assert r.status_code == 200 and "not valid" in r.text and new_sid(r) is None
            refused = [e["reason"] for e in await events(h, "auth.login") if e["outcome"] == "failure"]
            assert refused == ["bad_totp", "bad_totp"]
            assert (await h.login(user="root", totp=totp.code_at(secret, T0))).status_code == 303

    run(main())


def test_79_the_admin_console_needs_mfa_step_up_rotates_the_id_and_has_its_own_idle(tmp_path: Path) -> None:
    """[checklist 79 · OWASP MFA CS, "elevating a user session to an administrative session"] The admin
    console (a privileged rule: MFA within 10 minutes) challenges a password-only admin; after MFA it
    opens, with its own 2-minute idle limit while the rest of the session lives on; stepping up again
    gives a new session ID and ends the old one."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            await admin(h, "ops")
            weak = await h.sid(user="ops")
            r = await h.client.get("/_lapse/admin", headers=cookie(weak))
            assert (r.status_code, r.headers["location"]) == (303, "/_lapse/login?next=/_lapse/admin&reason=step_up")
            await admin(h)
            secret = await enrol(h, "root")
            root = await h.sid(user="root", totp=totp.code_at(secret, T0))
            page = await h.client.get("/_lapse/admin", headers=cookie(root))
            assert page.status_code == 200 and 'action="/_lapse/logout"' in page.text  # item 54 too
            h.clock.now = T0 + 100
            assert (await h.auth(root, "/docs")).status_code == 200
            h.clock.now = T0 + 100 + 121  # 221 s since the console was used: past its 2 minutes
            idle = await h.client.get("/_lapse/admin", headers=cookie(root))
            assert (idle.status_code, idle.headers["location"]) == (303, "/_lapse/login?next=/_lapse/admin&reason=idle")
            assert (await h.auth(root, "/docs")).status_code == 200
            up = await h.login(user="root", cookies={"__Host-lapse": root}, totp=totp.code_at(secret, h.clock.now))
            elevated = new_sid(up)
            assert up.status_code == 303 and elevated and elevated != root
            assert (await h.client.get("/_lapse/admin", headers=cookie(elevated))).status_code == 200
            assert (await h.auth(root, "/docs")).headers["x-lapse-reason"] == "revoked"
            assert [e["reason"] for e in await events(h, "session.step_up")] == ["mfa"]

    run(main())


# ------------------------------------------- I/J. federated re-authentication (lapse as OIDC RP)


def test_70_an_idp_error_is_a_clear_refusal_not_a_loop(tmp_path: Path) -> None:
    """[checklist 70 · RFC 9470 §5] When the IdP answers ``error=unmet_authentication_requirements``,
    lapse shows a sign-in failure (no redirect back to the IdP, no session) and audits why."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            start = await rp.start("/pay/mfa/x")
            state = authorize_query(start)["state"]
            flow = start.headers["set-cookie"].split(";", 1)[0]
            r = await rp.h.client.get("/_lapse/oidc/callback", params={
                "error": "unmet_authentication_requirements", "state": state}, headers={"cookie": flow,
                                                                                        "accept": "text/html"})
            assert r.status_code == 400 and "location" not in r.headers and "Sign-in failed" in r.text
            assert new_sid(r) is None and await rp.h.rt.store.sessions() == []
            [failed] = await events(rp.h, "auth.login")
            assert (failed["outcome"], failed["reason"]) == ("failure", "idp_unmet_authentication_requirements")

    run(main())


def test_71_a_token_refresh_is_not_a_reauthentication(tmp_path: Path) -> None:
    """[checklist 71 · RFC 9470 §6.1] ``auth_time`` is set at authentication and survives token renewal:
    lapse's refresh grant (revalidate_every) never moves the session's absolute deadline, even when
    the refreshed ID token says a later auth_time."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            sid = await rp.sign_in()
            assert (await status(rp.h, sid))["absolute_expires_in"] == 3600
            rp.h.clock.now += 61
            rp.idp.refresh_auth_time = rp.h.clock.now
            assert await rp.gw.oidc.revalidate_once() == 0  # the IdP still vouches
            assert rp.idp.grants == ["authorization_code", "refresh_token"]
            assert (await status(rp.h, sid))["absolute_expires_in"] == 3600 - 61

    run(main())


def test_73_max_age_sent_means_auth_time_required(tmp_path: Path) -> None:
    """[checklist 73 · OIDC Core 3.1.2.1] lapse always sends ``max_age``, so an ID token without
    ``auth_time`` is refused: no session, auth.login failure reason missing_auth_time."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            rp.idp.drop = ("auth_time",)
            r = await rp.come_back(await rp.start())
            assert r.status_code == 400 and new_sid(r) is None
            assert [(e["outcome"], e["reason"], e["user"]) for e in await events(rp.h, "auth.login")] == [
                ("failure", "missing_auth_time", "carol")]

    run(main())


def test_74_too_old_an_auth_time_is_asked_again_with_prompt_login_then_refused(tmp_path: Path) -> None:
    """[checklist 74 · OIDC Core 3.1.3.7] An ``auth_time`` older than the ``max_age`` asked for makes
    lapse re-issue the request with ``prompt=login``; if the IdP still answers with the stale time, the
    login is refused (stale_auth_time) instead of looping."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            old = int(rp.h.clock.now) - (3600 + 61)  # past max_age and the 60 s clock-skew leeway
            start = await rp.start()
            assert authorize_query(start)["max_age"] == "3600" and "prompt" not in authorize_query(start)
            again = await rp.come_back(start, auth_time=old)
            assert again.status_code == 303 and new_sid(again) is None
            query = authorize_query(again)
            assert (query["prompt"], query["max_age"]) == ("login", "3600")
            refused = await rp.come_back(again, auth_time=old)
            assert refused.status_code == 400 and new_sid(refused) is None
            assert [e["reason"] for e in await events(rp.h, "auth.login")] == ["stale_auth_time"]

    run(main())


def test_77_without_amr_a_federated_session_is_the_weakest_kind(tmp_path: Path) -> None:
    """[checklist 77 · ASVS 5.0 6.8.4 / 10.3.4] An ID token without ``acr``/``amr`` counts as one factor:
    MFA routes challenge it; one whose ``amr`` names a second factor (RFC 8176 ``otp``) passes."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            plain = await rp.sign_in("/pay/mfa/x")
            r = await rp.h.auth(plain, "/pay/mfa/x")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "step_up")
            strong = await rp.sign_in("/pay/mfa/x", amr=["pwd", "otp"])
            assert (await rp.h.auth(strong, "/pay/mfa/x")).status_code == 200

    run(main())


def test_80_every_authorization_request_carries_the_apps_max_age(tmp_path: Path) -> None:
    """[checklist 80 · ASVS 4.0.3 V3.6.1, NIST 800-63C-4 4.7] The RP tells the IdP the maximum
    authentication age on every request: the target app's absolute limit after the org ceiling
    (wide: 12h capped to 8h), or a privileged route's shorter step-up age."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            for host, target, age in (("app.test", "/", "3600"), ("wide.test", "/", "28800"),
                                      ("app.test", "/pay/admin/x", "300")):
                query = authorize_query(await rp.start(target, host))
                assert query["max_age"] == age, (host, target)
                assert query["state"] and query["nonce"] and query["code_challenge_method"] == "S256"

    run(main())


def test_81_the_idps_auth_time_sets_the_deadline_the_status_reports(tmp_path: Path) -> None:
    """[checklist 81 · ASVS 4.0.3 V3.6.2, NIST 800-63C-4 4.7/4.9] The assertion's ``auth_time`` is recorded
    and the absolute deadline runs from it (signed in at the IdP 10 minutes ago: 50 minutes left of 1 h)."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            now = rp.h.clock.now
            sid = await rp.sign_in(auth_time=int(now) - 600)
            body = await status(rp.h, sid)
            assert body["absolute_expires_in"] == 3000 and body["server_time"] == now
            rp.h.clock.now = now + 3000
            r = await rp.h.auth(sid, "/docs")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")

    run(main())


def test_82_the_org_ceiling_caps_every_app_and_a_looser_app_is_warned_about(tmp_path: Path) -> None:
    """[checklist 82 · NIST 800-63C-4 4.7, ASVS 5.0 7.1.3/7.6.1] wide.test asks idle 90m / absolute 12h
    under an org ceiling of 1h / 8h: the session dies at 1 h of inactivity and at 8 h of use, and
    `lapse policy check` warns that the app's values are capped (clamped, not silently accepted)."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            idle = await h.sid()
            h.clock.now = T0 + 3599
            assert (await h.auth(idle, "/", host="wide.test")).status_code == 200
            h.clock.now = T0 + 3599 + 3601
            r = await h.auth(idle, "/", host="wide.test")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "idle")
            h.clock.now = T0
            busy = await h.sid()
            while h.clock.now + 3000 < T0 + 8 * 3600:
                h.clock.now += 3000
                assert (await h.auth(busy, "/", host="wide.test")).status_code == 200
            h.clock.now = T0 + 8 * 3600 - 1
            ok = await h.auth(busy, "/", host="wide.test")
            assert (ok.status_code, ok.headers["x-lapse-expires-in"]) == (200, "1")
            h.clock.now = T0 + 8 * 3600
            r = await h.auth(busy, "/", host="wide.test")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")
        check = lapse_cli(tmp_path, "policy", "check", str(tmp_path / "lapse.toml"))
        assert check.returncode == 0
        assert "apps[2].idle: 1h30m is above the org ceiling org.max_idle = 1h; it will be capped to 1h" in check.stderr
        assert "apps[2].absolute: 12h is above the org ceiling org.max_absolute = 8h; it will be capped to 8h" \
            in check.stderr

    run(main())


def test_83_the_id_tokens_expiry_does_not_limit_the_session(tmp_path: Path) -> None:
    """[checklist 83 · NIST 800-63C-4 4.9] "Assertion validity time windows SHALL NOT be used to limit
    the session at the RP": an ID token valid for 5 minutes gives a session that follows the policy
    (idle 10 m, absolute 1 h)."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            start = rp.h.clock.now
            sid = await rp.sign_in(exp=int(start) + 300)
            await keep_active(rp.h, sid, until=start + 3600)
            rp.h.clock.now = start + 3599
            assert (await rp.h.auth(sid, "/docs")).status_code == 200
            rp.h.clock.now = start + 3600
            assert (await rp.h.auth(sid, "/docs")).headers["x-lapse-reason"] == "absolute"

    run(main())


def test_85_after_the_absolute_limit_the_idp_must_authenticate_again(tmp_path: Path) -> None:
    """[checklist 85 · NIST 800-63B rev3 7.2, WSTG-SESS-06] After the RP's absolute timeout, coming back
    through the IdP (whose own session still remembers the user) is not a silent re-entry: lapse sends
    ``max_age``, refuses the old ``auth_time`` and asks with ``prompt=login``; a fresh authentication
    gives a new session with a full hour."""

    async def main() -> None:
        async with oidc(tmp_path) as rp:
            signed_in = int(rp.h.clock.now)
            sid = await rp.sign_in()
            await keep_active(rp.h, sid, until=signed_in + 3600)
            rp.h.clock.now = signed_in + 3600
            assert (await rp.h.auth(sid, "/docs")).headers["x-lapse-reason"] == "absolute"
            rp.h.clock.now += 120  # the user comes back through the IdP's portal a little later
            start = await rp.start()
            assert authorize_query(start)["max_age"] == "3600"
            again = await rp.come_back(start, auth_time=signed_in)  # the IdP's session, not a new login
            assert new_sid(again) is None and authorize_query(again)["prompt"] == "login"
            back = await rp.come_back(again, auth_time=int(rp.h.clock.now))
            fresh = new_sid(back)
            assert back.status_code == 303 and fresh
            assert (await status(rp.h, fresh))["absolute_expires_in"] == 3600

    run(main())


def test_55_logout_clears_cookies_and_storage_with_clear_site_data(tmp_path: Path) -> None:
    """[checklist 55 · OWASP Session CS Clear-Site-Data, ASVS 5.0 14.3.1, DISA APSC-DV-000060] The logout
    response carries ``Clear-Site-Data`` including ``"cookies"`` (and ``"storage"``) besides the expiring
    Set-Cookie ("The application must clear temporary storage and cookies when the session is terminated").
    A cross-site form posts without the cookie (SameSite) and clears nothing: it cannot wipe the site."""

    async def main() -> None:
        async with gateway(tmp_path) as h:
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            out = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(sid))
            assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
            directives = {d.strip() for d in out.headers["clear-site-data"].split(",")}
            assert {'"cookies"', '"storage"', '"cache"'} <= directives, directives
            forged = await h.client.post("/_lapse/logout", data={}, headers={"origin": "https://evil.test"})
            assert forged.status_code == 200
            assert "set-cookie" not in forged.headers and "clear-site-data" not in forged.headers

    run(main())


def test_68_an_mfa_requirement_is_signalled_with_acr_values(tmp_path: Path) -> None:
    """[checklist 68 · RFC 9470 §3] A request whose authentication is too weak (not too old) is refused
    with ``error="insufficient_user_authentication"`` and ``acr_values`` naming the level needed, so the
    client can ask for it; ``max_age`` alone tells it nothing. lapse names ``acr_values="mfa"`` (RFC 8176: more than one factor) and
    no ``max_age`` when only the second factor is missing."""

    async def main() -> None:
        async with gateway(tmp_path, mode="proxy") as h:
            sid = await h.sid()
            r = await h.client.get("/pay/mfa/x", headers=cookie(sid, "application/json"))
            assert (r.status_code, r.json()) == (401, {"reason": "step_up"})
            challenge = r.headers["www-authenticate"]
            assert challenge == ('Bearer error="insufficient_user_authentication", '
                                 'error_description="a second factor is required", acr_values="mfa"')

    run(main())
