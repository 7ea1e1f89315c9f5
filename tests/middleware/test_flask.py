"""Flask: the alongside extension with Flask-Login and the standalone WSGI middleware, through Flask's
test client with the store's clock in the test's hand; then under waitress with real short timeouts."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import waitress
from werkzeug.test import Client

from examples.flask_app.app import create_app
from lapse.identity import hash_password
from lapse.store.base import User

from ..core.helpers import Clock
from ..support import free_port
from .common import ABSOLUTE, BILLING, IDLE, T0, csrf_field, set_cookies, write_apps_config
from .test_fastapi import HTML, audit, config


def events(tmp_path: Path) -> list[tuple[str, str | None]]:
    return [(e["event"], e.get("reason")) for e in audit(tmp_path)]


@pytest.fixture
def alongside(tmp_path: Path):
    clock = Clock(T0)
    app = create_app(config(tmp_path, store="sqlite:///lapse.db"), mode="alongside", clock=clock)
    client = app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    client.clock, client.app_ = clock, app
    yield client
    app.extensions["lapse"].bridge.close()


def sign_in(client, user: str = "alice", password: str = "wonderland"):
    r = client.post("/login", data={"username": user, "password": password, "next": "/private"})
    assert r.status_code == 303, r.text
    return r


def test_login_opens_a_lapse_session_at_once_and_activity_extends(alongside, tmp_path):
    sign_in(alongside)
    assert events(tmp_path) == [("session.created", None)]  # at the login itself: absolute counts from it
    for _ in range(5):
        alongside.clock.now += IDLE - 1
        assert alongside.get("/private").status_code == 200
    alongside.clock.now = T0 + ABSOLUTE
    r = alongside.get("/api/data")
    assert r.status_code == 401 and r.json == {"reason": "absolute"}
    assert ("session.expired", "absolute") in events(tmp_path)


def test_idle_expiry_signs_out_through_flask_login(alongside, tmp_path):
    sign_in(alongside)
    alongside.clock.now += IDLE
    r = alongside.get("/private", headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/private&reason=idle"
    with alongside.session_transaction() as s:
        assert "_user_id" not in s and "_lapse_session" not in s  # logout_user ran
    assert alongside.get("/private").headers["location"] == "/login?next=/private"  # the app sees nobody
    assert sorted(events(tmp_path)) == [("session.created", None), ("session.denied", "idle"),
                                        ("session.expired", "idle")]


def test_passive_never_extends(alongside):
    sign_in(alongside)
    alongside.clock.now += IDLE - 5
    assert alongside.get("/api/poll").json == {"user": "alice", "news": []}
    assert alongside.get("/private", headers={"x-lapse-activity": "passive"}).status_code == 200
    assert alongside.get("/_lapse/session").json["idle_expires_in"] == pytest.approx(5, abs=0.01)
    alongside.clock.now += 5
    assert alongside.get("/api/data").json == {"reason": "idle"}


def test_activity_endpoint_csrf_and_events_not_streamed(alongside):
    sign_in(alongside)
    body = alongside.get("/_lapse/session?path=/private").json
    assert body["authenticated"] and body["user"] == "alice"
    alongside.clock.now += 300
    assert alongside.post("/_lapse/session/activity").status_code == 403
    ok = alongside.post("/_lapse/session/activity", headers={"x-csrf-token": body["csrf_token"]})
    assert ok.status_code == 200 and ok.json["idle_expires_in"] == IDLE
    assert "__Host-lapse" not in ok.headers.get("set-cookie", "")  # alongside: no lapse cookie
    assert alongside.get("/_lapse/events").status_code == 404  # the widget then polls


def test_app_logout_and_widget_logout(alongside, tmp_path):
    sign_in(alongside)
    assert alongside.post("/logout").status_code == 303
    assert events(tmp_path)[-1] == ("session.revoked", "logout")
    sign_in(alongside)
    token = alongside.get("/_lapse/session").json["csrf_token"]
    assert alongside.post("/_lapse/logout", data={"csrf_token": "nope"}).status_code == 403
    r = alongside.post("/_lapse/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].startswith("/login?")
    with alongside.session_transaction() as s:
        assert "_user_id" not in s
    assert events(tmp_path).count(("session.revoked", "logout")) == 2


def test_login_again_issues_a_new_lapse_session(alongside, tmp_path):
    sign_in(alongside)
    with alongside.session_transaction() as s:
        first = s["_lapse_session"]
    sign_in(alongside)
    with alongside.session_transaction() as s:
        assert s["_lapse_session"] != first
    assert ("session.revoked", "reauth") in events(tmp_path)


def test_a_cross_site_get_of_lapse_login_ends_nothing(alongside, tmp_path):
    """L5: through the WSGI adapter too: a GET asks, only a POST with the session's CSRF token signs out."""
    sign_in(alongside)
    page = alongside.get("/_lapse/login?next=/private")
    assert page.status_code == 200 and "Sign in again?" in page.text
    assert alongside.get("/private").status_code == 200
    assert ("session.revoked", "reauth") not in events(tmp_path)
    assert alongside.post("/_lapse/login?next=/private", data={"csrf_token": "nope"}).status_code == 403
    r = alongside.post("/_lapse/login?next=/private", data={"csrf_token": csrf_field(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/private"
    with alongside.session_transaction() as s:
        assert "_user_id" not in s
    assert events(tmp_path)[-1] == ("session.revoked", "reauth")


def test_widget_in_the_page_and_served(alongside):
    sign_in(alongside)
    assert '<script src="/_lapse/widget.js" defer></script>' in alongside.get("/private").text
    js = alongside.get("/_lapse/widget.js")
    assert js.status_code == 200 and b"alertdialog" in js.data


def test_store_down_fails_closed(alongside):
    sign_in(alongside)
    alongside.app_.extensions["lapse"].bridge.run(lambda e: e.rt.store.close())
    r = alongside.get("/api/data")
    assert r.status_code == 503 and r.json["error"] == "unavailable"
    assert alongside.get("/_lapse/session").status_code == 503


# ------------------------------------------------------------------ standalone


@pytest.fixture
def standalone(tmp_path: Path):
    clock = Clock(T0)
    app = create_app(config(tmp_path), mode="standalone", clock=clock)
    app.wsgi_app.bridge.run(lambda e: e.rt.store.put_user(User("alice", hash_password("wonderland"))))
    client = app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    client.clock = clock
    yield client
    app.wsgi_app.bridge.close()


def test_standalone_login_forgery_and_expiry(standalone, tmp_path):
    assert standalone.get("/private", headers=HTML).headers["location"] == "/_lapse/login?next=/private&reason=missing"
    page = standalone.get("/_lapse/login?next=/private")
    r = standalone.post("/_lapse/login", data={"username": "alice", "password": "wonderland", "next": "/private",
                                               "csrf_token": csrf_field(page.text)})
    assert r.status_code == 303 and r.headers["set-cookie"].startswith("__Host-lapse=")
    sid = set_cookies(r.headers)["__Host-lapse"]
    assert "Hello alice" in standalone.get("/private").text
    fresh = create_client_without_cookies(standalone)
    for forged in ("B" * 43, "<script>", "x" * 4000):
        fresh.set_cookie("__Host-lapse", forged, domain="localhost")
        assert fresh.get("/api/data").status_code == 401
    assert events(tmp_path).count(("session.denied", "unknown")) == 3
    standalone.clock.now += IDLE
    assert standalone.get("/api/data").json == {"reason": "idle"}
    assert sid and ("session.expired", "idle") in events(tmp_path)


def create_client_without_cookies(client):
    other = client.application.test_client()
    other.environ_base["wsgi.url_scheme"] = "https"
    return other


# ----------------------------------------------------------------- real server


def test_real_waitress_with_short_timeouts(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text().replace('idle = "10m"', 'idle = "2s"').replace('"1m"', '"1s"'))
    app = create_app(path, mode="alongside")
    port = free_port()
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=False) as c:
            r = c.post("/login", data={"username": "alice", "password": "wonderland", "next": "/private"})
            jar = {"cookie": f"__Host-session={set_cookies(r.headers)['__Host-session']}"}
            assert c.get("/private", headers=jar).status_code == 200
            time.sleep(1.2)
            assert c.get("/private", headers=jar).status_code == 200
            time.sleep(1.2)
            assert c.get("/private", headers=jar).status_code == 200  # kept alive by activity
            time.sleep(2.2)
            gone = c.get("/private", headers={**jar, **HTML})
            assert gone.status_code == 303 and gone.headers["location"].endswith("reason=idle")
        assert ("session.expired", "idle") in events(tmp_path)
    finally:
        server.close()
        app.extensions["lapse"].bridge.close()


# ------------------------------------------- whose policy: the Host header, the mount


def apps_client(tmp_path: Path, *, allow: bool = True, mode: str = "alongside"):
    clock = Clock(T0)
    app = create_app(write_apps_config(tmp_path, allow=allow), mode=mode, clock=clock)
    client = app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    client.clock, client.app_ = clock, app
    return client


def lapse_of(client):
    return client.app_.extensions["lapse"] if "lapse" in client.app_.extensions else client.app_.wsgi_app


def test_without_app_name_a_host_no_app_claims_is_400_not_the_laxer_defaults(tmp_path):
    client = apps_client(tmp_path)
    billing, elsewhere = {"Host": BILLING}, {"Host": "anything.invalid"}
    r = client.post("/login", data={"username": "alice", "password": "wonderland", "next": "/"}, headers=billing)
    assert r.status_code == 303
    r = client.get("/api/data", headers=billing)  # alice is not in group:finance
    assert (r.status_code, r.json) == (403, {"reason": "forbidden"})
    for path in ("/api/data", "/_lapse/session"):
        r = client.get(path, headers=elsewhere)
        assert (r.status_code, r.json["error"]) == (400, "host"), path
    lapse_of(client).bridge.close()


def test_standalone_wsgi_refuses_an_unclaimed_host_and_several_apps_need_a_name(tmp_path):
    wsgi = apps_client(tmp_path, mode="standalone").app_.wsgi_app
    client = Client(wsgi, use_cookies=False)  # the Cookie header as given
    sid, _ = wsgi.bridge.run(lambda e: e.rt.gate.sign_in("bob", groups=("staff",)))
    cookie = f"{wsgi.bridge.enforcer.cookies.name}={sid}"
    r = client.get("/api/data", headers={"Host": BILLING, "Cookie": cookie})
    assert (r.status_code, r.json) == (403, {"reason": "forbidden"})
    r = client.get("/api/data", headers={"Host": "anything.invalid", "Cookie": cookie})
    assert (r.status_code, r.json["error"]) == (400, "host")
    wsgi.bridge.close()
    with pytest.raises(ValueError, match=r"several \[\[apps\]\] \(billing, wiki\)"):
        create_app(write_apps_config(tmp_path, wiki=True), mode="alongside")


def test_a_mounted_flask_app_is_judged_by_its_public_path(tmp_path):
    """Mounted at /billing: POST /billing/admin/refund meets the step-up rule for /billing/admin/*
    (judged as /admin/refund it would not); lapse's own endpoints live below the mount."""
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    client = apps_client(tmp_path, allow=False)
    flask_app = client.app_
    site = DispatcherMiddleware(lambda environ, start_response: start_response("404 Not Found", []) or [b""],
                                {"/billing": flask_app.wsgi_app})
    flask_app.wsgi_app = site  # the test client calls app.wsgi_app: now the whole site
    billing = {"Host": BILLING}
    r = client.post("/billing/login", data={"username": "alice", "password": "wonderland", "next": "/"},
                    headers=billing)
    assert r.status_code == 303
    assert client.get("/billing/api/data", headers=billing).json == {"user": "alice"}
    assert client.get("/billing/_lapse/session", headers=billing).json["user"] == "alice"
    r = client.post("/billing/admin/refund", headers={**billing, "Accept": "text/html"})
    assert r.status_code == 303 and r.headers["Location"] == "/login?next=/billing/admin/refund&reason=step_up"
    flask_app.extensions["lapse"].bridge.close()


def test_wsgi_paths_are_script_name_plus_path_info_read_as_utf8():
    from lapse.middleware.asgi import paths
    from lapse.middleware.sync import url_path

    environ = {"SCRIPT_NAME": "/billing", "PATH_INFO": "/caf\u00c3\u00a9/x"}  # UTF-8 bytes as WSGI's latin-1
    assert url_path(environ) == ("/billing/caf\u00e9/x", "/billing")
    assert paths({"path": "/caf\u00e9/x", "root_path": "/billing"}) == url_path(environ)
    assert paths({"path": "/billing/caf\u00e9/x", "root_path": "/billing"}) == url_path(environ)
    assert url_path({"SCRIPT_NAME": "/b", "PATH_INFO": "/caf\u00e9"}, wsgi_strings=False) == ("/b/caf\u00e9", "/b")
