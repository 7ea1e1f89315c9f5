"""The ASGI middleware in the FastAPI example app, through Starlette's TestClient, with the store's clock
in the test's hand; then the same app under a real uvicorn with real (short) timeouts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from examples.fastapi_app.app import create_app
from lapse.identity import hash_password
from lapse.middleware.asgi import LapseMiddleware
from lapse.store.base import User

from ..core.helpers import Clock
from ..support import free_port, port_open
from .common import ABSOLUTE, BILLING, IDLE, T0, csrf_field, set_cookies, write_apps_config, write_config

HTML = {"accept": "text/html"}


def audit(tmp_path: Path) -> list[dict]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def config(tmp_path: Path, **kw) -> Path:
    path = write_config(tmp_path, **kw)
    path.write_text(path.read_text().replace('sinks = ["store"]', 'sinks = ["store", "jsonl:audit.jsonl"]'))
    return path


def lapse_of(app) -> LapseMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, LapseMiddleware):
        layer = layer.app
    return layer


@pytest.fixture
def alongside(tmp_path: Path):
    clock = Clock(T0)
    app = create_app(config(tmp_path), mode="alongside", clock=clock)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
        client.clock = clock
        yield client


def sign_in(client: TestClient, user: str = "alice", password: str = "wonderland") -> None:
    r = client.post("/login", data={"username": user, "password": password, "next": "/private"})
    assert r.status_code == 303, r.text


def test_alongside_sign_in_is_adopted_and_active_requests_extend(alongside, tmp_path):
    sign_in(alongside)
    assert alongside.get("/private").status_code == 200
    assert [e["event"] for e in audit(tmp_path)] == ["session.created"]
    alongside.clock.now += IDLE - 100
    assert alongside.get("/private").status_code == 200  # active: the idle clock starts again
    alongside.clock.now += IDLE - 100
    assert alongside.get("/private", headers=HTML).status_code == 200
    assert alongside.get("/api/data").json() == {"user": "alice"}


def test_an_adopted_session_keeps_the_device_it_signed_in_from(alongside):
    alongside.headers["user-agent"] = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) Version/17.4 Safari/604.1"
    sign_in(alongside)
    assert alongside.get("/private").status_code == 200
    store = lapse_of(alongside.app).enforcer.rt.store
    assert [s.device for s in alongside.portal.call(store.sessions, "alice")] == ["Safari on iOS"]


def test_alongside_idle_expiry_signs_out_through_the_starlette_session(alongside, tmp_path):
    sign_in(alongside)
    alongside.get("/private")
    alongside.clock.now += IDLE
    r = alongside.get("/private", headers=HTML)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/private&reason=idle"
    assert r.headers["cache-control"] == "no-store"
    # The Starlette session is empty now: the app itself sees nobody signed in.
    after = alongside.get("/private")
    assert after.status_code == 303 and after.headers["location"] == "/login?next=/private"
    events = [(e["event"], e.get("reason")) for e in audit(tmp_path)]
    # The request that discovers the lapse ends the session: one expiry, one refusal (in either order).
    assert sorted(events) == [("session.created", None), ("session.denied", "idle"), ("session.expired", "idle")]
    assert all("session" in e and len(e["session"]) < 100 for e in audit(tmp_path))


def test_alongside_absolute_limit_holds_against_activity(alongside, tmp_path):
    sign_in(alongside)
    for _ in range(int(ABSOLUTE // 500)):
        alongside.clock.now += 500
        assert alongside.get("/private").status_code == 200
    alongside.clock.now = T0 + ABSOLUTE
    r = alongside.get("/api/data")
    assert r.status_code == 401 and r.json() == {"reason": "absolute"}
    assert r.headers["x-lapse-reason"] == "absolute"
    assert ("session.expired", "absolute") in [(e["event"], e.get("reason")) for e in audit(tmp_path)]


def test_passive_requests_never_extend(alongside):
    sign_in(alongside)
    alongside.get("/private")
    alongside.clock.now += IDLE - 10
    assert alongside.get("/api/poll").status_code == 200  # passive by path (passive_paths)
    assert alongside.get("/private", headers={"x-lapse-activity": "passive"}).status_code == 200
    status = alongside.get("/_lapse/session?path=/private").json()
    assert status["authenticated"] and status["idle_expires_in"] == pytest.approx(10, abs=0.01)
    alongside.clock.now += 10
    assert alongside.get("/private").json() == {"reason": "idle"}  # none of the three moved the idle clock


def test_session_api_and_activity_csrf(alongside, tmp_path):
    sign_in(alongside)
    alongside.get("/private")
    body = alongside.get("/_lapse/session?path=/private").json()
    assert body["user"] == "alice" and body["warn_before"] == 60 and body["idle_expires_in"] == IDLE
    alongside.clock.now += 300
    refused = alongside.post("/_lapse/session/activity?path=/private")
    assert refused.status_code == 403
    forged = alongside.post("/_lapse/session/activity?path=/private", headers={"x-csrf-token": "x" * 43})
    assert forged.status_code == 403
    ok = alongside.post("/_lapse/session/activity?path=/private", headers={"x-csrf-token": body["csrf_token"]})
    assert ok.status_code == 200 and ok.json()["idle_expires_in"] == IDLE  # the active heartbeat extends
    assert "set-cookie" not in ok.headers  # alongside: lapse sets no cookie of its own


def test_app_logout_revokes_the_lapse_session(alongside, tmp_path):
    sign_in(alongside)
    alongside.get("/private")
    assert alongside.post("/logout").status_code == 303
    assert ("session.revoked", "logout") in [(e["event"], e.get("reason")) for e in audit(tmp_path)]
    assert alongside.get("/private").headers["location"] == "/login?next=/private"


def test_widget_sign_out_needs_csrf_and_goes_through_the_app(alongside, tmp_path):
    sign_in(alongside)
    alongside.get("/private")
    token = alongside.get("/_lapse/session").json()["csrf_token"]
    assert alongside.post("/_lapse/logout", data={"csrf_token": "wrong"}).status_code == 403
    assert alongside.get("/private").status_code == 200  # still signed in
    r = alongside.post("/_lapse/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].startswith("/login?")
    assert alongside.get("/private").status_code == 303  # the Starlette session was cleared
    assert [(e["event"], e.get("reason")) for e in audit(tmp_path)][-1] == ("session.revoked", "logout")


def test_widget_at_expiry_lands_on_the_apps_login(alongside):
    sign_in(alongside)
    alongside.get("/private")
    alongside.clock.now += IDLE
    r = alongside.get("/_lapse/login?next=/private&reason=idle")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/private&reason=idle"
    assert alongside.get("/private").headers["location"] == "/login?next=/private"


def test_a_cross_site_get_of_lapse_login_ends_nothing_and_a_post_needs_the_csrf_token(alongside, tmp_path):
    """L5: <img src="https://app/_lapse/login"> on another site used to end the lapse session and sign the user
    out of the app (forced-logout CSRF). Now a GET of a live session asks; a POST with the token ends it."""
    sign_in(alongside)
    alongside.get("/private")
    page = alongside.get("/_lapse/login?next=/private&reason=absolute", headers=HTML)
    assert page.status_code == 200 and "Sign in again?" in page.text
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert alongside.get("/private").status_code == 200  # still signed in, in the app and in lapse
    assert all(e["event"] != "session.revoked" for e in audit(tmp_path))
    forged = alongside.post("/_lapse/login?next=/private&reason=absolute", data={"csrf_token": "x" * 43})
    assert forged.status_code == 403 and alongside.get("/private").status_code == 200
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1).replace("&amp;", "&")
    r = alongside.post(action, data={"csrf_token": csrf_field(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/private&reason=absolute"
    assert alongside.get("/private").headers["location"] == "/login?next=/private"  # the app signed out
    assert [(e["event"], e.get("reason")) for e in audit(tmp_path)][-1] == ("session.revoked", "reauth")


def test_widget_is_served_and_in_the_page(alongside):
    page = alongside.get("/")
    assert '<script src="/_lapse/widget.js" defer></script>' in page.text
    js = alongside.get("/_lapse/widget.js")
    assert js.status_code == 200 and "alertdialog" in js.text
    assert js.headers["content-type"].startswith("text/javascript")


def test_another_user_signing_in_replaces_the_session(alongside, tmp_path):
    sign_in(alongside)
    alongside.get("/private")
    # The app clears its session on sign-in; lapse sees the old one go (logout) and opens a new one.
    sign_in(alongside)
    alongside.get("/private")
    events = [e["event"] for e in audit(tmp_path)]
    assert events.count("session.created") == 2 and events.count("session.revoked") == 1


# ------------------------------------------------------------------ standalone


@pytest.fixture
def standalone(tmp_path: Path):
    clock = Clock(T0)
    app = create_app(config(tmp_path, store="sqlite:///lapse.db"), mode="standalone", clock=clock)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
        client.clock = clock
        client.lapse = lapse_of(app)
        client.portal.call(client.lapse.enforcer.rt.store.put_user,
                           User("alice", hash_password("wonderland"), created_at=T0))
        yield client


def lapse_login(client: TestClient, password: str = "wonderland") -> str:
    page = client.get("/_lapse/login?next=/private")
    r = client.post("/_lapse/login", data={"username": "alice", "password": password, "next": "/private",
                                          "csrf_token": csrf_field(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/private", r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("__Host-lapse=") and "Secure" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
    return set_cookies(r.headers)["__Host-lapse"]


def only(client: TestClient, sid: str) -> dict[str, str]:
    """Present exactly this session cookie (the jar is emptied so it cannot add another)."""
    client.cookies.clear()
    return {"cookie": f"__Host-lapse={sid}"}


def test_standalone_login_cookie_and_refusals(standalone, tmp_path):
    r = standalone.get("/private", headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/_lapse/login?next=/private&reason=missing"
    assert standalone.get("/api/data").json() == {"reason": "missing"}
    assert standalone.get("/").status_code == 200  # public_paths
    first = lapse_login(standalone)
    assert standalone.get("/private").text.count("Hello alice") == 1
    second = lapse_login(standalone)  # signing in again: a new ID, the old one ended (reauth)
    assert second != first
    old = standalone.get("/api/data", headers=only(standalone, first))
    assert old.status_code == 401 and old.json() == {"reason": "revoked"}
    events = [(e["event"], e.get("reason")) for e in audit(tmp_path)]
    assert ("session.revoked", "reauth") in events


@pytest.mark.parametrize("cookie", ["A" * 43, "not a valid id!", "x" * 5000, "", "%00%ff"])
def test_standalone_forged_or_malformed_cookie_is_401_and_audited(standalone, tmp_path, cookie):
    standalone.cookies.clear()
    r = standalone.get("/api/data", headers={"cookie": f"__Host-lapse={cookie}"})
    assert r.status_code == 401
    assert r.json()["reason"] in ("unknown", "missing")
    if cookie:
        assert [(e["event"], e.get("reason")) for e in audit(tmp_path)][-1] == ("session.denied", "unknown")
        assert "__Host-lapse=;" in r.headers["set-cookie"]  # cleared


def test_standalone_idle_expiry_and_logout(standalone, tmp_path):
    lapse_login(standalone)
    standalone.clock.now += IDLE
    r = standalone.get("/private", headers=HTML)
    assert r.status_code == 303 and r.headers["location"].endswith("reason=idle")
    sid = lapse_login(standalone)
    token = standalone.get("/_lapse/session").json()["csrf_token"]
    r = standalone.post("/_lapse/logout", data={"csrf_token": token})
    assert r.status_code == 200 and "__Host-lapse=;" in r.headers["set-cookie"]
    assert standalone.get("/api/data", headers=only(standalone, sid)).json() == {"reason": "revoked"}
    events = [(e["event"], e.get("reason")) for e in audit(tmp_path)]
    assert ("session.denied", "idle") in events and ("session.revoked", "logout") in events


def test_store_down_fails_closed(standalone):
    sid = lapse_login(standalone)
    standalone.portal.call(standalone.lapse.enforcer.rt.store.close)
    r = standalone.get("/api/data", headers=only(standalone, sid))
    assert r.status_code == 503 and r.json()["error"] == "unavailable"
    page = standalone.get("/private", headers={**HTML, **only(standalone, sid)})
    assert page.status_code == 503 and "unavailable" in page.text
    assert standalone.get("/_lapse/session", headers=only(standalone, sid)).status_code == 503


def test_without_lifespan_the_middleware_refuses_to_run(tmp_path):
    app = create_app(config(tmp_path), mode="standalone")
    with pytest.raises(RuntimeError, match="lifespan"):
        TestClient(app).get("/private")


def test_sweeper_expires_sessions_whose_user_never_comes_back(tmp_path):
    clock = Clock(T0)
    app = create_app(config(tmp_path, sweep="1s"), mode="alongside", clock=clock)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as client:
        sign_in(client)
        client.get("/private")
        clock.now += IDLE + 1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "session.expired" not in [e["event"] for e in audit(tmp_path)]:
            time.sleep(0.1)
    assert [(e["event"], e.get("reason")) for e in audit(tmp_path)][-1] == ("session.expired", "idle")


# ----------------------------------------------------------------- real server


def test_real_uvicorn_with_short_timeouts(tmp_path):
    """The example under uvicorn as a user runs it, idle "2s": a live page, then expiry in real time."""
    path = config(tmp_path)
    path.write_text(path.read_text().replace('idle = "10m"', 'idle = "2s"').replace('warn_before = "1m"',
                                                                                  'warn_before = "1s"'))
    port = free_port()
    env = {**os.environ, "LAPSE_CONFIG": str(path), "LAPSE_MODE": "alongside", "SESSION_SECRET": "s" * 32}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "examples.fastapi_app.app:create_app",
         "--port", str(port), "--log-level", "warning"], cwd=root, env=env,
    )
    try:
        for _ in range(100):
            if port_open(port):
                break
            time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, follow_redirects=False) as c:
            r = c.post("/login", data={"username": "alice", "password": "wonderland", "next": "/private"})
            jar = {"cookie": f"__Host-app={set_cookies(r.headers)['__Host-app']}"}
            assert c.get("/private", headers=jar).status_code == 200
            time.sleep(1.2)
            ok = c.get("/private", headers=jar)  # active: extends
            assert ok.status_code == 200
            jar = {"cookie": f"__Host-app={set_cookies(ok.headers).get('__Host-app', jar['cookie'].split('=', 1)[1])}"}
            time.sleep(1.2)
            assert c.get("/private", headers=jar).status_code == 200  # 2.4 s after sign-in, alive
            time.sleep(2.2)
            gone = c.get("/private", headers={**jar, **HTML})
            assert gone.status_code == 303 and gone.headers["location"].endswith("reason=idle")
        events = [(e["event"], e.get("reason")) for e in audit(tmp_path)]
        assert ("session.expired", "idle") in events
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------- whose policy: the Host header, the mount


def tiny_app(config_path: Path, clock: Clock, **options):
    """A bare Starlette app under the middleware: every path answers 200 with the user lapse saw."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def page(request):
        return PlainTextResponse(f"app for {request.scope.get('lapse.user')}")

    app = Starlette(routes=[Route("/{rest:path}", page, methods=["GET", "POST"])])
    app.add_middleware(LapseMiddleware, config=config_path, clock=clock, **options)
    return app


def signed_in(client: TestClient, user: str, **kw) -> dict[str, str]:
    enforcer = lapse_of(client.app).enforcer
    sid, _ = client.portal.call(lambda: enforcer.rt.gate.sign_in(user, **kw))
    return {"cookie": f"{enforcer.cookies.name}={sid}"}


def test_without_app_name_a_host_no_app_claims_is_400_not_the_laxer_defaults(tmp_path):
    clock = Clock(T0)
    app = tiny_app(write_apps_config(tmp_path), clock)
    with TestClient(app, base_url=f"https://{BILLING}", follow_redirects=False) as client:
        bob = signed_in(client, "bob", groups=("staff",))
        assert client.get("/billing/invoices", headers=bob).json() == {"reason": "forbidden"}
        for path in ("/billing/invoices", "/_lapse/session", "/_lapse/session/activity"):
            r = client.get(path, headers={**bob, "host": "anything.invalid"})
            assert (r.status_code, r.json()["error"]) == (400, "host"), path
        fiona = signed_in(client, "fiona", groups=("finance",))
        assert client.get("/billing/invoices", headers=fiona).status_code == 200
        clock.now += 30 * 60  # past billing's 5 minutes, within the defaults' 10
        assert client.get("/billing/invoices", headers={**fiona, "host": "x.invalid"}).status_code == 400
        r = client.get("/billing/invoices", headers=fiona)
        assert (r.status_code, r.json()) == (401, {"reason": "idle"})


def test_app_name_pins_the_app_and_several_apps_need_one(tmp_path):
    clock = Clock(T0)
    with TestClient(tiny_app(write_apps_config(tmp_path), clock, app_name="billing"), follow_redirects=False) as client:
        bob = signed_in(client, "bob", groups=("staff",))
        r = client.get("/billing/invoices", headers={**bob, "host": "anything.invalid"})
        assert (r.status_code, r.json()) == (403, {"reason": "forbidden"})  # billing's rules, whatever the Host
    with pytest.raises(ValueError, match=r"several \[\[apps\]\] \(billing, wiki\)"):  # at startup, not later
        with TestClient(tiny_app(write_apps_config(tmp_path, wiki=True), clock)):
            pass


class FullPathServer:
    """What ``uvicorn --root-path /billing`` hands the app: ``path`` holds ``root_path`` too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope, root_path="/billing", path="/billing" + scope["path"])
        await self.app(scope, receive, send)


def test_asgi_and_wsgi_judge_the_same_public_path_under_a_mount(tmp_path):
    """POST https://billing.example.test/billing/admin/refund, the app mounted at /billing: the step-up
    rule for /billing/admin/* holds under either ASGI convention and under WSGI's SCRIPT_NAME."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    from werkzeug.test import Client

    from lapse.middleware.wsgi import LapseWSGI

    path = write_apps_config(tmp_path, allow=False)
    seen = []
    clock = Clock(T0)
    for wrap, root in ((lambda a: a, "/billing"), (FullPathServer, "")):
        app = tiny_app(path, clock)
        with TestClient(wrap(app), base_url=f"https://{BILLING}", root_path=root, follow_redirects=False) as client:
            client.app = app
            fiona = signed_in(client, "fiona")
            r = client.post("/admin/refund", headers=fiona)
            seen.append((r.status_code, r.headers.get("x-lapse-reason")))
            assert client.post("/invoices", headers=fiona).status_code == 200
            assert client.get("/_lapse/session", headers=fiona).json()["user"] == "fiona"  # below the mount

    def answer(status: str):
        def wsgi_app(environ, start_response):
            start_response(status, [])
            return [status.encode()]
        return wsgi_app

    wsgi = LapseWSGI(answer("200 OK"), config=path, clock=clock)
    sid, _ = wsgi.bridge.run(lambda e: e.rt.gate.sign_in("fiona"))
    client = Client(DispatcherMiddleware(answer("404 Not Found"), {"/billing": wsgi}), use_cookies=False)
    cookie = {"cookie": f"{wsgi.bridge.enforcer.cookies.name}={sid}", "host": BILLING}
    r = client.post("/billing/admin/refund", headers=cookie)
    seen.append((r.status_code, r.headers.get("x-lapse-reason")))
    assert client.post("/billing/invoices", headers=cookie).status_code == 200
    assert client.get("/billing/_lapse/session", headers=cookie).json["user"] == "fiona"
    wsgi.bridge.close()
    assert seen == [(401, "step_up")] * 3


def test_app_logout_that_only_removes_the_user_ends_the_lapse_session(tmp_path):
    """Starlette's session cookie is signed, not stored: a copy taken before the logout still says
    "alice". The logout must end lapse's session, or that copy is a working login again."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def login(request):
        request.session["user"] = "alice"
        return PlainTextResponse("in")

    async def logout(request):
        request.session.pop("user", None)
        return PlainTextResponse("out")

    async def private(request):
        return PlainTextResponse(f"private for {request.session.get('user')}")

    clock = Clock(T0)
    app = Starlette(routes=[Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
                            Route("/private", private)],
                    middleware=[Middleware(SessionMiddleware, secret_key="k"),
                                Middleware(LapseMiddleware, config=config(tmp_path), mode="alongside",
                                           login_url="/login", clock=clock)])
    with TestClient(app, follow_redirects=False) as client:
        client.post("/login")
        assert client.get("/private").text == "private for alice"
        before_logout = client.cookies["session"]
        assert client.post("/logout").text == "out"
        assert [e["event"] for e in audit(tmp_path)][-1] == "session.revoked"
        assert audit(tmp_path)[-1]["reason"] == "logout"
        clock.now += 300
        client.cookies.clear()
        client.cookies.set("session", before_logout)
        r = client.get("/private")
        assert (r.status_code, r.json(), r.headers["x-lapse-reason"]) == (401, {"reason": "revoked"}, "revoked")
