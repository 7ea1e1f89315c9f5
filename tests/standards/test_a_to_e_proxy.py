"""Checklist item 22 in proxy mode: what lapse passes on from the app behind it (shared/research/
standards-checklist.md). lapse's own pages carry ``Cache-Control: no-store`` (test_a_to_e_tokens.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from ..support import serve_in_thread
from ._a_to_e_harness import BASIC, cookie, harness, run


async def _page(request: Request) -> HTMLResponse:
    if request.url.path == "/public":
        return HTMLResponse("<html><body>news</body></html>", headers={"cache-control": "public, max-age=60"})
    return HTMLResponse("<html><body>balance: 42</body></html>")


@pytest.fixture(scope="module")
def html_upstream() -> Iterator[str]:
    with serve_in_thread(Starlette(routes=[Route("/{p:path}", _page)])) as url:
        yield url


def test_gap_22_authenticated_proxied_pages_are_not_cacheable(tmp_path: Path, html_upstream: str):
    """[checklist 22 · OWASP Session Mgmt CS "Web Content Caching" / ASVS 5.0 14.3.2]
    Every authenticated page carries ``Cache-Control: no-store``, so neither a shared cache nor the back
    button after logout can show it. In proxy mode an upstream answer to a signed-in request that says
    nothing about caching gets ``no-store`` from lapse; an upstream that sets its own Cache-Control keeps it."""

    async def main():
        async with harness(tmp_path, config=BASIC, mode="proxy", upstream=html_upstream) as h:
            sid = await h.sid()
            r = await h.client.get("/account", headers={**cookie(sid), "accept": "text/html"})
            assert r.status_code == 200 and "balance" in r.text
            assert r.headers.get_list("cache-control") == ["no-store"]
            r = await h.client.get("/public", headers={**cookie(sid), "accept": "text/html"})
            assert r.headers.get_list("cache-control") == ["public, max-age=60"]

    run(main())
