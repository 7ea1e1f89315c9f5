"""``/_lapse/admin`` and ``/_lapse/sessions`` (CONTRACT.md §4, issue 8) over real HTTP semantics.

Requirement IDs: ASVS 5.0 7.4.5 (administrators can end a user's sessions, the
audit names the administrator), ASVS 5.0 7.5.2 (users see their active sessions
and can end any of them), CSRF on every action.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from lapse.core import events as ev
from lapse.identity import hash_password
from lapse.store.base import User

from .test_gateway import PASSWORD, harness

run = asyncio.run


def _token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _cookie(sid: str) -> dict[str, str]:
    return {"cookie": f"__Host-lapse={sid}", "accept": "text/html"}


async def _admin(h) -> str:
    await h.rt.store.put_user(User("root", hash_password(PASSWORD), admin=True))
    return await h.sid(user="root")


def test_admin_page_is_for_admins_only_and_login_first(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            r = await h.client.get("/_lapse/admin", headers={"accept": "text/html"})
            assert r.status_code == 303 and r.headers["location"].startswith("/_lapse/login?next=/_lapse/admin")
            alice = await h.sid(user="alice")
            assert (await h.client.get("/_lapse/admin", headers=_cookie(alice))).status_code == 403
            assert (await h.client.get("/_lapse/admin/report.png", headers=_cookie(alice))).status_code == 403
            root = await _admin(h)
            page = await h.client.get("/_lapse/admin", headers=_cookie(root))
            assert page.status_code == 200
            assert "alice" in page.text and "data-deadline" in page.text
            csp = page.headers["content-security-policy"]
            assert "script-src 'nonce-" in csp and "unsafe-inline" not in csp
            nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
            assert f'<script nonce="{nonce}">' in page.text and page.headers["cache-control"] == "no-store"
            h.clock.now += 11 * 60  # past the admin's own 10m idle limit: the admin page is judged like any page
            r = await h.client.get("/_lapse/admin", headers=_cookie(root))
            assert r.status_code == 303 and "reason=idle" in r.headers["location"]

    run(main())


def test_admin_revokes_one_session_or_all_of_a_user_with_csrf(tmp_path: Path):
    """ASVS 5.0 7.4.5."""
    async def main():
        async with harness(tmp_path) as h:
            a1, a2, bob = await h.sid(user="alice"), await h.sid(user="alice"), await h.sid(user="bob")
            root = await _admin(h)
            page = await h.client.get("/_lapse/admin?user=alice", headers=_cookie(root))
            assert page.text.count('name="handle"') == 2 and "bob" not in page.text.split("Audit report")[0]
            token = _token(page.text)
            key1 = h.rt.gate.key_of(a1)
            refused = await h.client.post("/_lapse/admin/revoke", data={"handle": key1, "csrf_token": "x"},
                                          headers=_cookie(root))
            assert refused.status_code == 403 and (await h.auth(a1)).status_code == 200
            r = await h.client.post("/_lapse/admin/revoke", data={"handle": key1, "csrf_token": token},
                                    headers=_cookie(root))
            assert r.status_code == 303 and r.headers["location"] == "/_lapse/admin?ended=1"
            assert (await h.auth(a1)).headers["x-lapse-reason"] == "revoked"
            assert (await h.auth(a2)).status_code == 200
            r = await h.client.post("/_lapse/admin/revoke", data={"user": "alice", "csrf_token": token},
                                    headers=_cookie(root))
            assert r.headers["location"] == "/_lapse/admin?ended=1"
            assert (await h.auth(a2)).status_code == 401 and (await h.auth(bob)).status_code == 200
            events = await h.events()
            revoked = [e for e in events if e["event"] == ev.REVOKED]
            assert [e["reason"] for e in revoked] == ["admin", "admin"] and {e["user"] for e in revoked} == {"alice"}
            who = [e for e in events if e["event"] == "admin.revoke"]
            assert [(e["user"], e["reason"]) for e in who] == [("root", "alice"), ("root", "alice")]
            search = await h.client.get("/_lapse/admin?a_event=session.revoked&a_user=alice", headers=_cookie(root))
            table = search.text.split('id="audit-h"')[1]
            assert table.count("<td>session.revoked</td>") == 2 and "session.created" not in table

    run(main())


def test_self_service_lists_own_sessions_and_ends_the_others(tmp_path: Path):
    """ASVS 5.0 7.5.2: a user sees their active sessions and can end any of them."""
    async def main():
        async with harness(tmp_path) as h:
            r = await h.client.get("/_lapse/sessions", headers={"accept": "text/html"})
            assert r.status_code == 303 and "next=/_lapse/sessions" in r.headers["location"]
            here, other1, other2 = await h.sid(), await h.sid(), await h.sid()
            bob = await h.sid(user="bob")
            page = await h.client.get("/_lapse/sessions", headers=_cookie(here))
            assert page.status_code == 200 and "(this browser)" in page.text
            handles = re.findall(r'name="handle" value="([0-9a-f]{12})"', page.text)
            assert len(handles) == 2 and h.rt.gate.key_of(here)[:12] not in handles  # never the current one here
            assert h.rt.gate.key_of(bob)[:12] not in page.text
            token = _token(page.text)
            bad = await h.client.post("/_lapse/sessions/end", data={"handle": handles[0]}, headers=_cookie(here))
            assert bad.status_code == 403
            theirs = await h.client.post("/_lapse/sessions/end",
                                         data={"handle": h.rt.gate.key_of(bob)[:12], "csrf_token": token},
                                         headers=_cookie(here))
            assert theirs.status_code == 404 and (await h.auth(bob)).status_code == 200  # not yours: untouched
            r = await h.client.post("/_lapse/sessions/end", data={"handle": handles[0], "csrf_token": token},
                                    headers=_cookie(here))
            assert r.status_code == 303 and r.headers["location"] == "/_lapse/sessions?ended=1"
            r = await h.client.post("/_lapse/sessions/end", data={"handle": "others", "csrf_token": token},
                                    headers=_cookie(here))
            assert r.headers["location"] == "/_lapse/sessions?ended=1"
            assert [(await h.auth(s)).status_code for s in (here, other1, other2)] == [200, 401, 401]
            done = await h.client.get("/_lapse/sessions?ended=2", headers=_cookie(here))
            assert "Ended 2 sessions." in done.text
            reasons = [e["reason"] for e in await h.events() if e["event"] == ev.REVOKED]
            assert reasons == ["logout", "logout"]

    run(main())


FIREFOX_ANDROID = "Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0"


def test_sessions_show_the_device_signed_in_from_never_the_header(tmp_path: Path):
    """ASVS 5.0 7.5.2 names the device: a label from the User-Agent at sign-in, on both pages."""
    async def main():
        async with harness(tmp_path) as h:
            h.client.headers["user-agent"] = FIREFOX_ANDROID
            phone = await h.sid()
            h.client.headers["user-agent"] = "curl/8.5.0"
            here = await h.sid()
            assert (await h.rt.store.read(h.rt.gate.key_of(phone)))[0].device == "Firefox on Android"
            page = await h.client.get("/_lapse/sessions", headers=_cookie(here))
            assert page.status_code == 200
            assert re.search(r"<td>curl</td>", page.text) and "<td>Firefox on Android</td>" in page.text
            assert "Gecko" not in page.text and "rv:125" not in page.text
            admin = await h.client.get("/_lapse/admin", headers=_cookie(await _admin(h)))
            assert admin.status_code == 200 and "<td>Firefox on Android</td>" in admin.text

    run(main())


def test_admin_charts_png(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            root = await _admin(h)
            r = await h.client.get("/_lapse/admin/report.png", headers=_cookie(root))
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content[:4] == b"\x89PNG"

    run(main())


def test_oidc_admins_come_from_admin_groups(tmp_path: Path):
    """An OIDC sign-in has no local user: its link says whether its groups met ``[oidc] admin_groups``."""
    from lapse.store.base import SsoLink

    async def main():
        async with harness(tmp_path) as h:
            pages = {}
            for name, admin in (("idp-admin", True), ("idp-user", False)):
                sid, _ = await h.rt.gate.sign_in(name, host="app.test")
                key = h.rt.gate.key_of(sid)
                now = h.clock.now
                await h.rt.store.put_link(SsoLink(key, "https://idp.test", name, None, None, None, admin, now,
                                                  now + 3600))
                pages[name] = await h.client.get("/_lapse/admin", headers=_cookie(sid))
            assert pages["idp-admin"].status_code == 200
            assert pages["idp-user"].status_code == 403

    run(main())


def test_an_oidc_session_is_never_admin_by_a_same_named_local_user(tmp_path: Path):
    """H3 (c): a session with an SsoLink is an admin by ``link.admin`` only; a local admin "root" does not lend
    its flag to an IdP sign-in that came back as "root" (the local user signing in with a password still is)."""
    from lapse.store.base import SsoLink

    async def main():
        async with harness(tmp_path) as h:
            local_root = await _admin(h)
            sid, _ = await h.rt.gate.sign_in("root", host="app.test")
            now = h.clock.now
            await h.rt.store.put_link(SsoLink(h.rt.gate.key_of(sid), "https://idp.test", "idp-root", None, None, None,
                                              False, now, now + 3600))
            assert (await h.client.get("/_lapse/admin", headers=_cookie(sid))).status_code == 403
            assert (await h.client.get("/_lapse/admin", headers=_cookie(local_root))).status_code == 200

    run(main())
