"""Signing out of a session that had already expired still signs the user out of the IdP (OIDC RP-Initiated
Logout 1.0; OWASP WSTG-SESS-06): at a shared machine, the next person must not be signed in silently."""

from __future__ import annotations

from urllib.parse import urlsplit


def test_sign_out_after_the_idle_limit_still_goes_to_the_idp(make_lapse, browser_for, idp):
    """[checklist 95] The stale page's token still proves the request; the IdP session ends; a new sign-in
    asks for the password."""
    lapse = make_lapse()
    b = browser_for(lapse)
    b.sign_in()
    csrf = b.get("/_lapse/session").json()["csrf_token"]
    lapse.clock.advance(31 * 60)  # past idle = "30m"
    assert lapse.auth(b.sid).status_code == 401
    r = b.post("/_lapse/logout", data={"csrf_token": csrf})
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == idp.url + "/session/end"
    back = b.at_idp_until_back(r.headers["location"])
    assert back.startswith(lapse.url + "/_lapse/oidc/signed-out")
    r = b.get("/_lapse/oidc/login", params={"next": "/"})
    page = b.at_idp.get(r.headers["location"], follow_redirects=True)
    assert 'name="password"' in page.text
