"""Checklist section M (audit logging of session events), black-box: a session's whole life driven
over HTTP, then the audit sinks read back (the store sink and a jsonl file).

Lapse's event names map to the OWASP Logging Vocabulary as docs/standards/k_to_o.md says.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from lapse import totp

from ._k_to_o_harness import CONFIG, PASSWORD, Harness, cookie, harness, named, run, set_cookies, sid_of, sign_in

# The main app gets a privileged route, and the audit also goes to a jsonl file.
AUDIT_CONFIG = CONFIG.replace('sinks = ["store"]', 'sinks = ["store", "jsonl:audit.jsonl"]') + """
  [[apps.privileged]]
  paths = ["/admin*"]
  max_auth_age = "5m"
"""
USER_IP = "198.51.100.1"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def at(sid: str) -> dict[str, str]:
    """The cookie header, sent through the trusted proxy for the user at USER_IP."""
    return {**cookie(sid), "x-forwarded-for": USER_IP}


async def lifecycle(h: Harness) -> list[str]:
    """login -> activity -> warning -> extend -> step-up -> idle expiry -> re-login -> logout
    (checklist 107's scenario); returns every raw session ID the gateway issued on the way."""
    first = await sid_of(h, ip=USER_IP)
    h.clock.now += 60
    assert (await h.auth(first, "/docs", x_forwarded_for=USER_IP)).status_code == 200  # activity
    h.clock.now += 490  # the 10-minute idle deadline is 110 s away (warn_before 2 m)
    status = (await h.client.get("/_lapse/session?path=/docs", headers=at(first))).json()
    extend = await h.client.post("/_lapse/session/activity?path=/docs",
                                 headers={**at(first), "x-csrf-token": status["csrf_token"]})
    assert extend.status_code == 200 and extend.json()["idle_expires_in"] == pytest.approx(600)
    refused = await h.auth(first, "/admin/users", x_forwarded_for=USER_IP)  # authenticated 550 s ago: older than max_auth_age
    assert (refused.status_code, refused.headers["x-lapse-reason"]) == (401, "step_up")
    r = await sign_in(h, ip=USER_IP, jar={"__Host-lapse": first}, reason="step_up")
    assert r.status_code == 303
    second = set_cookies(r)["__Host-lapse"]
    assert second != first and (await h.auth(second, "/admin/users", x_forwarded_for=USER_IP)).status_code == 200
    h.clock.now += 601
    gone = await h.auth(second, "/docs", x_forwarded_for=USER_IP)
    assert (gone.status_code, gone.headers["x-lapse-reason"]) == (401, "idle")
    third = await sid_of(h, ip=USER_IP)
    token = (await h.client.get("/_lapse/session", headers=at(third))).json()["csrf_token"]
    assert (await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=at(third))).status_code == 200
    return [first, second, third]


def test_107_the_session_life_cycle_is_logged_in_order(tmp_path: Path) -> None:
    """[checklist 107 · OWASP Session Mgmt CS, Logging Sessions Life Cycle] creation, step-up with the
    factor, ID rotation, timeout expiry and logout, each once and in order, tied by session hash.
    The user's "stay signed in" after the warning is ``session.renewed``."""

    async def main() -> None:
        async with harness(tmp_path, config=AUDIT_CONFIG) as h:
            await lifecycle(h)
            events = [e for e in await h.events() if e["event"] != "session.denied"]
            assert [(e["event"], e.get("reason")) for e in events] == [
                ("auth.login", "password"), ("session.created", None),
                ("session.warning", "idle"), ("session.renewed", "idle"),
                ("session.step_up_required", "max_auth_age"),
                ("session.revoked", "reauth"),  # the old ID ends: rotation
                ("auth.login", "password"), ("session.created", None), ("session.step_up", "password"),
                ("session.expired", "idle"),
                ("auth.login", "password"), ("session.created", None),
                ("session.revoked", "logout"),
            ]
            s1, s2, s3 = events[1]["session"], events[7]["session"], events[11]["session"]
            assert len({s1, s2, s3}) == 3
            assert [e["session"] for e in events] == [s1, s1, s1, s1, s1, s1, s2, s2, s2, s2, s3, s3, s3]
            assert all(e["user"] == "alice" and e["outcome"] == "success" for e in events)

    run(main())


def test_108_an_ended_session_replayed_is_denied_each_time_and_expires_once(tmp_path: Path) -> None:
    """[checklist 108 · OWASP Logging Vocabulary, session_use_after_expire] every replay of an
    expired cookie is refused and logged (session.denied, reason idle, the user named); the expiry
    itself is logged exactly once, and the sweeper adds nothing. (No distinct CRITICAL event and no
    view of ended sessions: tests/standards/gaps_k_to_o.py.)"""

    async def main() -> None:
        async with harness(tmp_path) as h:
            sid = await sid_of(h)
            h.clock.now += 601
            for _ in range(3):
                r = await h.auth(sid, "/docs")
                assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "idle")
            await h.rt.gate.sweep_once()
            expired = await named(h, "session.expired", "session.revoked")
            assert [(e["reason"], e["user"]) for e in expired] == [("idle", "alice")]
            denied = await named(h, "session.denied")
            assert [(e["reason"], e["user"], e["outcome"], e["session"]) for e in denied] == [
                ("idle", "alice", "failure", expired[0]["session"])] * 3

    run(main())


def test_109_raw_session_ids_never_reach_any_sink_or_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """[checklist 109 · ASVS 4.0.3 V7.1.1, ASVS 5.0 16.2.5] over HTTP: no issued cookie value is in
    the jsonl sink, the store file (audit table included) or the log; one stable hash per session."""

    async def main() -> list[str]:
        async with harness(tmp_path, config=AUDIT_CONFIG) as h:
            return await lifecycle(h)

    caplog.set_level(logging.DEBUG)
    raw = run(main())
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()) + caplog.text.encode()
    assert written.count(b"session.created") >= 3  # the sinks were read, not empty
    for sid in raw:
        assert len(sid) >= 22 and sid.encode() not in written
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    by_session: dict[str, set[str]] = {}
    for e in lines:
        if e["session"]:
            by_session.setdefault(e["session"], set()).add(e["event"])
    assert len(by_session) == 3  # three sessions, each under one hash from creation to its end
    assert all({"session.created"} <= names and names & {"session.expired", "session.revoked"}
               for names in by_session.values())


def test_110_every_event_carries_when_where_who_and_what(tmp_path: Path) -> None:
    """[checklist 110 · ASVS 5.0 16.2.1/16.2.2, PCI DSS 4.0 10.2.2] every event of the life cycle, a
    failed login and a throttled one: RFC 3339 UTC time, type, outcome, who, origin (IP), the app or
    resource, the session hash, and a reason wherever the event has one; jsonl equals the store.
    (A revocation caused by a request names its origin and resource: the test below.)"""

    async def main() -> list[dict[str, Any]]:
        async with harness(tmp_path, config=AUDIT_CONFIG) as h:
            await lifecycle(h)
            for _ in range(4):  # [login] max_attempts = 3: the 4th is throttled
                await sign_in(h, ip="192.0.2.9", user="bob", password="wrong")
            return await h.events()

    events = run(main())
    jsonl = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert jsonl == events
    assert {"auth.login", "auth.throttled", "session.created", "session.warning", "session.denied",
            "session.step_up_required", "session.step_up", "session.expired", "session.revoked"} <= {
        e["event"] for e in events}
    for e in events:
        assert {"ts", "event", "outcome", "user", "session", "app", "ip", "resource"} <= e.keys(), e
        assert RFC3339_UTC.match(e["ts"]) and e["ts"].endswith("Z"), e
        assert e["outcome"] in ("success", "failure"), e
        assert e["user"] in ("alice", "bob"), e
        if e["event"] != "session.revoked":  # a revocation's origin and resource: a gap (gaps_k_to_o.py)
            assert e["ip"] in (USER_IP, "192.0.2.9"), e
            assert e["app"] or e["resource"], e
        if e["event"].startswith("session."):
            assert re.fullmatch(r"[0-9a-f]{16,}", e["session"]), e
        if e["event"] in ("session.expired", "session.revoked", "session.denied", "session.warning",
                          "session.step_up_required", "session.step_up", "auth.throttled") or e["outcome"] == "failure":
            assert e.get("reason"), e
    failures = [e for e in events if e["event"] == "auth.login" and e["outcome"] == "failure"]
    assert [(e["user"], e["ip"], e["reason"]) for e in failures] == [("bob", "192.0.2.9", "bad_credentials")] * 3


def test_111_failed_and_successful_authentication_operations_are_each_logged_once(tmp_path: Path) -> None:
    """[checklist 111 · ASVS 5.0 16.3.1/16.3.2, PCI DSS 4.0 10.2.1.4/10.2.1.5] a failed step-up, a
    failed re-authentication after idle, and an MFA change (a refused then a completed TOTP enrolment)
    each give exactly one event with its outcome and what failed (the enrolment renews the session ID,
    whose own events follow). (The back-channel 400's one event is
    tests/oidc/test_backchannel.py; the factor of a successful login is a gap.)"""

    async def main() -> None:
        async with harness(tmp_path, config=AUDIT_CONFIG) as h:
            sid = await sid_of(h)
            h.clock.now += 400  # older than max_auth_age: the admin route wants a fresh sign-in
            assert (await h.auth(sid, "/admin/x")).headers["x-lapse-reason"] == "step_up"
            before = len(await h.events())
            r = await sign_in(h, jar={"__Host-lapse": sid}, reason="step_up", password="not it")
            assert r.status_code == 200 and "__Host-lapse" not in set_cookies(r)
            step = (await h.events())[before:]
            assert [(e["event"], e["outcome"], e["user"], e["reason"]) for e in step] == [
                ("auth.login", "failure", "alice", "bad_credentials")]
            assert (await h.auth(sid, "/docs")).status_code == 200  # a failed step-up ends nothing

            h.clock.now += 601
            assert (await h.auth(sid, "/docs")).headers["x-lapse-reason"] == "idle"
            before = len(await h.events())
            assert (await sign_in(h, password="still not it")).status_code == 200
            again = (await h.events())[before:]
            assert [(e["event"], e["outcome"], e["reason"]) for e in again] == [
                ("auth.login", "failure", "bad_credentials")]

            fresh = await sid_of(h)
            jar = cookie(fresh)
            page = await h.client.get("/_lapse/totp", headers=jar)
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            before = len(await h.events())
            await h.client.post("/_lapse/totp", data={"csrf_token": token, "step": "password", "current": "nope"},
                                headers=jar)
            refused = (await h.events())[before:]
            assert [(e["event"], e["outcome"], e["user"]) for e in refused] == [("auth.login", "failure", "alice")]
            shown = await h.client.post("/_lapse/totp", data={"csrf_token": token, "step": "password",
                                                               "current": PASSWORD}, headers=jar)
            secret = re.search(r'name="secret" value="([A-Z2-7]+)"', shown.text).group(1)  # type: ignore[union-attr]
            seal = html.unescape(re.search(r'name="seal" value="([^"]+)"', shown.text).group(1))  # type: ignore[union-attr]
            before = len(await h.events())
            done = await h.client.post("/_lapse/totp", headers=jar, data={
                "csrf_token": token, "step": "confirm", "secret": secret, "seal": seal,
                "issued": re.search(r'name="issued" value="(\d+)"', shown.text).group(1),
                "code": totp.code_at(secret, h.clock.now)})
            assert done.status_code == 200
            enrolled = (await h.events())[before:]
            # One event for the change itself; then the renewal of the session ID that follows it.
            assert [(e["event"], e["outcome"], e["user"], e.get("reason")) for e in enrolled] == [
                ("user.totp_enrolled", "success", "alice", None), ("session.revoked", "success", "alice", "reauth"),
                ("auth.login", "success", "alice", "password"), ("session.created", "success", "alice", None),
                ("session.step_up", "success", "alice", "password")]

    run(main())


def test_112_audit_records_cannot_be_read_by_users_nor_changed_over_http(tmp_path: Path) -> None:
    """[checklist 112 · ASVS 5.0 16.4.2, ASVS 4.0.3 V7.3.3] the audit search and admin actions are
    admin-only (403 for a signed-in user), and no method can delete or patch records (405), with the
    store unchanged.
    (Delivery to a separate system: tests/test_syslog_remote.py.)"""

    async def main() -> None:
        async with harness(tmp_path) as h:
            alice = await sid_of(h)
            html_cookie = {**cookie(alice), "accept": "text/html"}
            search = await h.client.get("/_lapse/admin?a_event=session.created", headers=html_cookie)
            assert search.status_code == 403 and "session.created" not in search.text
            bob = await sid_of(h, user="bob")
            token = (await h.client.get("/_lapse/session", headers=cookie(alice))).json()["csrf_token"]
            r = await h.client.post("/_lapse/admin/revoke", data={"user": "bob", "csrf_token": token},
                                    headers=html_cookie)
            assert r.status_code == 403 and (await h.auth(bob, "/docs")).status_code == 200
            stored = await h.events()
            for method in ("DELETE", "PATCH", "PUT"):
                for path in ("/_lapse/admin", "/_lapse/admin/revoke", "/_lapse/admin?a_event=session.created"):
                    r = await h.client.request(method, path, headers=html_cookie)
                    assert r.status_code == 405, (method, path)
            assert await h.events() == stored

    run(main())


def test_110_a_revocation_caused_by_a_request_names_its_origin_and_resource(tmp_path: Path) -> None:
    """[checklist 110 · PCI DSS 4.0 10.2.2 "Origination of event"; CONTRACT §5 ``resource`` "where
    there is a request"] the event that ends a session at a request says from where and by what: the
    re-authentication's ``reauth`` names the login, the sign-out's ``logout`` names the sign-out."""

    async def main() -> None:
        async with harness(tmp_path, config=AUDIT_CONFIG) as h:
            await lifecycle(h)
            revoked = await named(h, "session.revoked")
            assert [(e["reason"], e["ip"], e["resource"]) for e in revoked] == [
                ("reauth", USER_IP, "POST /_lapse/login"), ("logout", USER_IP, "POST /_lapse/logout")]

    run(main())


def test_111_a_successful_login_records_the_factors_used(tmp_path: Path) -> None:
    """[checklist 111 · ASVS 4.0.3 V7.2.1 / ASVS 5.0 16.3.1] "the type of authentication or factors
    used should also be collected" for authentication operations. A password sign-in says ``password``
    (``mfa`` with a TOTP code, ``oidc`` or ``oidc_mfa`` through an IdP)."""

    async def main() -> None:
        async with harness(tmp_path) as h:
            r = await sign_in(h)
            assert r.status_code == 303
            logins = await named(h, "auth.login")
            assert [(e["outcome"], e.get("reason") or e.get("factor")) for e in logins] == [("success", "password")]

    run(main())


def test_107_extending_the_session_after_the_warning_is_logged(tmp_path: Path) -> None:
    """[checklist 107/108 · OWASP Session Mgmt CS; Logging Vocabulary ``session_renewed``] when a user
    is warned and chooses to extend the session, that renewal is logged. Once per warning: a second heartbeat
    writes no second ``session.renewed``."""

    async def main() -> None:
        async with harness(tmp_path) as h:
            sid = await sid_of(h, ip=USER_IP)
            h.clock.now += 490
            status = (await h.client.get("/_lapse/session?path=/docs", headers=at(sid))).json()
            assert [e["reason"] for e in await named(h, "session.warning")] == ["idle"]
            before = len(await h.events())
            r = await h.client.post("/_lapse/session/activity?path=/docs",
                                    headers={**at(sid), "x-csrf-token": status["csrf_token"]})
            assert r.status_code == 200
            after = (await h.events())[before:]
            assert [(e["event"], e["reason"], e["user"]) for e in after] == [("session.renewed", "idle", "alice")]
            h.clock.now += 5
            again = await h.client.post("/_lapse/session/activity?path=/docs",
                                        headers={**at(sid), "x-csrf-token": status["csrf_token"]})
            assert again.status_code == 200
            assert len(await named(h, "session.renewed")) == 1

    run(main())
