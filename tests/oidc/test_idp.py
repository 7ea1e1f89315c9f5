"""lapse against a real OpenID provider (npm ``oidc-provider``): sign-in, ceilings, logout both ways.

Requirement IDs: ../shared/research/standards-checklist.md (BCL = Back-Channel
Logout 1.0, RPIL = RP-Initiated Logout 1.0, Core = OpenID Connect Core 1.0).
"""

from __future__ import annotations

import time
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import httpx

from lapse.core.session import session_key

from .conftest import Browser


def key(lapse, sid: str) -> str:
    return session_key(lapse.rt.secrets.session_hash_key, sid)


def wait_for(check, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_sign_in_through_the_idp_gives_a_session_with_the_idps_user_groups_and_auth_time(make_lapse, browser_for):
    lapse = make_lapse()
    b: Browser = browser_for(lapse)
    r = b.get("/_lapse/oidc/login", params={"next": "/reports?q=1"})
    assert r.status_code == 303
    auth = parse_qs(urlsplit(r.headers["location"]).query)
    assert auth["code_challenge_method"] == ["S256"] and len(auth["code_challenge"][0]) == 43
    assert auth["state"][0] and auth["nonce"][0] and auth["state"] != auth["nonce"]
    flow_cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("__Host-lapse-oidc="))
    assert "HttpOnly" in flow_cookie and "Secure" in flow_cookie and "Max-Age=600" in flow_cookie

    back = b.at_idp_until_back(r.headers["location"])
    r = b.get(back)
    assert r.status_code == 303 and r.headers["location"] == "/reports?q=1"
    assert r.headers["cache-control"] == "no-store"
    assert b.sid and len(b.sid) >= 22 and b.cookies["__Host-lapse-oidc"] == ""  # flow cookie cleared

    ok = lapse.auth(b.sid, host="billing.test")
    assert ok.status_code == 200
    assert ok.headers["remote-user"] == "alice"  # preferred_username
    assert ok.headers["remote-groups"] == "finance,lapse-admins"
    session, _ = lapse.call(lapse.rt.store.read(key(lapse, b.sid)))
    link = lapse.call(lapse.rt.store.get_link(session.key))
    assert link.subject == "alice" and link.sid and link.admin and link.id_token
    assert session.auth_time <= session.created_at  # the IdP's auth_time, not lapse's clock
    logins = lapse.events("auth.login")
    assert logins[-1]["outcome"] == "success" and logins[-1]["session"] == session.key
    # No token and no raw session ID reaches the audit log.
    text = str(lapse.events())
    assert b.sid not in text and link.id_token not in text


def test_groups_drive_allow_rules(make_lapse, browser_for):
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in(user="bob")
    assert lapse.auth(b.sid, host="wiki.test").status_code == 200
    refused = lapse.auth(b.sid, host="billing.test")
    assert refused.status_code == 403 and refused.headers["x-lapse-reason"] == "forbidden"


def test_a_callback_without_our_state_or_flow_cookie_is_refused(make_lapse, browser_for):
    """CSRF: state bound to the browser's own short-lived cookie."""
    lapse = make_lapse()
    b = browser_for(lapse)
    r = b.get("/_lapse/oidc/login", params={"next": "/"})
    back = b.at_idp_until_back(r.headers["location"])
    stranger = browser_for(lapse)
    assert stranger.get(back).status_code == 400  # someone else's callback URL: no flow cookie
    forged = back.replace("state=", "state=x")
    assert b.get(forged).status_code == 400
    reasons = [e["reason"] for e in lapse.events("auth.login") if e["outcome"] == "failure"]
    assert reasons == ["no_login_in_progress", "bad_state"]
    assert b.sid is None


def test_next_stays_on_this_site(make_lapse, browser_for):
    lapse = make_lapse()
    b = browser_for(lapse)
    for evil in ("https://evil.test/", "//evil.test", "/\\evil.test"):
        b.cookies.clear()
        assert b.sign_in(next_=evil).headers["location"] == "/"


def test_signing_in_again_ends_the_old_session_with_reauth_and_keeps_the_idps_auth_time(make_lapse, browser_for):
    """CONTRACT §3: the absolute clock runs from the IdP's auth_time; a silent SSO re-login does not move it."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    first = b.sid
    s1, _ = lapse.call(lapse.rt.store.read(key(lapse, first)))
    time.sleep(1.1)
    b.sign_in()  # the IdP remembers alice: no password asked, the same auth_time comes back
    assert b.sid != first
    s2, _ = lapse.call(lapse.rt.store.read(key(lapse, b.sid)))
    assert s2.auth_time == s1.auth_time and s2.created_at > s1.created_at
    old, _ = lapse.call(lapse.rt.store.read(key(lapse, first)))
    assert old.end_reason == "reauth"
    assert lapse.auth(first).status_code == 401


def test_the_org_ceiling_and_each_apps_absolute_run_from_the_idps_auth_time(make_lapse, browser_for):
    """One sign-in serves every app, each by its own limits; the org ceiling (2h) caps them all."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    assert lapse.auth(b.sid, host="billing.test").status_code == 200
    for _ in range(3):  # an hour of work in the wiki (idle 30m): the session stays alive
        lapse.clock.advance(20 * 60)
        assert lapse.auth(b.sid, host="wiki.test").status_code == 200
    lapse.clock.advance(5)  # past billing's 1h absolute, counted from the IdP's auth_time
    r = lapse.auth(b.sid, host="billing.test")
    assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")
    assert lapse.auth(b.sid, host="wiki.test").status_code == 200  # the wiki allows 8h ...
    for _ in range(2):
        lapse.clock.advance(20 * 60)
        assert lapse.auth(b.sid, host="wiki.test").status_code == 200
    lapse.clock.advance(20 * 60)  # ... but the org ceiling is 2h after the IdP's auth_time
    r = lapse.auth(b.sid, host="wiki.test")
    assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")


def test_logout_at_the_idp_reaches_lapse_over_the_back_channel_and_ends_the_session(make_lapse, browser_for, idp):
    """[BCL 2.5-2.8 / checklist 87-91] the IdP POSTs a logout token; lapse revokes by sid; later requests 401."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    other = browser_for(lapse)  # another browser of alice: another IdP session (another sid)
    other.sign_in()
    assert lapse.auth(b.sid).status_code == 200
    b.logout_at_idp()
    assert wait_for(lambda: lapse.auth(b.sid).status_code == 401)
    r = lapse.auth(b.sid)
    assert r.headers["x-lapse-reason"] == "revoked"
    assert lapse.auth(other.sid).status_code == 200  # sid-scoped: the other IdP session's lapse session lives
    revoked = lapse.events("session.revoked")
    assert [e["reason"] for e in revoked if e["session"] == key(lapse, b.sid)] == ["backchannel"]
    assert any("backchannel ok rp1" in line for line in idp.lines())


def test_rp_initiated_logout_ends_the_session_then_goes_to_the_idp(make_lapse, browser_for, idp):
    """[RPIL 2 / checklist 95] id_token_hint and post_logout_redirect_uri; the IdP then logs out and comes back."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    sid = b.sid
    csrf = b.get("/_lapse/session").json()["csrf_token"]
    r = b.post("/_lapse/logout", data={"csrf_token": csrf})
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    query = parse_qs(target.query)
    assert f"{target.scheme}://{target.netloc}{target.path}" == idp.url + "/session/end"
    assert query["post_logout_redirect_uri"] == [lapse.url + "/_lapse/oidc/signed-out"]
    link = lapse.call(lapse.rt.store.get_link(key(lapse, sid)))
    assert link.id_token.startswith("sealed:v1:")  # at rest, sealed to the session; the IdP gets it opened
    assert query["id_token_hint"] == [lapse.rt.sealer.open(link.id_token, f"oidc:{link.session}")]
    assert lapse.auth(sid).status_code == 401  # ended before the browser even reaches the IdP
    back = b.at_idp_until_back(r.headers["location"])
    assert back.startswith(lapse.url + "/_lapse/oidc/signed-out")
    assert b.get(back).status_code == 200
    # The IdP session is gone too: a new sign-in asks for the password again.
    r = b.get("/_lapse/oidc/login", params={"next": "/"})
    page = b.at_idp.get(r.headers["location"], follow_redirects=True)
    assert 'name="password"' in page.text
    reasons = [e["reason"] for e in lapse.events("session.revoked") if e["session"] == key(lapse, sid)]
    assert reasons == ["logout"]  # exactly one end event, although the back-channel call came too


def test_backchannel_endpoint_refuses_junk_with_400_and_no_store(make_lapse):
    """[BCL 2.8 / checklist 87, 91] 400 for a missing or invalid token, Cache-Control no-store always."""
    lapse = make_lapse()
    url = lapse.url + "/_lapse/oidc/backchannel-logout"
    for r in (httpx.post(url, data={}), httpx.post(url, data={"logout_token": "a.b.c"}),
              httpx.post(url, json={"logout_token": "x"})):
        assert r.status_code == 400 and r.headers["cache-control"] == "no-store"
        assert r.json()["error"] in ("invalid_request",)
    assert httpx.get(url).status_code == 405
    assert [e["outcome"] for e in lapse.events("auth.backchannel_logout")] == ["failure"] * 3


def test_step_up_asks_the_idp_with_max_age_and_prompt_login(make_lapse, browser_for):
    """[Core 3.1.2.1 / checklist 73-74] a privileged route sends max_age; reason=step_up forces prompt=login;
    the new auth_time is checked and becomes the session's."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    before, _ = lapse.call(lapse.rt.store.read(key(lapse, b.sid)))
    r = b.get("/_lapse/oidc/login", params={"next": "/admin/x"}, headers={"host": "billing.test"})
    assert parse_qs(urlsplit(r.headers["location"]).query)["max_age"] == ["300"]  # /admin: 5m
    time.sleep(3.2)  # past /vault's 3-second max_auth_age (the IdP keeps real time)
    r = lapse.auth(b.sid, host="billing.test", uri="/vault/x")
    assert r.headers["x-lapse-reason"] == "step_up"
    r = b.get("/_lapse/oidc/login", params={"next": "/vault/x", "reason": "step_up"},
              headers={"host": "billing.test"})
    query = parse_qs(urlsplit(r.headers["location"]).query)
    assert query["max_age"] == ["3"] and query["prompt"] == ["login"]
    page = b.at_idp.get(r.headers["location"], follow_redirects=True)
    assert 'name="password"' in page.text  # the IdP asks again although its session lives
    back = b.at_idp_until_back(r.headers["location"])
    assert b.get(back, headers={"host": "billing.test"}).status_code == 303
    after, _ = lapse.call(lapse.rt.store.read(key(lapse, b.sid)))
    assert after.auth_time > before.auth_time
    assert lapse.auth(b.sid, host="billing.test", uri="/vault/x").status_code == 200


def test_revalidate_every_ends_the_session_once_the_idp_session_is_gone(make_lapse, browser_for):
    """rp2 has no back-channel logout: revalidate_every (a refresh grant) notices the IdP logout."""
    lapse = make_lapse(client="rp2", revalidate="1m")
    b = browser_for(lapse)
    b.sign_in()
    k = key(lapse, b.sid)
    first = lapse.call(lapse.rt.store.get_link(k))
    assert first.refresh_token and first.refresh_token.startswith("sealed:v1:")
    lapse.clock.advance(61)
    assert lapse.call(lapse.gateway.oidc.revalidate_once()) == 0  # the IdP still vouches: refresh rotated
    second = lapse.call(lapse.rt.store.get_link(k))
    assert second.checked_at > first.checked_at and second.refresh_token.startswith("sealed:v1:")
    b.logout_at_idp()
    assert lapse.auth(b.sid).status_code == 200  # no back-channel call for rp2: lapse cannot know yet
    lapse.clock.advance(61)
    assert lapse.call(lapse.gateway.oidc.revalidate_once()) == 1
    r = lapse.auth(b.sid)
    assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "revoked")
    assert [e["reason"] for e in lapse.events("session.revoked")] == ["idp_revalidation"]


def test_a_refresh_token_that_does_not_open_ends_the_session(make_lapse, browser_for):
    """Tokens are sealed to their session: one copied from another session's link (or sealed under
    another secret file) cannot be used, so revalidation cannot vouch and the session ends (fail closed)."""
    lapse = make_lapse(client="rp2", revalidate="1m")
    b = browser_for(lapse)
    b.sign_in()
    k = key(lapse, b.sid)
    link = lapse.call(lapse.rt.store.get_link(k))
    moved = lapse.rt.sealer.seal(lapse.rt.sealer.open(link.refresh_token, f"oidc:{k}"), "oidc:another-session")
    lapse.call(lapse.rt.store.put_link(replace(link, refresh_token=moved)))
    lapse.clock.advance(61)
    assert lapse.call(lapse.gateway.oidc.revalidate_once()) == 1
    assert [e["reason"] for e in lapse.events("session.revoked")] == ["idp_revalidation"]
