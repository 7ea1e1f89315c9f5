"""The gateway's Jinja2 pages: every template renders, says the right thing, and escapes what it is given."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import pytest
from jinja2 import Environment, FileSystemLoader, PackageLoader

import lapse

TEMPLATES = Path(lapse.__file__).parent / "web" / "templates"


def _env() -> Environment:
    try:  # what the gateway uses
        return Environment(loader=PackageLoader("lapse.web"), autoescape=True)
    except Exception:  # lapse.web not importable (yet): same folder, straight from disk
        return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)


ENV = _env()
XSS = '<script>alert("x")</script>'
LOGIN = {
    "reason": None,
    "message": None,
    "next": "/invoices",
    "csrf_token": "tok-123",
    "username": "",
    "need_totp": False,
    "step_up": False,
    "app": "acme",
    "action": "/_lapse/login",
}


def render(name: str, **context: object) -> str:
    return ENV.get_template(name).render(**context)


def text(html: str) -> str:
    """The visible text, roughly: tags dropped, entities decoded, whitespace collapsed."""
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", html, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", body)).split())


def tag(html: str, element: str, name: str) -> str:
    match = re.search(rf'<{element}\b[^>]*\b(?:name|id)="{name}"[^>]*>', html, flags=re.S)
    assert match, f"no <{element}> {name!r}"
    return match.group(0)


def role(html: str, value: str) -> str | None:
    match = re.search(rf'<(\w+)[^>]*role="{value}"[^>]*>(.*?)</\1>', html, flags=re.S)
    return " ".join(unescape(match.group(2)).split()) if match else None


def test_base_layout_is_self_contained_and_accessible() -> None:
    html = render("signed_out.html", login_url="/_lapse/login")
    assert html.startswith("<!doctype html>")
    assert '<html lang="en">' in html and 'name="viewport"' in html
    assert html.count("<style>") == 1 and "prefers-color-scheme: dark" in html and ":focus-visible" in html
    assert "<script" not in html and '<link rel="stylesheet"' not in html
    assert re.search(r"<title>Signed out</title>", html)


def test_login_form_fields() -> None:
    html = render("login.html", **LOGIN)
    form = re.search(r'<form method="post" action="/_lapse/login"', html)
    assert form
    for field in ("username", "password"):
        assert f'<label for="{field}">' in html and f'id="{field}"' in tag(html, "input", field)
    assert 'autocomplete="current-password"' in tag(html, "input", "password")
    assert 'type="hidden"' in tag(html, "input", "next") and 'value="/invoices"' in tag(html, "input", "next")
    assert 'value="tok-123"' in tag(html, "input", "csrf_token")
    assert 'name="totp"' not in html
    assert re.search(r'<button[^>]*type="submit"[^>]*>Sign in</button>', html)
    assert role(html, "status") is None and role(html, "alert") is None  # no reason, no error: just the form
    assert "Sign in to acme" in text(html)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("idle", "You were signed out after a period of inactivity."),
        ("absolute", "Your session reached its time limit. Please sign in again."),
        ("step_up", "This action needs you to confirm it's you."),
        ("revoked", "Your session was ended."),
        ("network", "Your network changed, so please sign in again."),
        ("signed_out", "You have been signed out."),
        ("missing", None),
        ("unknown", None),
        ("something-new", None),
    ],
)
def test_login_says_why(reason: str, expected: str | None) -> None:
    html = render("login.html", **{**LOGIN, "reason": reason})
    assert role(html, "status") == expected
    if expected:
        assert expected in html  # the literal text, not only its decoded form


def test_login_error_totp_and_prefill() -> None:
    html = render(
        "login.html", **{**LOGIN, "message": "Wrong user name or password", "username": "alice", "need_totp": True}
    )
    assert role(html, "alert") == "Wrong user name or password"
    assert 'value="alice"' in tag(html, "input", "username") and "readonly" not in tag(html, "input", "username")
    totp = tag(html, "input", "totp")
    assert 'inputmode="numeric"' in totp and 'autocomplete="one-time-code"' in totp
    assert '<label for="totp">' in html


def test_login_step_up_locks_the_username() -> None:
    html = render("login.html", **{**LOGIN, "reason": "step_up", "step_up": True, "username": "alice"})
    assert "readonly" in tag(html, "input", "username")
    assert role(html, "status") == "This action needs you to confirm it's you."
    assert "You're signed in as alice" in text(html)
    # step_up without a reason still explains itself
    html = render("login.html", **{**LOGIN, "step_up": True, "username": "alice"})
    assert role(html, "status") == "This action needs you to confirm it's you."


def test_login_minimal_context_renders() -> None:
    html = render("login.html")
    assert 'action="/_lapse/login"' in html and 'value="/"' in tag(html, "input", "next")


def test_login_escapes_everything_it_is_given() -> None:
    html = render(
        "login.html",
        **{**LOGIN, "username": XSS, "message": XSS, "next": '/x"><script>', "csrf_token": '"><script>', "app": XSS},
    )
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert text(html).count(XSS) >= 2  # shown as text, in the alert and the heading
    html = render("login.html", **{**LOGIN, "username": XSS, "step_up": True})
    assert "<script" not in html


def test_signed_out() -> None:
    html = render("signed_out.html", login_url="/_lapse/login?next=%2F")
    assert "You are signed out." in text(html)
    assert 'href="/_lapse/login?next=%2F"' in html
    assert 'href="/_lapse/login"' in render("signed_out.html", login_url="javascript:alert(1)")
    assert 'href="/_lapse/login"' in render("signed_out.html")


def test_unavailable_explains_without_internals() -> None:
    html = render("unavailable.html", retry_url="/invoices?page=2")
    words = text(html)
    assert "Sign-in service unavailable" in words and "protected" in words
    assert re.search(r'<a [^>]*href="/invoices\?page=2"[^>]*>Try again</a>', html)
    assert 'href="/"' in render("unavailable.html")
    assert 'href="/"' in render("unavailable.html", retry_url="//evil.example/")
    assert not re.search(r"sqlite|redis|traceback|exception|store", words, flags=re.I)


@pytest.mark.parametrize(
    ("context", "heading", "detail"),
    [
        ({"status": 403}, "Access denied", "You don't have access to this application."),
        ({"status": 400}, "Bad request", "The request could not be processed."),
        ({"status": 403, "heading": "Forbidden", "detail": XSS}, "Forbidden", XSS),
        ({}, "Something went wrong", "try again later"),
    ],
)
def test_error_page(context: dict[str, object], heading: str, detail: str) -> None:
    html = render("error.html", **context)
    assert f"<h1>{heading}</h1>" in html and detail in text(html)
    assert f"Error {context.get('status', 500)}" in text(html)
    assert "<script" not in html


def test_error_link_is_optional_and_safe() -> None:
    assert "<a " not in render("error.html", status=400)
    html = render("error.html", status=400, link_url="/", link_text="Back to the app")
    assert re.search(r'<a [^>]*href="/"[^>]*>Back to the app</a>', html)
    assert 'href="/"' in render("error.html", status=400, link_url="javascript:alert(1)")


def test_every_template_is_small() -> None:
    for path in TEMPLATES.glob("*.html"):
        assert len(path.read_text().splitlines()) < 120, path.name
