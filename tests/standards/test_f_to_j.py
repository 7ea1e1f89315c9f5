"""Standards checklist items 46-85 (sections F-J) as black-box acceptance tests.

Each test names its item (../shared/research/standards-checklist.md) and drives lapse only through its
public surface: /_lapse/auth, /_lapse/session(/activity), login, logout, the account and admin pages,
the OIDC endpoints, the CLI and the audit events. Time is the store's clock, moved by the test.
The traceability table is docs/standards/f_to_j.md; items lapse fails are in gaps_f_to_j.py.
"""

from __future__ import annotations

from pathlib import Path

from ._f_to_j_harness import (
    T0,
    cookie,
    events,
    gateway,
    heartbeat,
    run,
    session_cookie,
    status,
)

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
