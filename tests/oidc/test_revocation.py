"""Refresh tokens of ended sessions are revoked at the real IdP (RFC 7009; checklist 99, ASVS 5.0 10.4).

Each test ends a session one way (sign-out without following the IdP's logout,
an administrator, the sweeper) and then presents that session's refresh token at
the IdP's token endpoint, as a thief holding a copy of the store would: the IdP
must answer ``invalid_grant``, while a session that still lives keeps a token
the IdP honours. Nothing here follows the browser to the IdP's end-session
endpoint, whose logout would revoke the grant by itself.
"""

from __future__ import annotations

import re

import httpx

from .conftest import SECRET, Browser, Idp, Lapse
from .test_idp import key


def refresh_token(lapse: Lapse, sid: str) -> str:
    """The refresh token the IdP issued to this session (opened from its sealed link)."""
    link = lapse.call(lapse.rt.store.get_link(key(lapse, sid)))
    return lapse.rt.sealer.open(link.refresh_token, f"oidc:{link.session}")


def refresh_at_idp(idp: Idp, client: str, token: str) -> httpx.Response:
    """A refresh grant straight at the IdP's token endpoint, with the client's credentials."""
    endpoint = httpx.get(idp.url + "/.well-known/openid-configuration").json()["token_endpoint"]
    return httpx.post(endpoint, data={"grant_type": "refresh_token", "refresh_token": token},
                      auth=(client, SECRET))


def drain(lapse: Lapse) -> None:
    """Wait for the revocations queued by the ends so far (what shutdown does)."""
    lapse.call(lapse.gateway.oidc.revoker.drain())


def refused(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("error", "")


def test_sign_out_revokes_the_refresh_token_at_the_idp_and_only_that_one(make_lapse, browser_for, idp):
    lapse = make_lapse()
    b: Browser = browser_for(lapse)
    b.sign_in()
    other: Browser = browser_for(lapse)
    other.sign_in()
    ended = key(lapse, b.sid)
    gone, kept = refresh_token(lapse, b.sid), refresh_token(lapse, other.sid)
    assert "revocation_endpoint" in httpx.get(idp.url + "/.well-known/openid-configuration").json()
    csrf = b.get("/_lapse/session").json()["csrf_token"]
    r = b.post("/_lapse/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"].startswith(idp.url + "/session/end")  # not followed
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp1", gone)) == (400, "invalid_grant")
    assert refresh_at_idp(idp, "rp1", kept).status_code == 200  # the other session's grant lives
    link = lapse.call(lapse.rt.store.get_link(ended))
    assert link.refresh_token is None  # dropped from the store
    assert link.id_token is not None  # still the id_token_hint of a sign-out after expiry
    assert [e["reason"] for e in lapse.events("session.revoked")] == ["logout"]


def test_an_admin_revocation_revokes_the_refresh_token_and_adds_no_audit_event(make_lapse, browser_for, idp):
    lapse = make_lapse()
    admin: Browser = browser_for(lapse)
    admin.sign_in(user="alice")  # in lapse-admins
    bob: Browser = browser_for(lapse)
    bob.sign_in(user="bob")
    token, bobs = refresh_token(lapse, bob.sid), key(lapse, bob.sid)
    page = admin.get("/_lapse/admin", headers={"accept": "text/html"})
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = admin.post("/_lapse/admin/revoke", data={"user": "bob", "csrf_token": csrf}, headers={"accept": "text/html"})
    assert r.status_code == 303
    events = lapse.events()
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp1", token)) == (400, "invalid_grant")
    assert lapse.events() == events  # revoking at the IdP is no session event of its own
    assert [(e["reason"], e["session"]) for e in lapse.events("session.revoked")] == [("admin", bobs)]


def test_an_expiry_by_the_sweeper_revokes_the_refresh_token(make_lapse, browser_for, idp):
    lapse = make_lapse(client="rp2")
    b: Browser = browser_for(lapse)
    b.sign_in()
    token = refresh_token(lapse, b.sid)
    lapse.clock.advance(31 * 60)  # past the 30m idle (lapse's clock; the IdP's grant is days long)
    assert lapse.call(lapse.gateway.gate.sweep_once()) == 1
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp2", token)) == (400, "invalid_grant")
    assert [e["reason"] for e in lapse.events("session.expired")] == ["idle"]
