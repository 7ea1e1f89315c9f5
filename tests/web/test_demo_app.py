"""The bundled Acme Billing demo upstream, and the lapse config that `lapse demo` runs it with."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # starlette.testclient needs it

with warnings.catch_warnings():  # starlette >= 1.x asks for httpx2 and only warns when it finds httpx
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient  # noqa: E402

from lapse.config import build_policy, parse_config  # noqa: E402
from lapse.demo import DEMO_CONFIG, create_demo_app, demo_config  # noqa: E402

PAGES = ["/", "/invoices", "/payments"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_demo_app())


@pytest.mark.parametrize("path", PAGES)
def test_page_renders_for_the_signed_in_user(client: TestClient, path: str) -> None:
    response = client.get(path, headers={"Remote-User": "alice"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "Acme Billing" in html and "Signed in as <strong>alice</strong>" in html
    assert '<script src="/_lapse/widget.js" defer></script>' in html
    assert re.search(rf'<a href="{re.escape(path)}" aria-current=page>', html)
    # sign out: a real form (works without JS), its token filled in from the passive session endpoint
    assert re.search(r'<form method="post" action="/_lapse/logout"><input type="hidden" name="csrf_token"', html)
    assert 'fetch("/_lapse/session"' in html and "csrf_token" in html
    # notifications: polled every 10 s, passively
    assert 'id="notif-count"' in html
    assert re.search(r'fetch\("/api/notifications", \{headers: \{"X-Lapse-Activity": "passive"\}', html)
    assert "setInterval(refresh, 10000)" in html


def test_pages_show_their_content(client: TestClient) -> None:
    assert "INV-1048" in client.get("/invoices").text and "<table>" in client.get("/invoices").text
    assert "Outstanding" in client.get("/").text
    assert "signs you out sooner" in client.get("/payments").text


def test_remote_user_is_escaped_and_optional(client: TestClient) -> None:
    html = client.get("/", headers={"Remote-User": "<b>mallory</b>"}).text
    assert "&lt;b&gt;mallory&lt;/b&gt;" in html and "<b>mallory" not in html
    assert "Not signed in" in client.get("/").text


def test_notifications_json(client: TestClient) -> None:
    response = client.get("/api/notifications", headers={"X-Lapse-Activity": "passive"})
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == len(body["items"]) >= 1
    assert all(isinstance(item["text"], str) and item["id"] for item in body["items"])
    assert response.headers["cache-control"] == "no-store"


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").text == "ok"


@pytest.mark.parametrize("state", [".lapse", "/tmp/lapse demo/state"])
def test_demo_config_loads_cleanly(tmp_path: Path, state: str) -> None:
    loaded = parse_config(demo_config(state), source="demo.toml", base_dir=tmp_path)
    assert loaded.warnings == []
    config = loaded.config
    assert config.server.mode == "proxy" and config.server.listen == "127.0.0.1:8080"
    assert str(config.server.upstream).rstrip("/") == "http://127.0.0.1:8081"
    assert config.server.inject_widget is True
    assert config.store.sqlite_path == tmp_path / state / "demo.db"
    assert config.server.secret_path == tmp_path / state / "secret"
    assert [app.name for app in config.apps] == ["payments", "acme"]

    policy = build_policy(config)
    payments = policy.resolve("127.0.0.1", "/payments")
    assert payments.limits.app == "payments" and payments.limits.idle == 30
    invoices = policy.resolve("localhost", "/invoices")
    assert (invoices.limits.app, invoices.limits.idle, invoices.limits.absolute) == ("acme", 60, 600)
    assert invoices.limits.warn_before == 30 and invoices.active
    assert not policy.resolve("127.0.0.1", "/api/notifications").active


def test_demo_config_placeholder_is_plain_format() -> None:
    assert DEMO_CONFIG.format(state="x").count("x/") == 2
