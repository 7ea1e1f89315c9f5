"""Checklist item 16 in a real browser: Debian's Chromium through Playwright, against ``lapse serve`` in proxy
mode (the rig of tests/browser/conftest.py, reused as it is). Skips (or FAILS under CI=true) without them."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from ..browser.conftest import Gateway, chromium, context, gateway, upstream_port  # noqa: F401 - fixtures
from ..browser.test_widget import sign_in  # without playwright this module skips (fails under CI=true)
from ..support import serve_in_thread


def _attacker(target: str) -> Starlette:
    """A page on another site ("localhost" is not the same site as "127.0.0.1") that posts a form to lapse."""

    async def page(request: Request) -> HTMLResponse:
        method = "post" if request.url.path == "/post" else "get"
        return HTMLResponse(f'<!doctype html><form id="f" method="{method}" action="{target}">'
                            '<input name="amount" value="1000"></form><script>f.submit()</script>')

    return Starlette(routes=[Route("/{p:path}", page)])


def test_a_cross_site_post_arrives_without_the_session_cookie(context: Any, gateway: Gateway):  # noqa: F811
    """[checklist 16 · ASVS 4.0.3 V3.4.3 / ASVS 5.0 3.3.2 / OWASP CS SameSite]: the cookie says SameSite
    explicitly, so a signed-in browser sends it on a cross-site top-level GET (Lax) but NOT on a cross-site
    form POST: lapse sees no cookie and sends the browser to sign in (reason missing)."""
    page = context.new_page()
    sign_in(page, gateway, "/home")
    cookie = next(c for c in context.cookies() if c["name"] == "__Host-lapse")
    assert cookie["sameSite"] == "Lax" and cookie["secure"] and cookie["httpOnly"] and cookie["path"] == "/"
    target = gateway.base_url + "/transfer"
    with serve_in_thread(_attacker(target)) as evil:
        evil = evil.replace("127.0.0.1", "localhost")
        page.goto(evil + "/post")
        page.wait_for_url(lambda url: urlsplit(url).path == "/_lapse/login")
        q = parse_qs(urlsplit(page.url).query)
        assert (q["next"], q["reason"]) == (["/transfer"], ["missing"])
        page.goto(evil + "/get")  # the control: a cross-site link still finds the user signed in
        page.wait_for_url(lambda url: urlsplit(url).path == "/transfer")
        assert "Upstream page" in page.content()
