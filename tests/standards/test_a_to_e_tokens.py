"""Checklist sections A (session token generation, binding, transport) and B (cookie attributes),
black-box against the gateway (shared/research/standards-checklist.md items 5-22). Items already
checked elsewhere are listed in docs/standards/a_to_e.md, not repeated here."""

from __future__ import annotations

import base64
import html
import re
import struct
from collections import Counter
from pathlib import Path

from lapse import totp
from lapse.config import parse_config
from lapse.runtime import open_runtime

from ..core.helpers import Clock
from ._a_to_e_harness import (
    BASIC,
    PASSWORD,
    T0,
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

N_TOKENS = 10_000


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def test_ten_thousand_session_ids_are_unique_uniform_and_unstructured(tmp_path: Path):
    """[checklist 5 · ASVS 4.0.3 V3.2.2 / ASVS 5.0 7.2.3 / NIST 800-63B-4 5.1] and [checklist 6 · ASVS 4.0.3
    V3.2.4]: 10,000 IDs from the path every login takes: no duplicates, ≥ 128 bits, byte frequencies
    within a chi-square bound, and every byte position varies (no fixed part, counter or clock)."""

    async def main():
        loaded = parse_config('[store]\nurl = "memory://"\n[audit]\nsinks = []\n', "lapse.toml", tmp_path)
        clock = Clock(T0)
        async with open_runtime(loaded, clock=clock) as rt:
            tokens = []
            for i in range(N_TOKENS):
                clock.now = T0 + i  # a clock in the ID would show as a drifting byte pattern
                tokens.append((await rt.gate.sign_in(f"user{i % 7}", host="app.test"))[0])
        assert len(set(tokens)) == N_TOKENS
        raws = [_raw(t) for t in tokens]
        assert {len(r) for r in raws} == {32}  # 256 bits, ≥ 16 bytes asked
        counts = Counter(b for r in raws for b in r)
        expected = N_TOKENS * 32 / 256
        chi2 = sum((counts.get(b, 0) - expected) ** 2 / expected for b in range(256))
        assert chi2 < 255 + 6 * (2 * 255) ** 0.5, chi2  # df 255: mean 255, sd √510; 6 sd is far out
        for pos in range(32):
            assert len({r[pos] for r in raws}) > 240, pos  # no fixed or slowly counting byte anywhere
        # Consecutive IDs share no more than chance: no counter in the low bits either.
        same = sum(a[-1] == b[-1] for a, b in zip(raws, raws[1:]))
        assert same < N_TOKENS * 3 / 256

    run(main())


def test_the_cookie_value_says_nothing_about_user_ip_time_or_role(tmp_path: Path):
    """[checklist 7 · OWASP Session Mgmt CS "Session ID Content" / NIST 800-63B-4 5.1.1]: decoded every way a
    reader might try, the cookie holds no user name, IP, timestamp or group."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = issued(await h.login())
            assert re.fullmatch(r"[A-Za-z0-9_-]{43}", sid)
            views = [sid.encode(), _raw(sid), _raw(sid).hex().encode()]
            now = int(T0)
            needles = [b"alice", b"finance", b"127.0.0.1", bytes([127, 0, 0, 1]), str(now).encode(),
                       struct.pack(">I", now), struct.pack("<I", now), struct.pack(">d", T0), b"admin"]
            for view in views:
                for needle in needles:
                    assert needle.lower() not in view.lower(), needle

    run(main())


def test_ids_never_travel_in_urls_and_a_url_borne_id_is_not_accepted(tmp_path: Path):
    """[checklist 8 · ASVS 4.0.3 V3.1.1 / ASVS 5.0 14.2.1]: no Location or link carries the ID; an ID in the
    query string (no cookie) signs nobody in."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            r = await h.login(next_="/docs?a=1")
            sid = issued(r)
            seen = [r.headers["location"]]
            for path in ("/_lapse/login", "/_lapse/sessions", "/_lapse/password", "/_lapse/session"):
                page = await h.client.get(path, headers={**cookie(sid), "accept": "text/html"})
                seen += [page.headers.get("location", ""), *re.findall(r'(?:href|action|src)="([^"]*)"', page.text)]
            h.clock.now += 601  # idle: the refusal's redirect is a URL too
            gone = await h.auth(sid, "/docs?a=1")
            assert gone.status_code == 401
            seen.append(gone.headers["location"])
            assert all(sid not in url for url in seen), seen

            h.clock.now = T0 + 7200
            fresh = await h.sid()
            for uri in (f"/docs?sid={fresh}", f"/docs?__Host-lapse={fresh}", f"/docs;jsessionid={fresh}"):
                r = await h.auth(None, uri)
                assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "missing"), uri
            body = (await h.client.get(f"/_lapse/session?sid={fresh}&__Host-lapse={fresh}")).json()
            assert body == {"authenticated": False, "reason": "missing"}

    run(main())


def test_the_id_reaches_the_client_only_in_set_cookie(tmp_path: Path):
    """[checklist 15 · ASVS 5.0 3.3.4 / ASVS 4.0.3 V3.4.2]: HttpOnly, and the ID appears in no body and no
    other header of lapse's JSON and HTML answers (so page script cannot learn it)."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            r = await h.login()
            sid = issued(r)
            assert "httponly" in set_cookie_attrs(r)
            answers = [r]
            for path, accept in (("/_lapse/login", "text/html"), ("/_lapse/session", "application/json"),
                                 ("/_lapse/sessions", "text/html"), ("/_lapse/password", "text/html"),
                                 ("/_lapse/widget.js", "*/*")):
                answers.append(await h.client.get(path, headers={**cookie(sid), "accept": accept}))
            token = (await status(h, sid))["csrf_token"]
            answers.append(await activity(h, sid, token))
            answers.append(await h.auth(sid, "/docs"))
            answers.append(await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(sid)))
            for a in answers:
                assert a.status_code in (200, 303), (a.request.url, a.status_code)
                assert sid not in a.text, a.request.url
                others = [v for k, v in a.headers.multi_items() if k.lower() != "set-cookie"]
                assert not any(sid in v for v in others), a.request.url

    run(main())


def test_no_setting_can_give_the_cookie_a_domain(tmp_path: Path):
    """[checklist 17 · ASVS 5.0 3.3.3 / RFC 6265bis 4.1.3.2] and [checklist 19 · NIST 800-63B-4 5.1.1 item 2]:
    the cookie writer has no Domain; a config that tries to add one is refused before start."""
    for key in ('cookie_domain = "example.test"', 'domain = "example.test"'):
        conf = write_config(tmp_path / key.split(" ")[0], f"[server]\n{key}\n")
        done = lapse_cli(conf, "policy", "check", str(conf))
        assert done.returncode == 2, done.stderr
        assert f"server.{key.split(' ')[0]}: unknown key" in done.stderr


def test_every_answer_that_sets_or_shows_a_session_is_no_store(tmp_path: Path):
    """[checklist 22 · OWASP Session Mgmt CS "Web Content Caching" / ASVS 5.0 14.3.2]: the login answer that
    sets the cookie, the one that clears it, and lapse's authenticated pages and JSON are never cached."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            login = await h.login()
            sid = issued(login)
            answers = {"login": login, "auth": await h.auth(sid, "/docs")}
            for path, accept in (("/_lapse/session", "application/json"), ("/_lapse/sessions", "text/html"),
                                 ("/_lapse/password", "text/html"), ("/_lapse/login", "text/html")):
                answers[path] = await h.client.get(path, headers={**cookie(sid), "accept": accept})
            token = answers["/_lapse/session"].json()["csrf_token"]
            answers["activity"] = await activity(h, sid, token)
            answers["logout"] = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie(sid))
            answers["cleared"] = await h.auth(sid, "/docs")
            assert set_cookie_attrs(answers["logout"])["max-age"] == "0"
            assert set_cookie_attrs(answers["cleared"])["max-age"] == "0"
            for name, a in answers.items():
                assert "no-store" in a.headers.get("cache-control", ""), (name, a.headers)

    run(main())


def test_a_request_without_a_valid_csrf_token_changes_nothing(tmp_path: Path):
    """[checklist 12 · NIST 800-63B-4 5.1] and [checklist 44 · derived]: the ACTIVE heartbeat and logout need
    the session-bound token; a cross-site one without it (or with another session's) is 403, the idle clock
    does not move, and the session lives. (POST /_lapse/sessions/end: see gaps_a_to_e.py.)"""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            other = await h.sid(user="bob")
            theirs = (await status(h, other))["csrf_token"]
            h.clock.now += 300
            before = await status(h, sid)
            assert before["idle_expires_in"] == 300
            cross_site = {"origin": "https://evil.test", "sec-fetch-site": "cross-site"}
            for token in (None, "", "x" * 43, theirs, before["csrf_token"][:-1]):
                r = await activity(h, sid, token, **cross_site)
                assert r.status_code == 403, token
            r = await h.client.post("/_lapse/logout", data={"csrf_token": theirs}, headers={**cookie(sid), **cross_site})
            assert r.status_code == 403
            after = await status(h, sid)
            assert after["idle_expires_in"] == 300 and after["authenticated"]  # no reset, no logout
            assert (await h.auth(other)).status_code == 200
            assert not await events_named(h, "session.revoked")
            # The same heartbeat with the right token does move it: the refusals above were the token's doing.
            assert (await activity(h, sid, before["csrf_token"])).json()["idle_expires_in"] == 600

    run(main())


def test_login_form_post_without_its_token_is_refused(tmp_path: Path):
    """[checklist 12 · NIST 800-63B-4 5.1]: the login POST is bound to the pre-login nonce cookie too."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            page = await h.client.get("/_lapse/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            form = {"username": "alice", "password": PASSWORD, "csrf_token": token}
            r = await h.client.post("/_lapse/login", data=form)  # the token without its nonce cookie
            assert r.status_code == 403 and "__Host-lapse=" not in str(r.headers.get_list("set-cookie"))
            assert not await events_named(h, "session.created")

    run(main())


def test_an_https_gateway_sends_hsts_on_every_answer_a_browser_reads(tmp_path: Path):
    """[checklist 11 · NIST SP 800-63B rev 3 7.1 / 800-63B-4 5.1: no fall-back to http after authentication]
    With an https ``public_url``, the sign-in redirect, the login page and the session API carry
    Strict-Transport-Security; with plain http nothing does (a browser ignores it there anyway).
    Forward-auth answers carry none: proxies do not pass them on (the proxy sets HSTS for its sites)."""

    async def main():
        https = BASIC.replace("trusted_proxies", 'public_url = "https://app.test"\ntrusted_proxies')
        async with harness(tmp_path, config=https) as h:
            r = await h.login()
            sid = issued(r)
            answers = [r, await h.client.get("/_lapse/login"), await h.client.get("/_lapse/session", headers=cookie(sid))]
            for a in answers:
                assert a.headers.get("strict-transport-security") == "max-age=31536000", a.request.url
        async with harness(tmp_path / "http", config=BASIC) as h:
            r = await h.login()
            assert "strict-transport-security" not in r.headers
            assert "strict-transport-security" not in (await h.client.get("/_lapse/login")).headers

    run(main())


def _csrf(page_text: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page_text).group(1)  # type: ignore[union-attr]


async def _renewed(h, old: str, answer) -> str:
    """The new ID ``answer`` set in place of ``old``: the old one refused and ended as ``reauth``, the new one
    live, and the page's CSRF token the new session's (its sign-out works with it)."""
    assert "no-store" in answer.headers["cache-control"]
    new = issued(answer)
    assert new != old
    refused = await h.auth(old)
    assert (refused.status_code, refused.headers["x-lapse-reason"]) == (401, "revoked")
    assert [e["reason"] for e in await events_named(h, "session.revoked")] == ["reauth"]
    assert (await h.auth(new)).status_code == 200
    return new


def test_a_password_change_renews_the_session_id(tmp_path: Path):
    """[checklist 3 · OWASP Session Mgmt CS "Renew the Session ID After Any Privilege Level Change"]: a
    password change (the cheat sheet's example) answers with a new session cookie, the old ID ends (reason
    ``reauth``) and is refused, and the page's forms carry the new session's CSRF token."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            page = await h.client.get("/_lapse/password", headers=cookie(sid))
            form = {"csrf_token": _csrf(page.text), "current": PASSWORD, "new": "n3w password!",
                    "confirm": "n3w password!"}
            r = await h.client.post("/_lapse/password", data=form, headers=cookie(sid))
            assert r.status_code == 200 and "Password changed" in r.text
            new = await _renewed(h, sid, r)
            [login] = [e for e in await events_named(h, "auth.login") if e["resource"] == "POST /_lapse/password"]
            assert login["outcome"] == "success"
            out = await h.client.post("/_lapse/logout", data={"csrf_token": _csrf(r.text)}, headers=cookie(new))
            assert out.status_code == 200 and (await h.auth(new)).status_code == 401

    run(main())


def test_setting_up_one_time_codes_renews_the_session_id(tmp_path: Path):
    """[checklist 3 · OWASP Session Mgmt CS "Renew the Session ID After Any Privilege Level Change"]: adding
    a second factor is a privilege change too; confirming it answers with a new session cookie, the old ID
    ends (reason ``reauth``) and is refused."""

    async def main():
        async with harness(tmp_path, config=BASIC) as h:
            sid = await h.sid()
            page = await h.client.get("/_lapse/totp", headers=cookie(sid))
            token = _csrf(page.text)
            shown = await h.client.post("/_lapse/totp", data={"csrf_token": token, "step": "password",
                                                               "current": PASSWORD}, headers=cookie(sid))
            secret = re.search(r'name="secret" value="([A-Z2-7]+)"', shown.text).group(1)  # type: ignore[union-attr]
            seal = html.unescape(re.search(r'name="seal" value="([^"]+)"', shown.text).group(1))  # type: ignore[union-attr]
            assert "__Host-lapse=" not in str(shown.headers.get_list("set-cookie"))  # not before the factor is kept
            done = await h.client.post("/_lapse/totp", data={
                "csrf_token": token, "step": "confirm", "secret": secret, "seal": seal,
                "issued": re.search(r'name="issued" value="(\d+)"', shown.text).group(1),
                "code": totp.code_at(secret, h.clock.now)}, headers=cookie(sid))
            assert done.status_code == 200 and "One-time codes are on" in done.text
            await _renewed(h, sid, done)

    run(main())
