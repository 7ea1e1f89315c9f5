"""What proxy mode judges is what the upstream serves, and what the upstream hears is lapse's word
(security review findings H1, H2, M1, L3, L4, L7 of 2026-11-27)."""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lapse.web.forwarding import unsafe_path
from lapse.web.net import canonical_path
from lapse.web.websocket import _same_origin

from ..support import serve_in_thread
from .test_gateway import CONFIG, harness, run


async def _headers(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "headers": dict(request.headers)})


@pytest.fixture(scope="module")
def upstream():
    with serve_in_thread(Starlette(routes=[Route("/{path:path}", _headers)])) as url:
        yield url


async def raw(h, path: str, *, host: str = "app.test", cookie: str = "", accept: str = "application/json") -> int:
    """One request straight into the ASGI app, its path exactly as given (httpx would tidy it)."""
    statuses: list[int] = []
    headers = [(b"host", host.encode()), (b"accept", accept.encode())]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    raw_path = path.encode()
    scope = {"type": "http", "http_version": "1.1", "method": "GET", "scheme": "http", "path": unquote(path),
             "raw_path": raw_path, "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}

    sent = False
    gone = asyncio.Event()  # never set: the client stays until the answer is complete

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await h.app(scope, receive, send)
    return statuses[0]


def test_the_path_judged_is_the_path_served(tmp_path: Path, upstream: str):
    """H1/L3: dot segments, empty segments and encoded look-alikes cannot move a request out of a strict app."""

    async def main():
        async with harness(tmp_path, mode="proxy", upstream=upstream) as h:
            bob = f"__Host-lapse={await h.sid(user='bob')}"  # not in group finance: the pay app is closed to him
            assert await raw(h, "/pay/x", cookie=bob) == 403
            for sneaky in ("/x/../pay/x", "/x/%2e%2e/pay/x", "//pay/x", "/x/./pay", "/x\\..\\pay/x"):
                assert await raw(h, sneaky, cookie=bob) == 400, sneaky
            assert await raw(h, "/p%61y/x", cookie=bob) == 403  # judged decoded, as the upstream will serve it
            assert await raw(h, "/docs/", cookie=bob) == 200

    run(main())


def test_a_host_no_app_claims_is_misdirected(tmp_path: Path, upstream: str):
    """H2: the client may not pick a Host no app names to fall through to laxer limits."""

    async def main():
        async with harness(tmp_path, mode="proxy", upstream=upstream) as h:
            bob = f"__Host-lapse={await h.sid(user='bob')}"
            assert await raw(h, "/pay/x", host="other.test", cookie=bob) == 421
            assert await raw(h, "/pay/x", host="APP.test:8080", cookie=bob) == 403
            alice = f"__Host-lapse={await h.sid()}"
            r = await h.client.get("/pay/x", headers={"cookie": alice})
            assert r.json()["headers"]["host"] == "app.test"  # the upstream routes by the Host lapse judged

    run(main())


def test_the_upstream_hears_only_lapse_about_identity_and_address(tmp_path: Path, upstream: str):
    """M1/L4: spoofed identity and address headers never reach the upstream, nor lapse's cookies."""

    async def main():
        async with harness(tmp_path / "outside", mode="proxy", upstream=upstream, peer="203.0.113.9") as h:
            sid = await h.sid()
            r = await h.client.get("/docs", headers={
                "cookie": f"__Host-lapse={sid}; theme=dark; __Host-lapse-csrf=abc",
                "x-real-ip": "10.9.9.9", "forwarded": "for=10.2.2.2", "x-forwarded-for": "10.1.1.1",
                "x-original-uri": "/admin", "remote_user": "admin", "remote-groups": "admins",
            })
            seen = r.json()["headers"]
            assert seen["x-forwarded-for"] == "203.0.113.9" and seen["x-real-ip"] == "203.0.113.9"
            assert "forwarded" not in seen and "x-original-uri" not in seen and "remote_user" not in seen
            assert seen["remote-user"] == "alice" and seen["remote-groups"] == "finance"
            assert seen["cookie"] == "theme=dark"  # the session ID is a bearer credential: it stays here
            assert sid not in str(seen)
        async with harness(tmp_path / "inside", mode="proxy", upstream=upstream) as h:  # behind a trusted proxy
            sid = await h.sid()
            r = await h.client.get("/docs", headers={"cookie": f"__Host-lapse={sid}",
                                                     "x-forwarded-for": "198.51.100.4"})
            seen = r.json()["headers"]
            assert seen["x-forwarded-for"] == "198.51.100.4, 127.0.0.1" and seen["x-real-ip"] == "198.51.100.4"

    run(main())


def test_forward_auth_judges_the_path_a_server_will_serve(tmp_path: Path):
    """H1 for forward-auth: the proxy passes the raw URI on; lapse judges its normalised form."""

    async def main():
        async with harness(tmp_path) as h:
            bob = await h.sid(user="bob")
            for uri in ("/pay/x", "/x/../pay/x", "/p%61y/x", "//pay/x", "/x/%2E%2E/pay/x?y=1"):
                r = await h.auth(bob, uri)
                assert (r.status_code, r.headers["x-lapse-reason"]) == (403, "forbidden"), uri
            assert (await h.auth(bob, "/docs")).status_code == 200

    run(main())


def test_path_rules():
    assert canonical_path("/x/../p%61y/./x//y/") == "/pay/x/y/"
    assert canonical_path("/../..") == "/"
    assert unsafe_path("/a//b") and unsafe_path("/a/%2e/b") and unsafe_path("/a\\b")
    assert not unsafe_path("/a/b/") and not unsafe_path("/") and not unsafe_path("/a.b/c..d")


def test_websocket_origin_must_be_the_host():
    """L7: a page on a sibling host may not open a WebSocket with this site's session."""
    assert _same_origin(None, "app.test", "https")  # not a browser
    assert _same_origin("https://app.test", "app.test:443", "https")
    assert not _same_origin("https://evil.app.test", "app.test", "https")
    assert not _same_origin("null", "app.test", "https")


# ------------------------------------------------ security review of 2026-11-27 (second pass)

_TOKENS = ("a", "pay", "admin", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", ";", ";x=1", "%3b", "%3B", "%3b.",
           "%252e", "%252E%252e", "%253b", "%2f", "%2F", "%252f", "%5c", "%5C", "\\", "/", "%25", "%2525", "%61")


def _served(raw: str, decodings: int) -> str:
    """The reference server: decode ``decodings`` times, ``\\`` as ``/``, strip ``;params`` from every
    segment, then resolve dot segments and empty ones (RFC 3986 5.2.4, as Tomcat/Jetty/Spring do)."""
    path = raw
    for _ in range(decodings):
        path = unquote(path)
    path = re.sub(r";[^/]*", "", path.replace("\\", "/"))
    return posixpath.normpath("/" + re.sub("/+", "/", path)).replace("//", "/")


@given(st.lists(st.sampled_from(_TOKENS), max_size=8).map(lambda t: "/" + "".join(t)))
@settings(max_examples=3000, deadline=None)
def test_the_path_judged_is_the_path_a_normalising_server_serves_or_it_is_refused(raw: str):
    """Forward-auth judges what a server that decodes once and honours ``;`` and dot segments serves;
    proxy mode judges exactly that or refuses, also for servers that decode two or three times."""
    judged = canonical_path(raw)
    assert (judged.rstrip("/") or "/") == _served(raw, 1), raw
    if not unsafe_path(raw):
        for decodings in (1, 2, 3):
            assert (judged.rstrip("/") or "/") == _served(raw, decodings), (raw, decodings)
        assert ";" not in judged and "\\" not in judged


def test_path_parameters_cannot_hide_a_dot_segment(tmp_path: Path, upstream: str):
    """Finding 1: ``..;`` and ``.;`` are dot segments to Tomcat, Jetty and older Spring. Proxy mode refuses
    them (and double encoding); forward-auth judges the path those servers serve."""

    async def main():
        async with harness(tmp_path / "proxy", mode="proxy", upstream=upstream) as h:
            bob = f"__Host-lapse={await h.sid(user='bob')}"
            for sneaky in ("/x/..;/pay/admin", "/.;/pay", "/x/%2e%2e;/pay", "/x/%2E%2E%3Bx/pay", "/x/..%3b/pay",
                           "/x/%252e%252e/pay", "/x/%252E%252E%253B/pay", "/;x/pay", "/x/%255c../pay"):
                assert await raw(h, sneaky, cookie=bob) == 400, sneaky
            assert await raw(h, "/pay;jsessionid=1/x", cookie=bob) == 403  # judged as /pay/x
            assert await raw(h, "/docs;v=1", cookie=bob) == 200
        async with harness(tmp_path / "auth") as h:
            bob = await h.sid(user="bob")
            for uri in ("/x/..;/pay/admin", "/.;/pay", "/x/%2e%2e;/pay", "/pay;jsessionid=1/admin", "/x/..%3B/pay",
                        "/x/%252e%252e/pay", "/x/%253b/docs"):
                r = await h.auth(bob, uri)
                assert (r.status_code, r.headers["x-lapse-reason"]) == (403, "forbidden"), uri
                assert "remote-user" not in r.headers
            assert (await h.auth(bob, "/docs;v=1/x")).status_code == 200

    run(main())


def test_forward_auth_refuses_what_it_cannot_judge_and_says_how_to_fix_it(tmp_path: Path, caplog):
    """Finding 2: a peer outside trusted_proxies, or a proxy that names no URI, gets 403 (an error page
    from the proxy, not a login loop) for a session cookie, never a guess at ``/``; 401 ``missing`` without
    one; one log line per cause names the fix."""

    async def main():
        async with harness(tmp_path / "trusted") as h:
            bob = await h.sid(user="bob")
            for _ in range(3):
                r = await h.client.get("/_lapse/auth", headers={"host": "app.test", "cookie": f"__Host-lapse={bob}"})
                assert (r.status_code, r.headers["x-lapse-reason"], r.headers["cache-control"]) == (
                    403, "forbidden", "no-store")
                assert "remote-user" not in r.headers and "set-cookie" not in r.headers
            r = await h.client.get("/_lapse/auth", headers={"host": "app.test", "cookie": f"__Host-lapse={bob}",
                                                            "x-forwarded-uri": "/docs"})
            assert (r.status_code, r.headers["remote-user"]) == (200, "bob")  # Traefik and Caddy send this one
            # Without a session cookie nothing depends on the path: sign-in is needed (CONTRACT §4 ``missing``).
            r = await h.client.get("/_lapse/auth", headers={"host": "app.test"})
            assert (r.status_code, r.headers["x-lapse-reason"], r.headers["location"]) == (
                401, "missing", "/_lapse/login?next=/&reason=missing")
        async with harness(tmp_path / "untrusted", peer="172.18.0.5") as h:
            bob = await h.sid(user="bob")
            for uri in ("/pay/x", "/docs", "/pay/admin"):
                r = await h.auth(bob, uri)
                assert (r.status_code, r.headers["x-lapse-reason"]) == (403, "forbidden"), uri
                assert "remote-user" not in r.headers

    with caplog.at_level(logging.ERROR, logger="lapse.web"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "lapse.web"] == [
        "forward-auth refused, the proxy is misconfigured: the proxy at 127.0.0.1 sent neither X-Original-URI nor "
        "X-Forwarded-Uri: set X-Original-URI (nginx: proxy_set_header X-Original-URI $request_uri)",
        "forward-auth refused, the proxy is misconfigured: 172.18.0.5 is not in trusted_proxies, so the URI it "
        "names cannot be believed: add the proxy's address to trusted_proxies",
    ]


async def _answers(request: Request) -> Response:
    """An upstream that misbehaves on /evil and tells what it received everywhere."""
    body = await request.body()
    r = JSONResponse({"raw_path": request.scope["raw_path"].decode(), "query": request.url.query,
                      "headers": dict(request.headers), "body": body.decode()})
    if request.url.path == "/evil":
        r.raw_headers += [
            (b"set-cookie", b"__Host-lapse=attacker-chosen-session-id-000000; Path=/; Secure; HttpOnly"),
            (b"set-cookie", b"__host-LAPSE-csrf=x; Path=/; Secure"),
            (b"set-cookie", b"theme=dark; Path=/"),
            (b"connection", b"x-internal-token, close"),
            (b"x-internal-token", b"s3cr3t"),
            (b"cache-control", b"private"),
        ]
    return r


@pytest.fixture(scope="module")
def answering():
    with serve_in_thread(Starlette(routes=[Route("/{path:path}", _answers, methods=["GET", "POST"])])) as url:
        yield url


def test_the_upstream_cannot_set_lapse_cookies_or_pass_connection_headers(tmp_path: Path, answering: str, caplog):
    """Finding 3: an upstream may not fix or clear lapse's cookies, and headers its Connection header names
    are hop-by-hop (RFC 9110 7.6.1); the first attempt per cookie is logged."""

    async def main():
        async with harness(tmp_path, mode="proxy", upstream=answering) as h:
            sid = await h.sid()
            for _ in range(2):
                r = await h.client.get("/evil", headers={"cookie": f"__Host-lapse={sid}"})
                assert r.status_code == 200
                assert r.headers.get_list("set-cookie") == ["theme=dark; Path=/"]
                assert "x-internal-token" not in r.headers and "connection" not in r.headers
                assert r.headers.get_list("cache-control") == ["private"]

    with caplog.at_level(logging.ERROR, logger="lapse.proxy"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "lapse.proxy"] == [
        "upstream response header dropped: the upstream tried to set lapse's cookie __Host-lapse",
        "upstream response header dropped: the upstream tried to set lapse's cookie __host-LAPSE-csrf",
    ]


def test_the_upstream_gets_the_path_as_sent_and_a_body_only_when_there_is_one(tmp_path: Path, answering: str):
    """Findings 5 and 6: ``/a%2Fb%3Fc`` is not ``/a/b?c``; a GET goes on without a chunked empty body,
    a POST's body still goes on."""

    async def main():
        async with harness(tmp_path, mode="proxy", upstream=answering) as h:
            ck = {"cookie": f"__Host-lapse={await h.sid()}"}
            seen = (await h.client.get("/a%2Fb%3Fc;v=1?q=%2F1", headers=ck)).json()
            assert (seen["raw_path"], seen["query"]) == ("/a%2Fb%3Fc;v=1", "q=%2F1")
            assert "transfer-encoding" not in seen["headers"] and "content-length" not in seen["headers"]
            seen = (await h.client.post("/docs", content=b"x" * 100_000, headers=ck)).json()
            assert (seen["body"], seen["headers"]["content-length"]) == ("x" * 100_000, "100000")

            async def chunks():
                yield b"ab"
                yield b"cd"

            seen = (await h.client.post("/docs", content=chunks(), headers=ck)).json()
            assert (seen["body"], seen["headers"]["transfer-encoding"]) == ("abcd", "chunked")

    run(main())


def test_websocket_origin_must_have_the_gateways_scheme():
    """Finding 4: a plain-http page of this host may not open a WebSocket on an https gateway."""
    assert _same_origin("https://app.test", "app.test", "https")
    assert not _same_origin("http://app.test:80", "app.test", "https")
    assert not _same_origin("http://app.test", "app.test:443", "https")
    assert _same_origin("http://app.test:8080", "app.test:8080", "http")
    assert not _same_origin("https://app.test", "app.test", "http")


def test_an_https_gateway_refuses_a_websocket_from_a_plain_http_page(tmp_path: Path):
    """Finding 4, end to end: the upgrade is refused (403) before any upstream is dialled."""

    async def upgrade(h, origin: str) -> tuple[str, int | None]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "websocket.connect"}

        headers = [(b"host", b"app.test"), (b"cookie", f"__Host-lapse={sid}".encode()), (b"origin", origin.encode())]
        await h.app({"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"", "headers": headers,
                     "client": ("127.0.0.1", 1), "scheme": "wss", "subprotocols": [],
                     "extensions": {"websocket.http.response": {}}}, receive, send)
        return sent[0]["type"], sent[0].get("status") or sent[0].get("code")

    https = CONFIG.replace("[server]", '[server]\npublic_url = "https://app.test"')

    async def main():
        nonlocal sid
        async with harness(tmp_path, mode="proxy", upstream="http://127.0.0.1:9", config=https) as h:
            sid = await h.sid()
            assert await upgrade(h, "http://app.test:80") == ("websocket.http.response.start", 403)
            assert await upgrade(h, "http://app.test") == ("websocket.http.response.start", 403)
            assert await upgrade(h, "https://app.test") == ("websocket.close", 1011)  # allowed; nothing listens

    sid = ""
    run(main())
