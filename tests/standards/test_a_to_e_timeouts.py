"""Checklist sections C (idle timeout), D (absolute timeout, renewal) and E (what counts as activity),
black-box against the gateway with the store's clock in the test's hand
(shared/research/standards-checklist.md items 23-45)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lapse.core.presets import PRESETS as SHIPPED

from ._a_to_e_harness import (
    BASIC,
    EPS,
    PRESET_APPS,
    PRESETS,
    T0,
    Harness,
    activity,
    cookie,
    events_named,
    harness,
    issued,
    lapse_cli,
    run,
    set_cookie_attrs,
    status,
    write_config,
)

IDLE, ABSOLUTE = 600.0, 3600.0  # BASIC's limits


async def passive_ok(h: Harness, sid: str, host: str = "app.test") -> int:
    """A forward-auth probe that never moves an idle clock (CONTRACT §4 X-Lapse-Activity: passive)."""
    return (await h.auth(sid, "/probe", host=host, x_lapse_activity="passive")).status_code


async def reason(h: Harness, sid: str, host: str = "app.test") -> tuple[int, str | None]:
    r = await h.auth(sid, "/probe", host=host, x_lapse_activity="passive")
    return r.status_code, r.headers.get("x-lapse-reason")


# ------------------------------------------------------------------------------------------ C


def test_the_effective_policy_names_its_limits_and_their_source(tmp_path: Path):
    """[checklist 23 · ASVS 5.0 7.3.1 / 7.1.1]: the effective policy for an app states idle, absolute and
    where they come from (the preset, with its clause in the code); the idle limit is enforced at it."""
    conf = write_config(tmp_path, PRESET_APPS.format(mode="forward-auth", upstream="http://127.0.0.1:9"))
    done = lapse_cli(conf, "policy", "explain", "--host", "pci-dss-4.test", "--path", "/x", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["app"], got["idle_timeout_s"], got["absolute_timeout_s"]) == ("pci-dss-4", 900, 43200)
    assert "preset:pci-dss-4" in got["rules"] and "app:pci-dss-4" in got["rules"]
    assert "8.2.8" in SHIPPED["pci-dss-4"].idle_source  # the documented justification for the value


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_ends_sessions_at_its_idle_and_absolute_limits(tmp_path: Path, preset: str):
    """[checklist 24 · ASVS 4.0.3 V3.3.2], [27 · NIST 800-63B rev 3 4.2.3/4.3.3], [28 · PCI DSS 8.2.8],
    [29 · HIPAA 164.312(a)(2)(iii)], [30 · DISA STIG APSC-DV-000070/80, per app], [35 · rev 3 12 h]:
    at T−ε allowed, at T+ε refused with the reason, for idle and for absolute (kept active all along);
    after an idle lapse, polling or a heartbeat cannot revive the session for that app."""
    idle, absolute = SHIPPED[preset].idle, SHIPPED[preset].absolute
    host = f"{preset}.test"

    async def main():
        async with harness(tmp_path, config=PRESET_APPS) as h:
            if idle is not None:
                sid = await h.sid()
                token = (await status(h, sid, host=host))["csrf_token"]
                h.clock.now = T0 + idle - EPS
                assert await passive_ok(h, sid, host) == 200
                h.clock.now = T0 + idle + EPS
                assert await reason(h, sid, host) == (401, "idle")
                # "Refreshing alone fails": a status poll and a heartbeat do not bring it back.
                assert (await status(h, sid, host=host)) == {"authenticated": False, "reason": "idle"}
                beat = await activity(h, sid, token, host=host)
                assert (beat.status_code, beat.json()) == (401, {"authenticated": False, "reason": "idle"})
                assert await reason(h, sid, host) == (401, "idle")

            start = h.clock.now = T0 + 10 * 86400
            sid = await h.sid()
            step = idle - 60 if idle is not None else absolute
            t = start
            while t + step < start + absolute - EPS:
                t += step
                h.clock.now = t
                assert (await h.auth(sid, "/work", host=host)).status_code == 200  # an active request
            h.clock.now = start + absolute - EPS
            assert await passive_ok(h, sid, host) == 200
            h.clock.now = start + absolute + EPS
            assert await reason(h, sid, host) == (401, "absolute")

    run(main())


def test_activity_resets_the_idle_clock_and_reauthentication_resets_both(tmp_path: Path):
    """[checklist 25 · NIST 800-63B-4 5.2] and [checklist 40 · derived]: one active request restarts the
    idle period; a re-authentication at t gives a NEW ID whose absolute deadline is t + T_abs, and the old
    ID is dead (revoked, reason reauth)."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            h.clock.now = T0 + IDLE - 2 * EPS
            assert (await h.auth(sid, "/work")).status_code == 200  # active
            h.clock.now += IDLE - 2 * EPS
            assert await passive_ok(h, sid) == 200  # past T0 + IDLE: the activity moved the deadline
            h.clock.now += 2 * EPS + 1
            assert await reason(h, sid) == (401, "idle")

            h.clock.now = start = T0 + 86400
            old = await h.sid()
            for step in range(500, int(ABSOLUTE / 2), 500):  # kept in use, so only the absolute clock counts
                h.clock.now = start + step
                assert (await h.auth(old, "/work")).status_code == 200
            h.clock.now = t = start + ABSOLUTE / 2
            assert (await status(h, old))["absolute_expires_in"] == ABSOLUTE / 2
            new = issued(await h.login(cookies={"__Host-lapse": old}))
            assert new != old
            fresh = await status(h, new)
            assert (fresh["absolute_expires_in"], fresh["idle_expires_in"], fresh["server_time"]) == (ABSOLUTE, IDLE, t)
            assert await reason(h, old) == (401, "revoked")
            revoked = await events_named(h, "session.revoked")
            assert [e["reason"] for e in revoked] == ["reauth"]
            for at in range(int(t) + 400, int(t + ABSOLUTE - EPS), 400):  # kept in use till the new deadline
                h.clock.now = at
                if at > start + ABSOLUTE:  # the old absolute deadline no longer binds
                    assert await passive_ok(h, new) == 200
                assert (await h.auth(new, "/work")).status_code == 200
            h.clock.now = t + ABSOLUTE + EPS  # the new one does
            assert await reason(h, new) == (401, "absolute")

    run(main())


def test_an_idle_session_is_ended_on_the_server_and_stays_ended(tmp_path: Path):
    """[checklist 31 · OWASP Session Mgmt CS "Idle Timeout"]: after the idle period the server side ends the
    session (one session.expired, reason idle; it leaves the user's session list) and the same cookie never
    revives it."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            idle_sid = await h.sid()
            idle_hash = (await events_named(h, "session.created"))[-1]["session"]
            keeper = await h.sid()
            page = await h.client.get("/_lapse/sessions", headers=cookie(keeper))
            assert idle_hash[:12] in page.text
            for t in (300, 600):
                h.clock.now = T0 + t - 1
                assert (await h.auth(keeper, "/work")).status_code == 200
            h.clock.now = T0 + IDLE + EPS
            assert await reason(h, idle_sid) == (401, "idle")
            for _ in range(3):  # replays, active and passive
                assert (await h.auth(idle_sid, "/work")).status_code == 401
                assert (await status(h, idle_sid))["authenticated"] is False
            expired = [e for e in await events_named(h, "session.expired") if e["session"] == idle_hash]
            assert [(e["reason"], e["outcome"], e["user"]) for e in expired] == [("idle", "success", "alice")]
            page = await h.client.get("/_lapse/sessions", headers=cookie(keeper))
            assert page.status_code == 200 and idle_hash[:12] not in page.text

    run(main())


# ------------------------------------------------------------------------------------------ D


def test_activity_never_moves_the_absolute_deadline(tmp_path: Path):
    """[checklist 32 · ASVS 5.0 7.3.2], [33 · NIST 800-63B rev 3 7.2] and [43 · derived]: an automated ACTIVE
    heartbeat every T_idle/2, plus passive polls and active requests, keep the session alive until
    T_abs − ε and never move absolute_expires_in; at T_abs + ε it is over, with one session.expired."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            t = 0.0
            while t + IDLE / 2 < ABSOLUTE - EPS:
                t += IDLE / 2
                h.clock.now = T0 + t
                beat = await activity(h, sid, token)
                assert beat.status_code == 200 and beat.json()["absolute_expires_in"] == ABSOLUTE - t
                assert (await h.auth(sid, "/work")).status_code == 200
                assert (await status(h, sid))["absolute_expires_in"] == ABSOLUTE - t
            h.clock.now = T0 + ABSOLUTE - EPS
            assert (await activity(h, sid, token)).json()["absolute_expires_in"] == EPS
            assert await passive_ok(h, sid) == 200
            h.clock.now = T0 + ABSOLUTE + EPS
            assert await reason(h, sid) == (401, "absolute")
            beat = await activity(h, sid, token)
            assert (beat.status_code, beat.json()) == (401, {"authenticated": False, "reason": "absolute"})
            expired = await events_named(h, "session.expired")
            assert [e["reason"] for e in expired] == ["absolute"]

    run(main())


def test_the_first_answer_after_expiry_clears_the_cookie_with_its_attributes(tmp_path: Path):
    """[checklist 39 · OWASP Session Mgmt CS "Session Expiration"]: the client side is invalidated too:
    Set-Cookie with an empty value, Max-Age=0 and the same Path, Secure, HttpOnly, SameSite as issued."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            login = await h.login()
            given = set_cookie_attrs(login)
            for probe in ("auth", "status"):
                sid = await h.sid()
                h.clock.now += IDLE + EPS
                if probe == "auth":
                    r = await h.auth(sid, "/work")
                    assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "idle")
                else:
                    r = await h.client.get("/_lapse/session", headers=cookie(sid))
                    assert r.json() == {"authenticated": False, "reason": "idle"}
                cleared = set_cookie_attrs(r)
                assert cleared["="] == "" and cleared["max-age"] == "0", probe
                for attr in ("path", "secure", "httponly", "samesite"):
                    assert cleared[attr] == given[attr], (probe, attr)
                assert "domain" not in cleared

    run(main())


# ------------------------------------------------------------------------------------------ E


def test_passive_traffic_never_keeps_a_session_alive(tmp_path: Path):
    """[checklist 41 · NIST 800-63B-4 5.2 / 5.1.2]: status polls, passive-path requests and requests marked
    passive every 10 s for T_idle + ε: served until T_idle, refused from then on; an ACTIVE heartbeat at
    T_idle − ε does reset the clock."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            for t in range(10, int(IDLE), 10):
                h.clock.now = T0 + t
                assert (await status(h, sid))["idle_expires_in"] == IDLE - t
                assert (await h.auth(sid, "/poll/inbox")).status_code == 200
                assert await passive_ok(h, sid) == 200
            h.clock.now = T0 + IDLE + EPS
            assert await reason(h, sid) == (401, "idle")

            h.clock.now = start = T0 + 86400
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            h.clock.now = start + IDLE - EPS
            assert (await activity(h, sid, token)).json()["idle_expires_in"] == IDLE
            h.clock.now = start + IDLE + EPS
            assert await passive_ok(h, sid) == 200

    run(main())


# (route class, request) -> does it count as the user's activity?
ROUTES = [
    ("forward-auth GET", "active"),
    ("forward-auth POST", "active"),
    ("forward-auth passive_paths", "passive"),
    ("forward-auth X-Lapse-Activity: passive", "passive"),
    ("GET /_lapse/session", "passive"),
    ("POST /_lapse/session/activity", "active"),
    ("GET /_lapse/widget.js", "passive"),
    ("GET /_lapse/healthz", "passive"),
    ("GET /_lapse/login", "passive"),
    ("GET /_lapse/password", "passive"),
]


async def _send(h: Harness, route: str, sid: str, token: str) -> int:
    if route == "forward-auth GET":
        return (await h.auth(sid, "/work")).status_code
    if route == "forward-auth POST":
        return (await h.auth(sid, "/work", method="POST")).status_code
    if route == "forward-auth passive_paths":
        return (await h.auth(sid, "/poll/x")).status_code
    if route == "forward-auth X-Lapse-Activity: passive":
        return await passive_ok(h, sid)
    if route == "POST /_lapse/session/activity":
        return (await activity(h, sid, token)).status_code
    return (await h.client.get(route.split(" ", 1)[1], headers=cookie(sid))).status_code


@pytest.mark.parametrize(("route", "kind"), ROUTES)
def test_each_route_class_is_active_or_passive_as_documented(tmp_path: Path, route: str, kind: str):
    """[checklist 42 · OWASP Session Mgmt CS "Idle Timeout", conflict noted]: table-driven, idle_expires_in
    read from the passive status endpoint before and after one request of each class."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            h.clock.now = T0 + 100
            assert (await status(h, sid))["idle_expires_in"] == IDLE - 100
            assert await _send(h, route, sid, token) == 200
            after = (await status(h, sid))["idle_expires_in"]
            assert after == (IDLE if kind == "active" else IDLE - 100), route

    run(main())


def test_the_status_endpoint_reports_the_deadlines_enforcement_uses(tmp_path: Path):
    """[checklist 45 · derived, ASVS 5.0 16.2.2]: the status answer (remaining seconds plus server_time, UTC
    Unix seconds, CONTRACT §4) gives the exact instants at which forward-auth starts refusing."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            h.clock.now = T0 + 123
            s = await status(h, sid)
            assert s["server_time"] == T0 + 123
            idle_at = s["server_time"] + s["idle_expires_in"]
            absolute_at = s["server_time"] + s["absolute_expires_in"]
            assert (idle_at, absolute_at) == (T0 + IDLE, T0 + ABSOLUTE)
            h.clock.now = idle_at - 0.01
            assert await passive_ok(h, sid) == 200
            h.clock.now = idle_at
            assert await reason(h, sid) == (401, "idle")

            h.clock.now = start = T0 + 86400
            sid = await h.sid()
            token = (await status(h, sid))["csrf_token"]
            for t in range(500, int(ABSOLUTE), 500):
                h.clock.now = start + t
                await activity(h, sid, token)
            s = await status(h, sid)
            absolute_at = s["server_time"] + s["absolute_expires_in"]
            assert absolute_at == start + ABSOLUTE
            h.clock.now = absolute_at - 0.01
            assert await passive_ok(h, sid) == 200
            h.clock.now = absolute_at
            assert await reason(h, sid) == (401, "absolute")

    run(main())


def test_an_unlimited_absolute_lifetime_is_refused(tmp_path: Path):
    """[checklist 34 · NIST 800-63B-4 2.1.3-2.3.3 "A definite reauthentication overall timeout SHALL be
    established"]: `absolute = "none"` is an error at every level (exit 2, naming the key and line).
    (An AAL3 absolute beyond 12 h is only warned about: see gaps_a_to_e.py.)"""
    for section in ("[defaults]", '[[apps]]\nname = "a"\nhosts = ["a.test"]'):
        conf = write_config(tmp_path / str(len(section)), f'{section}\nabsolute = "none"\n')
        done = lapse_cli(conf, "policy", "check", str(conf))
        assert done.returncode == 2
        assert 'absolute: "none" is not allowed here: this limit must have a value' in done.stderr


def test_a_forged_post_does_not_count_as_activity(tmp_path: Path):
    """[checklist 12 · NIST 800-63B-4 5.1 (CSRF) + checklist 44 "no idle-timer reset"]
    Asks: a POST with a valid cookie but a missing/wrong CSRF token -> 403, no state change and no idle reset.
    The session pages judge a POST passively and count it as activity only once its token is verified."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            h.clock.now = T0 + 300
            assert (await status(h, sid))["idle_expires_in"] == 300
            r = await h.client.post("/_lapse/sessions/end", data={"csrf_token": "forged", "handle": "others"},
                                    headers={**cookie(sid), "origin": "https://evil.test"})
            assert r.status_code == 403
            assert (await status(h, sid))["idle_expires_in"] == 300, "the forged POST moved the idle clock"

    run(main())
