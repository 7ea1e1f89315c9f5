"""The gateway's HTTP surface (CONTRACT.md §4) through real HTTP semantics (httpx over ASGI),
on the embedded SQLite store, with the store's clock in the test's hand."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from lapse.config import parse_config
from lapse.identity import hash_password
from lapse.runtime import open_runtime
from lapse.store.base import User
from lapse.web import Gateway, safe_next

from ..core.helpers import Clock
from ..redis_server import shared_server
from ..support import free_port, serve_in_thread

T0 = 1_800_000_000.0
PASSWORD = "correct horse battery"
HASH = hash_password(PASSWORD)

CONFIG = """
[server]
mode = "{mode}"
upstream = "{upstream}"
trusted_proxies = ["127.0.0.1/32"]

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[login]
max_attempts = 3
window = "1m"

[defaults]
idle = "10m"
absolute = "1h"
passive_paths = ["/poll*"]

[[apps]]
name = "pay"
hosts = ["app.test"]
paths = ["/pay*"]
idle = "1m"
allow = ["group:finance"]

  [[apps.privileged]]
  paths = ["/pay/admin*"]
  max_auth_age = "5m"

[[apps]]
name = "main"
hosts = ["app.test"]
"""


class Harness:
    def __init__(self, rt, clock: Clock, client: httpx.AsyncClient) -> None:
        self.rt, self.clock, self.client = rt, clock, client

    async def login(self, user: str = "alice", password: str = PASSWORD, next_: str = "/",
                    cookies: dict[str, str] | None = None, **fields: str) -> httpx.Response:
        page = await self.client.get("/_lapse/login", headers={"cookie": _jar(cookies or {})})
        nonce = _set_cookies(page).get("__Host-lapse-csrf") or (cookies or {}).get("__Host-lapse-csrf")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        jar = {**(cookies or {}), "__Host-lapse-csrf": nonce}
        return await self.client.post(
            "/_lapse/login",
            data={"username": user, "password": password, "next": next_, "csrf_token": token, **fields},
            headers={"cookie": _jar(jar)},
        )

    async def sid(self, **kwargs) -> str:
        r = await self.login(**kwargs)
        assert r.status_code == 303, r.text
        return _set_cookies(r)["__Host-lapse"]

    async def auth(self, sid: str | None, uri: str = "/", host: str = "app.test", **headers: str) -> httpx.Response:
        h = {"host": host, "x-original-uri": uri, "x-original-method": headers.pop("method", "GET")}
        if sid is not None:
            h["cookie"] = f"__Host-lapse={sid}"
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        return await self.client.get("/_lapse/auth", headers=h)

    async def events(self) -> list[dict]:
        return [e.to_dict() for e in await self.rt.store.tail_audit(1000)]


def _jar(cookies: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in cookies.items())


def _set_cookies(r: httpx.Response) -> dict[str, str]:
    out = {}
    for line in r.headers.get_list("set-cookie"):
        name, _, rest = line.partition("=")
        out[name] = rest.split(";", 1)[0]
    return out


@asynccontextmanager
async def harness(tmp_path: Path, *, mode: str = "forward-auth", upstream: str = "http://127.0.0.1:9",
                  peer: str = "127.0.0.1", config: str = CONFIG) -> AsyncIterator[Harness]:
    loaded = parse_config(config.format(mode=mode, upstream=upstream), "lapse.toml", tmp_path)
    clock = Clock(T0)
    async with open_runtime(loaded, clock=clock) as rt:
        await rt.store.put_user(User("alice", HASH, groups=("finance",)))
        await rt.store.put_user(User("bob", HASH))
        app = Gateway(rt)
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
            h = Harness(rt, clock, client)
            h.app = app  # for requests httpx would tidy up first (raw paths)
            yield h
        if app.upstream is not None:
            await app.upstream.aclose()


def run(coro):
    return asyncio.run(coro)


def on_store(kind: str, tmp_path: Path, config: str = CONFIG) -> str:
    """``config`` on the embedded SQLite store or on the test run's real redis-server (its own key prefix)."""
    if kind == "sqlite":
        return config
    prefix = "g" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12] + ":"
    return config.replace('url = "sqlite:///state/lapse.db"', f'url = "{shared_server().url}?prefix={prefix}"')


async def login_form(h: Harness) -> tuple[str, str]:
    """A sign-in form's (CSRF cookie, token), to post many times."""
    page = await h.client.get("/_lapse/login")
    return _set_cookies(page)["__Host-lapse-csrf"], re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


async def at_once(h: Harness, n: int, *, user: str = "alice", password: str = "wrong password",
                  ips: list[str] | None = None, **fields: str) -> list[httpx.Response]:
    """``n`` sign-in POSTs in flight together (one form, fetched first), each from ``ips[i]`` if given."""
    nonce, token = await login_form(h)

    def one(i: int) -> Awaitable[httpx.Response]:
        headers = {"cookie": f"__Host-lapse-csrf={nonce}"} | ({"x-forwarded-for": ips[i]} if ips else {})
        data = {"username": user, "password": password, "next": "/", "csrf_token": token, **fields}
        return h.client.post("/_lapse/login", data=data, headers=headers)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def reasons(events: list[dict], name: str) -> list[str]:
    return sorted(e.get("reason") or "" for e in events if e["event"] == name)


# ------------------------------------------------------------------ forward-auth


def test_forward_auth_statuses_and_reasons(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            r = await h.auth(None, "/docs?a=1&b=2")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "missing")
            assert r.headers["location"] == "/_lapse/login?next=/docs%3Fa%3D1%26b%3D2&reason=missing"
            assert r.headers["cache-control"] == "no-store"
            sid = await h.sid()
            r = await h.auth(sid, "/docs?x=1")
            assert r.status_code == 200
            assert (r.headers["remote-user"], r.headers["remote-groups"]) == ("alice", "finance")
            assert r.headers["x-lapse-expires-in"] == "600"
            # A stricter app by path; the absolute deadline counts too.
            assert (await h.auth(sid, "/pay/x")).headers["x-lapse-expires-in"] == "60"
            # Step-up on a privileged route once authentication is older than 5 minutes.
            for _ in range(6):
                h.clock.now += 50
                assert (await h.auth(sid, "/pay/x")).status_code == 200  # active use keeps the 1-minute app
            r = await h.auth(sid, "/pay/admin/refund")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "step_up")
            assert "set-cookie" not in r.headers  # the session lives on
            # Idle for the 1-minute app, not for the 10-minute one.
            h.clock.now += 61
            r = await h.auth(sid, "/pay/x")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "idle")
            assert (await h.auth(sid, "/docs")).status_code == 200
            # Forbidden for bob in the finance-only app.
            bob = await h.sid(user="bob")
            r = await h.auth(bob, "/pay/x")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (403, "forbidden")
            # The absolute limit ends it, and the cookie of an ended session is cleared.
            h.clock.now = T0 + 3600
            r = await h.auth(sid, "/docs")
            assert (r.status_code, r.headers["x-lapse-reason"]) == (401, "absolute")
            assert r.headers["set-cookie"].startswith("__Host-lapse=;") and "Max-Age=0" in r.headers["set-cookie"]

    run(main())


def test_forged_malformed_and_stale_cookies_are_401_and_audited(tmp_path: Path):
    """standards-checklist A.4: never-issued IDs are refused, recorded, and never a 500."""

    async def main():
        async with harness(tmp_path) as h:
            for value in ("A" * 43, "not a cookie;", "x" * 5000, "", "%C3%A9"):
                r = await h.auth(value)
                assert r.status_code == 401 and r.headers["x-lapse-reason"] in ("unknown", "missing"), value
            denied = [e for e in await h.events() if e["event"] == "session.denied"]
            assert denied and all(e["reason"] == "unknown" for e in denied)
            sid = await h.sid()
            await h.rt.gate.revoke(h.rt.gate.key_of(sid), "admin")
            assert (await h.auth(sid)).headers["x-lapse-reason"] == "revoked"

    run(main())


def test_forwarded_headers_only_from_trusted_proxies(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            await h.auth(sid, "/docs", x_forwarded_for="198.51.100.7, 10.0.0.1, 127.0.0.1")
            async with harness(tmp_path / "b", peer="203.0.113.9") as outsider:
                other = await outsider.sid()
                # An untrusted peer cannot choose the path, the IP, or make a request passive by path: what it
                # names is not believed, and lapse does not guess (GET / would pass every path rule).
                r = await outsider.auth(other, "/pay/admin/x", x_forwarded_for="10.9.9.9")
                assert (r.status_code, r.headers["x-lapse-reason"]) == (403, "forbidden")
                assert "remote-user" not in r.headers
                assert (await outsider.auth(None, "/x")).headers["x-lapse-reason"] == "missing"  # no session: sign in
                created = [e for e in await outsider.events() if e["event"] == "session.created"]
                assert created[-1]["ip"] == "203.0.113.9"
            sessions = await h.rt.store.sessions("alice")
            assert sessions[-1].ip == "10.0.0.1"  # the rightmost hop that is not a trusted proxy

    run(main())


def test_store_down_fails_closed(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            await h.rt.store.close()
            r = await h.auth(sid)
            assert r.status_code == 503
            assert (await h.client.get("/_lapse/healthz")).status_code == 503
            page = await h.client.get("/_lapse/session", headers={"accept": "text/html", "cookie": f"__Host-lapse={sid}"})
            assert page.status_code == 503 and "Sign-in service unavailable" in page.text

    run(main())


# ------------------------------------------------------------------------ login


def test_login_csrf_redirects_and_new_ids(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            no_token = await h.client.post("/_lapse/login", data={"username": "alice", "password": PASSWORD})
            assert no_token.status_code == 403 and "__Host-lapse=" not in no_token.headers.get("set-cookie", "")
            for evil, expected in (("//evil.test/x", "/"), ("https://evil.test/", "/"), ("/\\evil.test", "/"),
                                   ("javascript:alert(1)", "/"), ("/ok?a=1&b=2", "/ok?a=1&b=2")):
                r = await h.login(next_=evil)
                assert r.headers["location"] == expected, evil
                assert safe_next(evil) == expected
            cookie = r.headers["set-cookie"]
            for attr in ("HttpOnly", "SameSite=Lax", "Secure", "Path=/"):
                assert attr in cookie
            assert "Domain" not in cookie and "Expires" not in cookie and "Max-Age" not in cookie
            assert r.headers["cache-control"] == "no-store"
            # A new ID at every login; the one it replaces ends with reason reauth.
            first = _set_cookies(r)["__Host-lapse"]
            again = await h.login(cookies={"__Host-lapse": first})
            second = _set_cookies(again)["__Host-lapse"]
            assert second != first and len(second) >= 43
            assert (await h.auth(first)).headers["x-lapse-reason"] == "revoked"
            reauth = [e for e in await h.events() if e["event"] == "session.revoked"]
            assert reauth[-1]["reason"] == "reauth"
            logins = [e for e in await h.events() if e["event"] == "auth.login"]
            assert logins[-1]["outcome"] == "success" and logins[-1]["session"]

    run(main())


def test_login_failures_are_throttled_per_user_and_ip(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            for _ in range(3):
                r = await h.login(password="wrong password")
                assert r.status_code == 200 and "Wrong user name or password" in r.text
            r = await h.login()  # even the right password: the window is closed
            assert r.status_code == 429 and "retry-after" in r.headers
            events = await h.events()
            assert [e["outcome"] for e in events if e["event"] == "auth.login"] == ["failure"] * 3
            assert any(e["event"] == "auth.throttled" for e in events)
            h.clock.now += 61
            assert (await h.login()).status_code == 303

    run(main())


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_concurrent_wrong_passwords_cannot_outrun_the_throttle(tmp_path: Path, store: str):
    """Each attempt is counted before its password is checked: of 40 at once from one address, exactly
    max_attempts (3) are checked and 37 get 429; from 40 addresses at once, exactly the user's own limit
    (10 x 3) are checked. The audit's failures count the password checks."""

    async def main():
        async with harness(tmp_path, config=on_store(store, tmp_path)) as h:
            statuses = [r.status_code for r in await at_once(h, 40)]
            assert (statuses.count(200), statuses.count(429)) == (3, 37)
            events = await h.events()
            assert reasons(events, "auth.login") == ["bad_credentials"] * 3
            assert reasons(events, "auth.throttled") == ["ip"] * 37

            spread = await at_once(h, 40, user="bob", ips=[f"203.0.113.{i}" for i in range(40)])
            statuses = [r.status_code for r in spread]
            assert (statuses.count(200), statuses.count(429)) == (30, 10)
            events = await h.events()
            assert len([e for e in events if e["event"] == "auth.login" and e["user"] == "bob"]) == 30
            assert reasons(events, "auth.throttled") == ["ip"] * 37 + ["user"] * 10

    run(main())


def test_login_location_is_ascii_even_for_a_non_latin_next(tmp_path: Path):
    """A session that expired on /wiki/%CE%95%CE%BB signs in again with next=/wiki/Ελ: 303 to the encoded path,
    one session, never a 500 after the session was created (an orphan that counts towards max_sessions)."""

    async def main():
        async with harness(tmp_path) as h:
            for wanted, location in (("/wiki/Ελ", "/wiki/%CE%95%CE%BB"), ("/cafē", "/caf%C4%93"),
                                     ("/a%2Fb?q=x%20y&z=%E2%82%AC", "/a%2Fb?q=x%20y&z=%E2%82%AC"),
                                     ("/100%", "/100%25"), ("/a b\"c", "/a%20b%22c")):
                r = await h.login(next_=wanted)
                assert (r.status_code, r.headers["location"]) == (303, location)
            assert len(await h.rt.store.sessions("alice")) == 5

    run(main())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wanted=st.one_of(st.text(max_size=40), st.text(max_size=40).map(lambda t: "/" + t)))
def test_login_always_redirects_same_site_to_what_was_asked(tmp_path: Path, wanted: str):
    """For any ``next``: 303, an ASCII same-site Location that decodes back to it (or ``/`` when refused)."""

    async def main():
        async with harness(tmp_path / hashlib.sha256(wanted.encode()).hexdigest()[:16], peer="192.0.2.1") as h:
            r = await h.login(next_=wanted)
            location = r.headers["location"]
            assert r.status_code == 303 and "__Host-lapse=" in r.headers["set-cookie"]
            assert location.isascii() and location.startswith("/") and not location.startswith(("//", "/\\"))
            assert safe_next(location) == location
            expected = safe_next(wanted)
            assert unquote(location) == unquote(expected)
            assert expected == "/" or expected == wanted

    run(main())


def test_logout_needs_csrf_and_ends_the_session(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            cookie = {"cookie": f"__Host-lapse={sid}"}
            refused = await h.client.post("/_lapse/logout", headers=cookie)
            assert refused.status_code == 403 and (await h.auth(sid)).status_code == 200
            token = (await h.client.get("/_lapse/session", headers=cookie)).json()["csrf_token"]
            r = await h.client.post("/_lapse/logout", data={"csrf_token": token}, headers=cookie)
            assert r.status_code == 200 and "signed out" in r.text.lower()
            assert "Max-Age=0" in r.headers["set-cookie"]
            assert (await h.auth(sid)).headers["x-lapse-reason"] == "revoked"
            assert [e["reason"] for e in await h.events() if e["event"] == "session.revoked"] == ["logout"]
            # Twice is fine (standards-checklist G.56).
            assert (await h.client.post("/_lapse/logout", headers=cookie)).status_code == 200

    run(main())


# ------------------------------------------------------------------ session API


def test_session_status_is_passive_and_activity_needs_csrf(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            cookie = {"cookie": f"__Host-lapse={sid}"}
            h.clock.now += 30
            status = (await h.client.get("/_lapse/session?path=/pay/x", headers=cookie)).json()
            assert status["authenticated"] and status["user"] == "alice"
            assert status["idle_expires_in"] == pytest.approx(30) and status["server_time"] == pytest.approx(T0 + 30)
            assert status["warn_before"] == 120 and status["absolute_expires_in"] == pytest.approx(3570)
            h.clock.now += 20
            again = (await h.client.get("/_lapse/session?path=/pay/x", headers=cookie)).json()
            assert again["idle_expires_in"] == pytest.approx(10)  # polling never extends
            bad = await h.client.post("/_lapse/session/activity?path=/pay/x", headers={**cookie, "x-csrf-token": "x"})
            assert bad.status_code == 403
            good = await h.client.post("/_lapse/session/activity?path=/pay/x",
                                       headers={**cookie, "x-csrf-token": status["csrf_token"]})
            assert good.status_code == 200 and good.json()["idle_expires_in"] == pytest.approx(60)
            h.clock.now += 61
            gone = (await h.client.get("/_lapse/session?path=/pay/x", headers=cookie)).json()
            assert gone == {"authenticated": False, "reason": "idle"}
            assert (await h.client.get("/_lapse/session")).json() == {"authenticated": False, "reason": "missing"}

    run(main())


# ------------------------------------------------------------------- proxy mode


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path, "query": request.url.query,
                         "remote_user": request.headers.get("remote-user"),
                         "forwarded_for": request.headers.get("x-forwarded-for"),
                         "body": (await request.body()).decode()},
                        headers={"set-cookie": "app=1; Path=/"})


async def _stream(request: Request) -> StreamingResponse:
    async def chunks():
        for i in range(3):
            yield f"chunk{i}\n".encode()
    return StreamingResponse(chunks(), media_type="text/plain")


@pytest.fixture(scope="module")
def upstream():
    app = Starlette(routes=[Route("/stream", _stream), Route("/{path:path}", _echo, methods=["GET", "POST"])])
    with serve_in_thread(app) as url:
        yield url


def test_proxy_mode(tmp_path: Path, upstream: str):
    async def main():
        async with harness(tmp_path, mode="proxy", upstream=upstream) as h:
            browser = await h.client.get("/docs?a=1&b=2", headers={"accept": "text/html"})
            assert browser.status_code == 303
            assert browser.headers["location"] == "/_lapse/login?next=/docs%3Fa%3D1%26b%3D2&reason=missing"
            api = await h.client.get("/docs", headers={"accept": "application/json"})
            assert api.status_code == 401 and api.json() == {"reason": "missing"}
            sid = await h.sid()
            cookie = f"__Host-lapse={sid}"
            r = await h.client.post("/echo/x?q=1", content=b"hello", headers={
                "cookie": cookie, "remote-user": "mallory", "x-forwarded-for": "10.1.1.1"})
            body = r.json()
            assert r.status_code == 200 and body["remote_user"] == "alice"  # the spoofed one never arrives
            assert (body["path"], body["query"], body["body"]) == ("/echo/x", "q=1", "hello")
            assert r.headers["set-cookie"] == "app=1; Path=/"
            stream = await h.client.get("/stream", headers={"cookie": cookie})
            assert stream.text == "chunk0\nchunk1\nchunk2\n"
            up = await h.client.get("/ws", headers={"cookie": cookie, "upgrade": "websocket", "connection": "upgrade"})
            assert up.status_code == 501
            for _ in range(7):
                h.clock.now += 45
                await h.client.get("/pay/x", headers={"cookie": cookie})
            step = await h.client.get("/pay/admin/x", headers={"cookie": cookie})
            assert step.status_code == 401 and step.json() == {"reason": "step_up"}
            assert step.headers["www-authenticate"] == 'Bearer error="insufficient_user_authentication", max_age=300'

    run(main())


def test_proxy_mode_upstream_down_is_502(tmp_path: Path):
    async def main():
        async with harness(tmp_path, mode="proxy", upstream=f"http://127.0.0.1:{free_port()}") as h:
            sid = await h.sid()
            r = await h.client.get("/x", headers={"cookie": f"__Host-lapse={sid}"})
            assert r.status_code == 502 and json.loads(r.text)["error"] == "bad_gateway"

    run(main())


# ------------------------------------------------------- widget, events, injection


def test_widget_is_served_with_caching_headers(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            r = await h.client.get("/_lapse/widget.js")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
            assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
            again = await h.client.get("/_lapse/widget.js", headers={"if-none-match": r.headers["etag"]})
            assert again.status_code == 304

    run(main())


def test_warning_is_audited_once_per_deadline(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            sid = await h.sid()
            cookie = {"cookie": f"__Host-lapse={sid}"}
            status = "/_lapse/session?path=/docs"
            await h.client.get(status, headers=cookie)
            assert not [e for e in await h.events() if e["event"] == "session.warning"]
            h.clock.now += 490  # the 10-minute app's deadline is 110 s away (warn_before: 2 minutes)
            for _ in range(3):
                await h.client.get(status, headers=cookie)
                h.clock.now += 1
            warnings = [e for e in await h.events() if e["event"] == "session.warning"]
            assert len(warnings) == 1 and warnings[0]["reason"] == "idle" and warnings[0]["app"] == "main"
            token = (await h.client.get(status, headers=cookie)).json()["csrf_token"]
            await h.client.post("/_lapse/session/activity?path=/docs", headers={**cookie, "x-csrf-token": token})
            h.clock.now += 490  # a new deadline: a new warning
            await h.client.get(status, headers=cookie)
            assert len([e for e in await h.events() if e["event"] == "session.warning"]) == 2

    run(main())


def test_event_stream_sends_deadlines_then_expiry(tmp_path: Path, monkeypatch):
    import lapse.web.app as web

    monkeypatch.setattr(web, "EVENTS_EVERY", 0.01)

    async def main():
        async with harness(tmp_path) as h:
            assert (await h.client.get("/_lapse/events")).text == 'event: expired\ndata: {"reason": "missing"}\n\n'
            sid = await h.sid()
            seen: list[tuple[str, dict]] = []

            async def lapse_later():
                await asyncio.sleep(0.1)
                h.clock.now += 61  # the 1-minute app lapses while the stream is open

            later = asyncio.create_task(lapse_later())
            r = await h.client.get("/_lapse/events?path=/pay/x", headers={"cookie": f"__Host-lapse={sid}"})
            await later
            assert r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.text.splitlines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((event, json.loads(line[6:])))
            assert [e for e, _ in seen] == ["session", "expired"]
            assert seen[0][1]["authenticated"] and seen[0][1]["idle_timeout"] == 60
            assert seen[1][1] == {"reason": "idle"}

    run(main())


async def _html_page(request: Request):
    from starlette.responses import HTMLResponse

    csp = {"content-security-policy": "script-src 'nonce-abc123'"} if "csp" in request.url.path else {}
    head = "<html><head><title>t</title>" + ("<script src='/_lapse/widget.js'></script>" if "own" in request.url.path else "")
    return HTMLResponse(head + "</head><body>hello</body></html>", headers=csp)


@pytest.fixture(scope="module")
def html_upstream():
    with serve_in_thread(Starlette(routes=[Route("/{path:path}", _html_page)])) as url:
        yield url


def test_proxy_injects_the_widget_into_html(tmp_path: Path, html_upstream: str):
    async def main():
        (tmp_path / "inject").mkdir()
        loaded = parse_config(CONFIG.format(mode="proxy", upstream=html_upstream) .replace(
            '[server]', '[server]\ninject_widget = true'), "lapse.toml", tmp_path / "inject")
        async with open_runtime(loaded, clock=Clock(T0)) as rt:
            await rt.store.put_user(User("alice", HASH, groups=("finance",)))
            app = Gateway(rt)
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
                h = Harness(rt, Clock(T0), client)
                sid = await h.sid()
                cookie = {"cookie": f"__Host-lapse={sid}", "accept-encoding": "gzip"}
                page = (await client.get("/page", headers=cookie)).text
                assert page.count("/_lapse/widget.js") == 1
                assert page.index('<script src="/_lapse/widget.js" defer></script>') < page.index("</head>")
                csp = (await client.get("/csp", headers=cookie)).text
                assert '<script src="/_lapse/widget.js" defer nonce="abc123"></script>' in csp
                own = (await client.get("/own", headers=cookie)).text
                assert own.count("/_lapse/widget.js") == 1  # the page has it already
            await app.upstream.aclose()

    run(main())
