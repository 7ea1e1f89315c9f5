"""Defense in depth (issue 7): step-up with real TOTP codes, replay and lockout, recovery codes,
session limits, fixation, a flood of unknown cookies, and the trusted client IP (hypothesis)."""

from __future__ import annotations

import asyncio
import html
import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse import totp
from lapse.core.policy import NetworkSpec, PolicySpec, compile_policy
from lapse.web.app import UNKNOWN_COOKIE_LIMIT
from lapse.web.attempts import network
from lapse.web.net import Trust, client_ip

from .test_gateway import CONFIG, PASSWORD, T0, _set_cookies, at_once, harness, on_store, reasons, run

MFA_CONFIG = CONFIG.replace('max_auth_age = "5m"', 'max_auth_age = "5m"\n  mfa = true').replace(
    'passive_paths = ["/poll*"]', 'passive_paths = ["/poll*"]\nmax_sessions = 2'
)


async def enrol(h, name: str = "alice") -> tuple[str, list[str]]:
    user = await h.rt.store.get_user(name)
    secret = totp.new_secret()
    factor, codes = totp.enrol(secret)
    await h.rt.store.put_user(replace(user, extra={**user.extra, "totp": factor.to_dict(h.rt.sealer, user.name)}))
    return secret, codes


def names(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


def test_step_up_with_totp_issues_a_new_id_and_codes_never_work_twice(tmp_path: Path):
    """standards-checklist I.64 / NIST SP 800-63B-4 §5.2: privileged actions need a fresh, MFA-backed
    authentication; success is a NEW session with every clock reset; a used code is refused (RFC 6238 §5.2)."""

    async def main():
        async with harness(tmp_path, config=MFA_CONFIG) as h:
            secret, _ = await enrol(h)
            # The password alone is not enough: the form comes back asking for the code.
            first = await h.login()
            assert first.status_code == 200 and 'name="totp"' in first.text and "__Host-lapse=" not in str(
                first.headers.get_list("set-cookie"))
            code = totp.code_at(secret, T0)
            r = await h.login(totp=code)
            assert r.status_code == 303, r.text
            sid = _set_cookies(r)["__Host-lapse"]
            assert (await h.auth(sid, "/pay/admin/x")).status_code == 200  # fresh, with MFA
            # The same code again (a replay, within its 30 s) is refused and audited.
            again = await h.login(totp=code)
            assert again.status_code == 200 and "not valid" in again.text
            assert any(e["event"] == "auth.login" and e.get("reason") == "bad_totp" for e in await h.events())

            for t in (50, 100, 150, 200, 250, 300):  # active use keeps the pay app's 1 m idle clock fresh
                h.clock.now = T0 + t
                assert (await h.auth(sid, "/pay/other")).status_code == 200
            h.clock.now = T0 + 301  # past max_auth_age: step-up needed, the session is otherwise fine
            r = await h.auth(sid, "/pay/admin/x")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "step_up")
            assert (await h.auth(sid, "/pay/other")).status_code == 200
            page = await h.client.get("/_lapse/login?reason=step_up", headers={"cookie": f"__Host-lapse={sid}"})
            assert "Confirm it" in page.text and 'value="alice"' in page.text and 'name="totp"' in page.text

            fresh_code = totp.code_at(secret, h.clock.now)
            r = await h.login(totp=fresh_code, cookies={"__Host-lapse": sid})
            assert r.status_code == 303
            new = _set_cookies(r)["__Host-lapse"]
            assert new != sid
            assert (await h.auth(new, "/pay/admin/x")).status_code == 200
            old = await h.auth(sid, "/pay/other")
            assert (old.status_code, old.headers["x-lapse-reason"]) == (401, "revoked")
            events = await h.events()
            assert "session.step_up_required" in names(events)
            ups = [e for e in events if e["event"] == "session.step_up"]
            assert len(ups) == 1 and ups[0]["reason"] == "mfa" and ups[0]["user"] == "alice"
            assert [e["reason"] for e in events if e["event"] == "session.revoked"] == ["reauth"]
            # Every clock reset: the new session's absolute limit runs from the step-up.
            stored = (await h.rt.store.read(h.rt.gate.key_of(new)))[0]
            assert stored.auth_time == h.clock.now and stored.mfa

    run(main())


def test_recovery_codes_work_once_and_wrong_codes_lock_out(tmp_path: Path):
    async def main():
        async with harness(tmp_path, config=MFA_CONFIG) as h:
            _, codes = await enrol(h)
            assert (await h.login(totp=codes[0])).status_code == 303
            assert (await h.login(totp=codes[0])).status_code == 200  # spent
            extra = (await h.rt.store.get_user("alice")).extra
            stored = totp.Factor.from_extra(extra, h.rt.sealer, "alice")
            assert len(stored.recovery) == len(codes) - 1 and codes[0] not in str(extra)
            # max_attempts = 3 in the config: the spent code and two wrong ones, then none is even checked.
            for _ in range(2):
                assert (await h.login(totp="000000")).status_code == 200
            locked = await h.login(totp=codes[1])
            assert locked.status_code == 429 and locked.headers["retry-after"] == "60"
            assert any(e["event"] == "auth.throttled" and e.get("reason") == "totp" for e in await h.events())
            h.clock.now = T0 + 61
            assert (await h.login(totp=codes[1])).status_code == 303

    run(main())


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_concurrent_wrong_codes_cannot_outrun_the_code_throttle(tmp_path: Path, store: str, monkeypatch):
    """A code is counted before it is checked, on every store: of 12 sign-ins at once with the right password
    and a wrong code (12 addresses, so the password throttle lets them all through), exactly max_attempts (3)
    codes are checked (``bad_totp``) and 9 get 429 (``auth.throttled`` reason ``totp``). The password check
    is made instant here so that all 12 reach the code check together, not staggered by argon2's threads."""
    monkeypatch.setattr("lapse.web.app.verify_password", lambda user, password: password == PASSWORD)

    async def main():
        async with harness(tmp_path, config=on_store(store, tmp_path, MFA_CONFIG)) as h:
            await enrol(h)
            rs = await at_once(h, 12, password=PASSWORD, totp="000000", ips=[f"203.0.113.{i}" for i in range(12)])
            statuses = [r.status_code for r in rs]
            assert (statuses.count(200), statuses.count(429)) == (3, 9)
            events = await h.events()
            assert reasons(events, "auth.login") == ["bad_totp"] * 3
            assert reasons(events, "auth.throttled") == ["totp"] * 9

    run(main())


def test_strangers_cannot_lock_a_user_out_and_ipv6_counts_by_its_64(tmp_path: Path):
    """Wrong passwords lock the network they come from (an IPv4 address, an IPv6 /64) at max_attempts (3), and
    the user everywhere only at 10 x max_attempts: three wrong guesses from elsewhere never lock Alice out of
    her own address, a fresh IPv6 address in the same /64 is no fresh counter, and distributed guessing
    still stops at 30 per window."""

    async def main():
        async with harness(tmp_path) as h:
            async def attempt(ip: str, password: str = "wrong password", user: str = "alice") -> int:
                (r,) = await at_once(h, 1, user=user, password=password, ips=[ip])
                return r.status_code

            assert [await attempt(f"203.0.113.{i}") for i in range(3)] == [200] * 3
            # Alice's own address: in, and again (a right password gives its attempt back).
            assert [await attempt("198.51.100.7", PASSWORD) for _ in range(4)] == [303] * 4
            # One /64 is one counter, for every user; the next /64 is not locked.
            assert [await attempt(f"2001:db8:1:2::{i}") for i in range(1, 4)] == [200] * 3
            assert await attempt("2001:db8:1:2:ffff:ffff:ffff:ffff", PASSWORD, user="bob") == 429
            assert await attempt("2001:db8:1:3::1", PASSWORD) == 303
            events = await h.events()
            assert reasons(events, "auth.throttled") == ["ip"]
            assert [e["ip"] for e in events if e["event"] == "auth.throttled"] == ["2001:db8:1:2:ffff:ffff:ffff:ffff"]
            # Distributed guessing: 30 wrong from 30 addresses, then not even the right password, anywhere.
            h.clock.now += 61
            spread = await at_once(h, 30, ips=[f"192.0.2.{i}" for i in range(30)])
            assert [r.status_code for r in spread] == [200] * 30
            assert await attempt("198.51.100.7", PASSWORD) == 429
            assert reasons(await h.events(), "auth.throttled") == ["ip", "user"]
            h.clock.now += 61
            assert await attempt("198.51.100.7", PASSWORD) == 303

    run(main())


@pytest.mark.parametrize(("ip", "counted_as"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:DB8:1:2::", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("not an address", "not an address"),
])
def test_attempts_count_per_ipv4_address_and_per_ipv6_64(ip: str, counted_as: str):
    assert network(ip) == counted_as


def test_concurrent_wrong_current_passwords_cannot_outrun_the_throttle(tmp_path: Path):
    """The password page re-checks the current password under the login throttle, counted before the check:
    of 12 at once on a signed-in session, exactly max_attempts (3) are checked and 9 get 429."""

    async def main():
        async with harness(tmp_path) as h:
            jar = {"cookie": f"__Host-lapse={await h.sid()}"}
            token = _csrf(await h.client.get("/_lapse/password", headers=jar))
            form = {"csrf_token": token, "current": "wrong password", "new": "n3w password!", "confirm": "n3w password!"}
            rs = await asyncio.gather(*(h.client.post("/_lapse/password", data=form, headers=jar) for _ in range(12)))
            statuses = [r.status_code for r in rs]
            assert (statuses.count(200), statuses.count(429)) == (3, 9)
            events = await h.events()
            failed = [e for e in events if e["event"] == "auth.login" and e["outcome"] == "failure"]
            assert [e["resource"] for e in failed] == ["POST /_lapse/password"] * 3
            assert reasons(events, "auth.throttled") == ["ip"] * 9

    run(main())


def test_max_sessions_ends_the_oldest(tmp_path: Path):
    async def main():
        async with harness(tmp_path, config=MFA_CONFIG) as h:
            first = await h.sid(user="bob")
            h.clock.now = T0 + 1
            second = await h.sid(user="bob")
            h.clock.now = T0 + 2
            third = await h.sid(user="bob")
            assert (await h.auth(first)).headers["x-lapse-reason"] == "revoked"
            assert (await h.auth(second)).status_code == (await h.auth(third)).status_code == 200
            revoked = [e for e in await h.events() if e["event"] == "session.revoked"]
            assert [e["reason"] for e in revoked] == ["max_sessions"]
            assert revoked[0]["session"] == h.rt.gate.key_of(first)

    run(main())


def test_the_pre_login_cookie_never_becomes_the_session(tmp_path: Path):
    """Session fixation (OWASP ASVS 5.0 7.2.4): whatever cookie the browser brings, login issues a new ID."""

    async def main():
        async with harness(tmp_path) as h:
            planted = "A" * 43  # shaped like an ID lapse issues, chosen by an attacker
            r = await h.login(cookies={"__Host-lapse": planted})
            issued = _set_cookies(r)["__Host-lapse"]
            assert issued != planted
            assert (await h.auth(planted)).headers["x-lapse-reason"] == "unknown"
            assert (await h.auth(issued)).status_code == 200

    run(main())


def test_a_flood_of_unknown_cookies_from_one_ip_is_throttled_and_audited(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            good = await h.sid()
            for i in range(UNKNOWN_COOKIE_LIMIT + 10):
                r = await h.auth(f"guess{i:040d}", x_forwarded_for="198.51.100.9")
                assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "unknown")
            events = await h.events()
            throttled = [e for e in events if e["event"] == "auth.throttled"]
            assert len(throttled) == 1 and throttled[0]["reason"] == "unknown_cookies"
            assert throttled[0]["ip"] == "198.51.100.9"
            # Once throttled, guesses are not looked up (nor each audited).
            assert names(events).count("session.denied") == UNKNOWN_COOKIE_LIMIT
            assert (await h.auth(good, x_forwarded_for="198.51.100.10")).status_code == 200  # others unaffected
            h.clock.now = T0 + 61  # a login window later the IP is heard again
            assert (await h.auth(good, x_forwarded_for="198.51.100.9")).status_code == 200

    run(main())


# ------------------------------------------------------------- trusted client IP and networks

TRUST = Trust([ipaddress.ip_network(n) for n in ("127.0.0.1/32", "10.0.0.0/8", "::1/128")])
public_v4 = st.ip_addresses(v=4).filter(lambda a: a.is_global).map(str)
addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(st.lists(addresses, max_size=6), public_v4, st.lists(st.sampled_from(["10.1.2.3", "127.0.0.1"]), max_size=3))
def test_client_ip_is_the_rightmost_untrusted_hop(spoofed, client, proxies):
    """Whatever a client writes into X-Forwarded-For, the answer is the hop our trusted proxies saw."""
    header = ", ".join([*spoofed, client, *proxies])
    assert client_ip("127.0.0.1", {"x-forwarded-for": header}, TRUST) == client
    # From an untrusted peer the header means nothing at all.
    assert client_ip(client, {"x-forwarded-for": header, "x-real-ip": "10.0.0.1"}, TRUST) == client


@given(st.text(max_size=60))
def test_garbage_forwarded_headers_never_raise_and_never_invent_an_ip(header):
    got = client_ip("127.0.0.1", {"x-forwarded-for": header}, TRUST)
    assert got == "127.0.0.1" or ipaddress.ip_address(got) is not None


NETS = (
    NetworkSpec("office6", (ipaddress.ip_network("2001:db8::/32"),), 2.0),
    NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.0.0/16")), 2.0),
    NetworkSpec("lab", (ipaddress.ip_network("10.1.0.0/16"),), 3.0),
)
POLICY = compile_policy(PolicySpec(networks=NETS))


@given(addresses)
def test_networks_match_by_cidr_first_match_wins(ip):
    """Network rules by CIDR, IPv4 and IPv6 (IPv4-mapped IPv6 as IPv4), the first listed match wins."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    expected = next((n.name for n in NETS if any(addr.version == c.version and addr in c for c in n.cidrs)), None)
    assert POLICY.resolve("any.test", "/", "GET", ip).limits.network == expected


# ------------------------------------------------------------------ account pages


def _csrf(page) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def test_password_change_offers_to_end_every_other_session(tmp_path: Path):
    """ASVS 5.0 7.4.3: after a password change the user can end all other sessions (ticked by default);
    the current password is required, and the session in use goes on under a new ID."""

    async def main():
        async with harness(tmp_path) as h:
            other = await h.sid()
            sid = await h.sid()
            jar = {"cookie": f"__Host-lapse={sid}"}
            assert (await h.client.get("/_lapse/password")).status_code == 303  # signed out: sign in first
            page = await h.client.get("/_lapse/password", headers=jar)
            assert page.status_code == 200 and 'name="end_others" value="1" checked' in page.text
            form = {"csrf_token": _csrf(page), "current": "wrong password", "new": "n3w password!",
                    "confirm": "n3w password!", "end_others": "1"}
            assert (await h.client.post("/_lapse/password", data={**form, "csrf_token": "x"}, headers=jar)).status_code == 403
            r = await h.client.post("/_lapse/password", data=form, headers=jar)
            assert "not right" in r.text
            r = await h.client.post("/_lapse/password", data={**form, "current": PASSWORD}, headers=jar)
            assert r.status_code == 200 and "1 other" in r.text, r.text
            assert (await h.auth(other)).headers["x-lapse-reason"] == "revoked"
            assert (await h.auth(_set_cookies(r)["__Host-lapse"])).status_code == 200
            assert (await h.login()).status_code == 200  # the old password is gone
            assert (await h.login(password="n3w password!")).status_code == 303
            events = await h.events()
            assert [e.get("reason") for e in events if e["event"] == "session.revoked"] == ["password_changed", "reauth"]
            assert "user.password_changed" in names(events)

    run(main())


def test_totp_enrolment_from_the_web_needs_the_password_and_a_working_code(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            jar = {"cookie": f"__Host-lapse={sid}"}
            page = await h.client.get("/_lapse/totp", headers=jar)
            token = _csrf(page)
            wrong = await h.client.post("/_lapse/totp", data={"csrf_token": token, "step": "password",
                                                               "current": "nope nope"}, headers=jar)
            assert "not right" in wrong.text and "<svg" not in wrong.text
            shown = await h.client.post("/_lapse/totp", data={"csrf_token": token, "step": "password",
                                                               "current": PASSWORD}, headers=jar)
            assert "<svg" in shown.text
            secret = re.search(r'name="secret" value="([A-Z2-7]+)"', shown.text).group(1)
            seal = html.unescape(re.search(r'name="seal" value="([^"]+)"', shown.text).group(1))
            confirm = {"csrf_token": token, "step": "confirm", "secret": secret, "seal": seal,
                "issued": re.search(r'name="issued" value="(\d+)"', shown.text).group(1)}
            # A secret swapped in the form is refused; a wrong code keeps nothing.
            forged = {**confirm, "secret": totp.new_secret(), "code": totp.code_at(secret, T0)}
            assert (await h.client.post("/_lapse/totp", data=forged, headers=jar)).status_code == 403
            bad = await h.client.post("/_lapse/totp", data={**confirm, "code": "000000"}, headers=jar)
            assert "did not match" in bad.text
            assert not totp.enrolled((await h.rt.store.get_user("alice")).extra)
            done = await h.client.post("/_lapse/totp", data={**confirm, "code": totp.code_at(secret, T0)},
                                       headers=jar)
            codes = re.findall(r"<code>([a-z0-9]{5}-[a-z0-9]{5})</code>", done.text)
            assert len(codes) == totp.RECOVERY_CODES
            # From now on the password alone is not enough; the code used to confirm cannot be reused.
            assert (await h.login()).status_code == 200
            assert (await h.login(totp=totp.code_at(secret, T0))).status_code == 200
            h.clock.now = T0 + 30
            assert (await h.login(totp=totp.code_at(secret, h.clock.now))).status_code == 303
            assert (await h.login(totp=codes[0])).status_code == 303

    run(main())


def _setup_form(shown: Any, token: str) -> dict[str, str]:
    """The confirm step's fields from a shown set-up form."""
    field = {k: html.unescape(re.search(rf'name="{k}" value="([^"]+)"', shown.text).group(1))  # type: ignore[union-attr]
             for k in ("secret", "seal", "issued")}
    return {"csrf_token": token, "step": "confirm", **field}


def test_a_set_up_form_is_good_for_ten_minutes_and_only_for_the_factor_it_replaces(tmp_path: Path):
    """Review finding (OIDC/step-up, 5): a set-up form someone kept (its secret and seal) cannot set a factor
    later: not after ten minutes, and not once the factor it would replace has changed."""

    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            jar = {"cookie": f"__Host-lapse={sid}"}
            token = _csrf(await h.client.get("/_lapse/totp", headers=jar))
            ask = {"csrf_token": token, "step": "password", "current": PASSWORD}
            kept = _setup_form(await h.client.post("/_lapse/totp", data=ask, headers=jar), token)
            # The factor changes meanwhile (set up from another session): the kept form no longer applies.
            other = await h.sid()
            jar2 = {"cookie": f"__Host-lapse={other}"}
            token2 = _csrf(await h.client.get("/_lapse/totp", headers=jar2))
            mine = _setup_form(await h.client.post("/_lapse/totp", data={**ask, "csrf_token": token2}, headers=jar2),
                               token2)
            done = await h.client.post("/_lapse/totp", data={**mine, "code": totp.code_at(mine["secret"], T0)},
                                       headers=jar2)
            assert done.status_code == 200 and "One-time codes are on" in done.text
            stale = await h.client.post("/_lapse/totp", data={**kept, "code": totp.code_at(kept["secret"], T0)},
                                        headers=jar)
            assert stale.status_code == 403 and "changed" in stale.text
            factor = totp.Factor.from_extra((await h.rt.store.get_user("alice")).extra, h.rt.sealer, "alice")
            assert factor.secret == mine["secret"]
            # Eleven minutes after it was shown, a form is refused (the session kept alive meanwhile).
            h.clock.now = T0 + 30
            fresh = await h.sid(totp=totp.code_at(mine["secret"], h.clock.now))
            jar3 = {"cookie": f"__Host-lapse={fresh}"}
            token3 = _csrf(await h.client.get("/_lapse/totp", headers=jar3))
            h.clock.now = T0 + 60
            ask3 = {"csrf_token": token3, "step": "password", "current": PASSWORD,
                    "code": totp.code_at(mine["secret"], h.clock.now)}
            late = _setup_form(await h.client.post("/_lapse/totp", data=ask3, headers=jar3), token3)
            for minutes in (5, 10):
                h.clock.now = T0 + 60 + minutes * 60
                assert (await h.auth(fresh)).status_code == 200
            h.clock.now = T0 + 60 + 11 * 60
            r = await h.client.post("/_lapse/totp", data={**late, "code": totp.code_at(late["secret"], h.clock.now)},
                                    headers=jar3)
            assert r.status_code == 403 and "too old" in r.text

    run(main())


# ------------------------------------------- security review of 2026-11-27 (findings M3, M5, L1, L2, L6, H3)


def test_replacing_one_time_codes_takes_a_current_code(tmp_path: Path):
    """M5: a stolen session plus a phished password is not enough to swap the second factor."""

    async def main():
        async with harness(tmp_path) as h:
            secret, codes = await enrol(h)
            sid = await h.sid(totp=totp.code_at(secret, T0))
            jar = {"cookie": f"__Host-lapse={sid}"}
            page = await h.client.get("/_lapse/totp", headers=jar)
            assert 'name="code"' in page.text
            form = {"csrf_token": _csrf(page), "step": "password", "current": PASSWORD}
            refused = await h.client.post("/_lapse/totp", data={**form, "code": "000000"}, headers=jar)
            assert "<svg" not in refused.text and "current code" in refused.text
            assert "<svg" in (await h.client.post("/_lapse/totp", data={**form, "code": codes[0]}, headers=jar)).text
            again = await h.client.post("/_lapse/totp", data={**form, "code": codes[0]}, headers=jar)
            assert "<svg" not in again.text  # that recovery code is spent

    run(main())


def test_non_ascii_digits_are_a_wrong_code_not_an_error(tmp_path: Path):
    """L1: Arabic-Indic digits pass str.isdigit() but are no code."""

    async def main():
        async with harness(tmp_path) as h:
            await enrol(h)
            r = await h.login(totp="١٢٣٤٥٦")
            assert r.status_code == 200 and "not valid" in r.text

    run(main())


def test_a_code_claimed_by_another_replica_is_refused(tmp_path: Path):
    """L2: two replicas checking one code at the same instant: the store's claim lets only one through."""

    async def main():
        async with harness(tmp_path) as h:
            secret, _ = await enrol(h)
            step = int(T0) // totp.STEP
            assert await h.rt.store.first_use(f"totp:alice:step:{step}", T0 + 60)  # the other replica won
            r = await h.login(totp=totp.code_at(secret, T0))
            assert r.status_code == 200 and "not valid" in r.text

    run(main())


def test_no_page_can_be_framed(tmp_path: Path):
    """L6: sign-in and account pages refuse to be framed (clickjacking)."""

    async def main():
        async with harness(tmp_path) as h:
            page = await h.client.get("/_lapse/login")
            assert page.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    run(main())


def test_a_flooding_ip_keeps_valid_sessions(tmp_path: Path):
    """M3: throttling a flood of unknown cookies never locks out (or clears) a valid session from that IP."""

    async def main():
        async with harness(tmp_path) as h:
            good = await h.sid()
            for i in range(UNKNOWN_COOKIE_LIMIT + 5):
                await h.auth(f"guess{i:040d}", x_forwarded_for="198.51.100.9")
            r = await h.auth(good, x_forwarded_for="198.51.100.9")
            assert r.status_code == 200 and "set-cookie" not in r.headers

    run(main())


def test_account_pages_are_not_for_single_sign_on_sessions(tmp_path: Path):
    """H3 (rest): an IdP session named like a local user cannot reach that user's password or codes."""
    from lapse.store.base import SsoLink

    async def main():
        async with harness(tmp_path) as h:
            sid, _ = await h.rt.gate.sign_in("alice", host="app.test")  # as an IdP sign-in would, same name
            key = h.rt.gate.key_of(sid)
            await h.rt.store.put_link(SsoLink(key, "https://idp.test", "alice", None, None, None, False, T0, T0 + 3600))
            for page in ("/_lapse/password", "/_lapse/totp"):
                r = await h.client.get(page, headers={"cookie": f"__Host-lapse={sid}"})
                assert r.status_code == 403 and "sign-in provider" in r.text
            login = await h.client.get("/_lapse/login?reason=step_up", headers={"cookie": f"__Host-lapse={sid}"})
            assert 'value="alice"' not in login.text

    run(main())


def test_totp_seeds_are_sealed_at_rest_and_one_that_does_not_open_refuses_without_an_error(tmp_path: Path, caplog):
    """A copy of the store must not hand out second factors: the seed is stored sealed (AES-GCM, bound to
    its user). A seed that does not open (the secret file replaced, the value altered or moved to another
    user) makes every code wrong, is said in the log with the way out, and is never a 500."""

    async def main():
        async with harness(tmp_path, config=MFA_CONFIG) as h:
            secret, _ = await enrol(h)
            store_text = str((await h.rt.store.get_user("alice")).extra)
            assert secret not in store_text and "sealed:v1:" in store_text
            assert (await h.login(totp=totp.code_at(secret, T0))).status_code == 303
            h.clock.now = T0 + totp.STEP
            # Alice's sealed seed moved to bob: bound to alice, it does not open for him.
            alice, bob = await h.rt.store.get_user("alice"), await h.rt.store.get_user("bob")
            await h.rt.store.put_user(replace(bob, extra={**bob.extra, "totp": alice.extra["totp"]}))
            refused = await h.login(user="bob", totp=totp.code_at(secret, h.clock.now))
            assert refused.status_code == 200 and "not valid" in refused.text
            assert "lapse users totp bob --reset" in caplog.text

    run(main())
