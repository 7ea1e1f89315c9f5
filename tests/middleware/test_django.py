"""Django: the middleware alongside django.contrib.auth, and standalone, through Django's test client
with the store's clock in the test's hand; then under waitress with real short timeouts."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

os.environ["DJANGO_SETTINGS_MODULE"] = "examples.django_app.settings"
os.environ.setdefault("DJANGO_DB", str(Path(tempfile.mkdtemp(prefix="lapse-django-")) / "db.sqlite3"))

import django  # noqa: E402

django.setup()

import waitress  # noqa: E402
from django.contrib.auth.models import User as DjangoUser  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.template import Context, Template  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from lapse.identity import hash_password  # noqa: E402
from lapse.middleware.django import bridge_for  # noqa: E402
from lapse.store.base import User  # noqa: E402

from ..core.helpers import Clock  # noqa: E402
from ..support import free_port  # noqa: E402
from .common import ABSOLUTE, BILLING, IDLE, T0, csrf_field, set_cookies, write_apps_config  # noqa: E402
from .test_fastapi import HTML, audit, config  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def database():
    call_command("migrate", verbosity=0)
    if not DjangoUser.objects.filter(username="alice").exists():
        DjangoUser.objects.create_user("alice", password="wonderland")


def events(tmp_path: Path) -> list[tuple[str, str | None]]:
    return [(e["event"], e.get("reason")) for e in audit(tmp_path)]


@pytest.fixture
def site(tmp_path: Path, request):
    mode = getattr(request, "param", "alongside")
    clock = Clock(T0)
    options = {"config": str(config(tmp_path, store="sqlite:///lapse.db")), "mode": mode, "clock": clock}
    if mode == "standalone":
        options["public_paths"] = ["/"]
    with override_settings(LAPSE=options):
        client = Client(secure=True)  # https: the __Host- cookies are sent back
        client.clock, client.bridge = clock, bridge_for(options)
        yield client
        client.bridge.close()


def post_form(client: Client, path: str, data: dict[str, str]):
    """An urlencoded form, as browsers send it (Django's test client would send multipart)."""
    return client.post(path, urlencode(data), content_type="application/x-www-form-urlencoded")


def sign_in(client: Client) -> None:
    r = client.post("/login/", {"username": "alice", "password": "wonderland", "next": "/private/"})
    assert r.status_code == 302, r.content


def test_login_starts_a_lapse_session_and_activity_extends_up_to_absolute(site, tmp_path):
    sign_in(site)
    assert events(tmp_path) == [("session.created", None)]
    for _ in range(5):
        site.clock.now += IDLE - 1
        assert site.get("/private/").status_code == 200
    site.clock.now = T0 + ABSOLUTE
    r = site.get("/api/data")
    assert r.status_code == 401 and r.json() == {"reason": "absolute"}
    assert ("session.expired", "absolute") in events(tmp_path)


def test_idle_expiry_flushes_the_django_session(site, tmp_path):
    sign_in(site)
    key = site.session.session_key
    site.clock.now += IDLE
    r = site.get("/private/", headers=HTML)
    assert r.status_code == 303 and r["Location"] == "/login/?next=/private/&reason=idle"
    assert site.session.session_key != key and "_auth_user_id" not in site.session  # logout() flushed it
    assert site.get("/private/")["Location"].startswith("/login/?next=/private/")  # Django's own redirect now
    assert sorted(events(tmp_path)) == [("session.created", None), ("session.denied", "idle"),
                                        ("session.expired", "idle")]


def test_passive_never_extends(site):
    sign_in(site)
    site.clock.now += IDLE - 5
    assert site.get("/api/poll").json() == {"user": "alice", "news": []}
    assert site.get("/private/", headers={"x-lapse-activity": "passive"}).status_code == 200
    assert site.get("/_lapse/session?path=/private/").json()["idle_expires_in"] == pytest.approx(5, abs=0.01)
    site.clock.now += 5
    assert site.get("/api/data").json() == {"reason": "idle"}


def test_session_api_csrf_logout_and_relogin(site, tmp_path):
    sign_in(site)
    body = site.get("/_lapse/session").json()
    assert body["authenticated"] and body["user"] == "alice"
    site.clock.now += 300
    assert site.post("/_lapse/session/activity").status_code == 403
    ok = site.post("/_lapse/session/activity", headers={"x-csrf-token": body["csrf_token"]})
    assert ok.status_code == 200 and ok.json()["idle_expires_in"] == IDLE
    first = site.session["_lapse_session"]
    sign_in(site)  # login() again: a new lapse session, the old one ends
    assert site.session["_lapse_session"] != first and ("session.revoked", "reauth") in events(tmp_path)
    assert site.post("/logout/").status_code == 302  # the app's own logout()
    assert events(tmp_path)[-1] == ("session.revoked", "logout")
    sign_in(site)
    token = site.get("/_lapse/session").json()["csrf_token"]
    assert post_form(site, "/_lapse/logout", {"csrf_token": "bad"}).status_code == 403
    assert post_form(site, "/_lapse/logout", {"csrf_token": token}).status_code == 303  # the widget's sign-out
    assert "_auth_user_id" not in site.session
    assert events(tmp_path).count(("session.revoked", "logout")) == 2


def test_widget_tag_and_script(site):
    sign_in(site)
    assert '<script src="/_lapse/widget.js" defer></script>' in site.get("/private/").content.decode()
    assert site.get("/_lapse/widget.js").status_code == 200
    # A value from the context is escaped (a literal in the template is the author's own, Django trusts it).
    tag = Template('{% load lapse %}{% lapse_widget text_idle="Encore là ?" nonce=n %}').render(Context({"n": "n<1"}))
    assert tag == '<script src="/_lapse/widget.js" defer data-text-idle="Encore là ?" nonce="n&lt;1"></script>'
    # Under a mount, lapse's endpoints are below it: the tag loads the script and talks to them there.
    mounted = Template('{% load lapse %}{% lapse_widget root=r %}').render(Context({"r": "/billing/"}))
    assert mounted == '<script src="/billing/_lapse/widget.js" defer data-base="/billing/_lapse"></script>'


def test_store_down_fails_closed(site):
    sign_in(site)
    site.bridge.run(lambda e: e.rt.store.close())
    r = site.get("/api/data")
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


@pytest.mark.parametrize("site", ["standalone"], indirect=True)
def test_standalone_login_forged_cookie_and_idle(site, tmp_path):
    site.bridge.run(lambda e: e.rt.store.put_user(User("alice", hash_password("wonderland"))))
    assert site.get("/private/", headers=HTML)["Location"] == "/_lapse/login?next=/private/&reason=missing"
    page = site.get("/_lapse/login?next=/private/")
    r = post_form(site, "/_lapse/login", {"username": "alice", "password": "wonderland", "next": "/private/",
                                    "csrf_token": csrf_field(page.content.decode())})
    assert r.status_code == 303
    cookie = r.cookies["__Host-lapse"]
    assert cookie["secure"] and cookie["httponly"] and cookie["path"] == "/"
    assert site.get("/api/data").status_code == 200
    forged = Client(secure=True)
    forged.cookies["__Host-lapse"] = "C" * 43
    assert forged.get("/api/data").status_code == 401
    assert ("session.denied", "unknown") in events(tmp_path)
    site.clock.now += IDLE
    assert site.get("/api/data").json() == {"reason": "idle"}


def test_real_waitress_with_short_timeouts(tmp_path):
    path = config(tmp_path)
    path.write_text(path.read_text().replace('idle = "10m"', 'idle = "2s"').replace('"1m"', '"1s"'))
    options = {"config": str(path), "mode": "alongside"}
    with override_settings(LAPSE=options):
        port = free_port()
        server = waitress.create_server(get_wsgi_application(), host="127.0.0.1", port=port, threads=4)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=False) as c:
                form = c.get("/login/")
                token = form.cookies.get("__Host-csrftoken") or set_cookies(form.headers)["__Host-csrftoken"]
                r = c.post("/login/", data={"username": "alice", "password": "wonderland", "next": "/private/",
                                            "csrfmiddlewaretoken": token},
                           headers={"cookie": f"__Host-csrftoken={token}", "referer": f"http://127.0.0.1:{port}/"})
                assert r.status_code == 302, r.text
                jar = {"cookie": f"__Host-sessionid={set_cookies(r.headers)['__Host-sessionid']}"}
                assert c.get("/private/", headers=jar).status_code == 200
                time.sleep(1.2)
                assert c.get("/private/", headers=jar).status_code == 200
                time.sleep(1.2)
                assert c.get("/private/", headers=jar).status_code == 200  # kept alive by activity
                time.sleep(2.2)
                gone = c.get("/private/", headers={**jar, **HTML})
                assert gone.status_code == 303 and gone.headers["location"].endswith("reason=idle")
            assert ("session.expired", "idle") in [(e["event"], e.get("reason")) for e in audit(tmp_path)]
        finally:
            server.close()
            bridge_for(options).close()


# ------------------------------------------- whose policy: the Host header, the mount


@pytest.fixture
def billing_site(tmp_path: Path, request):
    """Alongside, with a billing app in lapse.toml and no ``app`` in LAPSE; Django itself accepts any Host."""
    clock = Clock(T0)
    options = {"config": str(write_apps_config(tmp_path, allow=request.param)), "clock": clock}
    with override_settings(LAPSE=options, ALLOWED_HOSTS=["*"]):
        client = Client(secure=True)
        client.clock, client.bridge = clock, bridge_for(options)
        yield client
        client.bridge.close()


@pytest.mark.parametrize("billing_site", [True], indirect=True)
def test_without_app_a_host_no_app_claims_is_400_not_the_laxer_defaults(billing_site):
    r = billing_site.post("/login/", {"username": "alice", "password": "wonderland", "next": "/"}, HTTP_HOST=BILLING)
    assert r.status_code == 302
    r = billing_site.get("/api/data", HTTP_HOST=BILLING)  # alice is not in group:finance
    assert (r.status_code, r.json()) == (403, {"reason": "forbidden"})
    for path in ("/api/data", "/_lapse/session"):
        r = billing_site.get(path, HTTP_HOST="anything.invalid")
        assert (r.status_code, r.json()["error"]) == (400, "host"), path


def test_several_apps_without_app_fail_at_startup(tmp_path):
    with pytest.raises(ValueError, match=r"several \[\[apps\]\] \(billing, wiki\).*LAPSE\['app'\]"):
        bridge_for({"config": str(write_apps_config(tmp_path, wiki=True))})


@pytest.mark.parametrize("billing_site", [False], indirect=True)
def test_a_mounted_django_project_is_judged_by_its_public_path(billing_site):
    """Served at /billing (SCRIPT_NAME): POST /billing/admin/refund meets the step-up rule for
    /billing/admin/*; lapse's own endpoints live below the mount."""
    mount = {"SCRIPT_NAME": "/billing", "HTTP_HOST": BILLING}
    r = billing_site.post("/login/", {"username": "alice", "password": "wonderland", "next": "/"}, **mount)
    assert r.status_code == 302
    assert billing_site.get("/api/data", **mount).json() == {"user": "alice"}
    assert billing_site.get("/_lapse/session", **mount).json()["user"] == "alice"
    r = billing_site.post("/admin/refund", **mount)
    assert (r.status_code, r.json(), r["X-Lapse-Reason"]) == (401, {"reason": "step_up"}, "step_up")
