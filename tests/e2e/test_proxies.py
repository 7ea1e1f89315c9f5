"""deploy/nginx.conf and deploy/Caddyfile, as users copy them, in front of a real app with a real
`lapse serve`: every test runs once behind nginx and once behind Caddy (see conftest.py).

Real clocks, short limits: the app's idle limit is 3 s and its absolute limit 8 s. Timing bounds
are taken from the client's monotonic clock around the requests that set lapse's clocks; lapse may
judge a session idle early by at most min(1 s, 1% of the limit) = 30 ms here, never late.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from .conftest import (
    ABSOLUTE_S,
    GROUP,
    IDLE_S,
    PASSIVE_PATH,
    UNAVAILABLE_TEXT,
    USER,
    Browser,
    Stack,
    login_form,
    login_redirect,
)

EARLY = 0.05  # lapse may say "idle" up to 30 ms early, plus clock reading slack
LATE = 0.6  # scheduling slack for "the first request after the deadline is refused"


def _refused(stack: Stack, r: httpx.Response, reason: str, next_: str) -> None:
    """``r`` is the proxy's 303 to the login page, for ``next_``, saying ``reason``."""
    to = login_redirect(r)
    assert to is not None, f"expected a redirect to /_lapse/login (reason {reason})\n{stack.diag(r)}"
    assert r.status_code == 303, f"expected 303 See Other\n{stack.diag(r)}"
    assert to.reason == reason, f"reason={to.reason!r}, expected {reason!r}\n{stack.diag(r)}"
    assert to.next == next_, f"next={to.next!r}, expected {next_!r}\n{stack.diag(r)}"


def _served_as_alice(stack: Stack, r: httpx.Response, target: str) -> dict[str, Any]:
    assert r.status_code == 200, f"expected the app's page for {target}\n{stack.diag(r)}"
    body = r.json()
    assert body.get("app") == "e2e-upstream", f"not the app's answer\n{stack.diag(r)}"
    assert body["target"] == target, f"the app got {body['target']!r}, expected {target!r}\n{stack.diag(r)}"
    assert body["remote_user"] == [USER], f"the app got Remote-User {body['remote_user']!r}\n{stack.diag(r)}"
    return body


# --------------------------------------------------------------------------- signing in


def test_no_session_redirects_to_the_login_page(stack: Stack, browser: Browser) -> None:
    target = "/reports/q?a=1&b=2"
    r = browser.get(target)
    _refused(stack, r, "missing", target)
    assert not stack.upstream.saw("/reports/q"), "the app was reached without a session"

    page = browser.get(r.headers["location"])
    assert page.status_code == 200, f"the login page, through the proxy\n{stack.diag(page)}"
    assert "text/html" in page.headers.get("content-type", ""), stack.diag(page)
    assert login_form(page.text) is not None, f"no login form\n{stack.diag(page)}"


def test_an_unknown_cookie_is_cleared_on_the_way_to_the_login_page(stack: Stack, browser: Browser) -> None:
    """CONTRACT §4: a request with a session lapse no longer knows gets the cookie cleared."""
    browser.jar["__Host-lapse"] = "F" * 43
    r = browser.get("/reports")
    _refused(stack, r, "unknown", "/reports")
    assert "__Host-lapse" not in browser.jar, f"the cookie was not cleared\n{stack.diag(r)}"


def test_login_leads_to_the_page_as_alice(stack: Stack, browser: Browser) -> None:
    target = "/e2e/welcome?a=1&b=2"
    page = browser.login(target, stack=stack)
    body = _served_as_alice(stack, page, target)
    assert body["remote_groups"] == [GROUP], f"Remote-Groups {body['remote_groups']!r}\n{stack.diag(page)}"
    assert len(body["expires_in"]) == 1 and 0 <= int(body["expires_in"][0]) <= ABSOLUTE_S, stack.diag(page)

    again = browser.get("/e2e/second")
    _served_as_alice(stack, again, "/e2e/second")


@pytest.mark.parametrize(
    "target",
    [
        "/search?q=a%26b&x=1+2&y=%2Fz%3Dw",  # encoded '&', '=', '/' and a '+' inside values
        "/caf%C3%A9/r%C3%A9sum%C3%A9?lang=fr&sort=-date&sort=name",
        "/p/x?a=1&empty=&flag",
    ],
    ids=["encoded-values", "utf8-path", "blank-values"],
)
def test_next_survives_the_round_trip(stack: Stack, browser: Browser, target: str) -> None:
    page = browser.login(target, stack=stack)  # asserts next at each step
    _served_as_alice(stack, page, target)


def test_forward_auth_endpoint_is_not_public(stack: Stack, browser: Browser) -> None:
    r = browser.get("/_lapse/auth", headers={"X-Original-URI": "/x", "X-Forwarded-Uri": "/x"})
    assert r.status_code == 404, f"/_lapse/auth is for the proxy's own subrequests\n{stack.diag(r)}"


# --------------------------------------------------------------------------- identity headers


def test_spoofed_identity_headers_never_reach_the_app(stack: Stack, browser: Browser) -> None:
    spoof = {
        "Remote-User": "mallory",
        "Remote-Groups": "admins",
        "X-Lapse-Expires-In": "99999",
        "Remote_User": "mallory",  # read as REMOTE_USER by CGI/WSGI servers
        "X-Original-URI": "/elsewhere",  # the original request is the proxy's to tell
        "X-Forwarded-Uri": "/elsewhere",
        "X-Original-Method": "OPTIONS",
        "X-Forwarded-Method": "OPTIONS",
    }
    r = browser.get("/spoof/anon?x=1", headers=spoof)
    _refused(stack, r, "missing", "/spoof/anon?x=1")
    assert not stack.upstream.saw("/spoof/anon"), "a spoofed Remote-User got a request through"

    browser.login("/spoof/start", stack=stack)
    r = browser.get("/spoof/signed-in", headers=spoof)
    body = _served_as_alice(stack, r, "/spoof/signed-in")
    assert body["remote_groups"] == [GROUP], f"Remote-Groups {body['remote_groups']!r}\n{stack.diag(r)}"
    assert body["expires_in"] != ["99999"], f"X-Lapse-Expires-In passed through from the client\n{stack.diag(r)}"
    assert body["remote_user_underscore"] == [], f"Remote_User reached the app\n{stack.diag(r)}"


# --------------------------------------------------------------------------- idle and absolute


@pytest.mark.parametrize("how", ["header", "path"])
def test_passive_polling_lets_the_session_die_at_the_idle_deadline(stack: Stack, browser: Browser, how: str) -> None:
    """Polling every 0.5 s, marked passive (by the X-Lapse-Activity header, or by a path in
    passive_paths), is served but never keeps the session: it ends for the app at the idle
    deadline, and an active request afterwards cannot revive it."""
    tag = secrets.token_hex(4)
    if how == "header":
        poll_path, headers = f"/dashboard/feed-{tag}", {"X-Lapse-Activity": "passive"}
    else:
        poll_path, headers = f"{PASSIVE_PATH}/notifications-{tag}", {}
    browser.login(f"/idle/start-{tag}", stack=stack)

    t0 = time.monotonic()  # the last active request: lapse's idle clock starts in [t0, t1]
    _served_as_alice(stack, browser.get(f"/idle/active-{tag}"), f"/idle/active-{tag}")
    t1 = time.monotonic()

    served: list[str] = []
    n = 0
    while True:
        n += 1
        when = t1 + 0.5 * n
        time.sleep(max(0.0, when - time.monotonic()))
        target = f"{poll_path}?n={n}"
        sent = time.monotonic()
        r = browser.get(target, headers=headers)
        got = time.monotonic()
        if r.status_code == 200:
            _served_as_alice(stack, r, target)
            served.append(target)
            assert sent < t1 + IDLE_S + EARLY, (
                f"a passive poll {sent - t1:.2f}s after the last activity was still served (idle limit {IDLE_S}s)\n"
                f"{stack.diag(r)}"
            )
            continue
        assert got >= t0 + IDLE_S - EARLY, (
            f"refused {got - t0:.2f}s after the last activity, before the {IDLE_S}s idle limit\n{stack.diag(r)}"
        )
        assert sent <= t1 + IDLE_S + LATE, f"refused only {sent - t1:.2f}s after the last activity\n{stack.diag(r)}"
        _refused(stack, r, "idle", target)
        break
    assert len(served) >= int(IDLE_S / 0.5) - 1, f"only {len(served)} passive polls were served before the deadline"
    assert [s.target for s in stack.upstream.saw(poll_path)] == served, "a refused poll reached the app"

    # An active request cannot bring it back.
    r = browser.get(f"/idle/after-{tag}")
    _refused(stack, r, "idle", f"/idle/after-{tag}")
    assert not stack.upstream.saw(f"/idle/after-{tag}")
    page = browser.get(r.headers["location"])
    assert page.status_code == 200 and login_form(page.text) is not None, stack.diag(page)


def test_active_use_keeps_the_session_to_the_absolute_limit_and_no_further(stack: Stack, browser: Browser) -> None:
    """An active request every second keeps the idle clock (3 s) fresh well past it, up to the
    absolute limit (8 s from sign-in), and not one moment longer."""
    tag = secrets.token_hex(4)
    browser.login(f"/abs/start-{tag}", stack=stack)
    a0, a1 = browser.signed_in_between  # lapse's auth_time is in here

    # every second, then every quarter second around the deadline, to pin it down
    schedule = [float(s) for s in range(1, int(ABSOLUTE_S))] + [ABSOLUTE_S - 0.5 + 0.25 * i for i in range(12)]
    served = 0
    for n, offset in enumerate(schedule, 1):
        time.sleep(max(0.0, a1 + offset - time.monotonic()))
        target = f"/abs/work-{tag}?n={n}"
        sent = time.monotonic()
        r = browser.get(target)
        got = time.monotonic()
        if r.status_code == 200:
            _served_as_alice(stack, r, target)
            served += 1
            assert sent < a1 + ABSOLUTE_S + EARLY, (
                f"still served {sent - a1:.2f}s after sign-in (absolute limit {ABSOLUTE_S}s)\n{stack.diag(r)}"
            )
            continue
        assert got >= a0 + ABSOLUTE_S - EARLY, (
            f"refused {got - a0:.2f}s after sign-in, before the {ABSOLUTE_S}s absolute limit "
            f"(activity every second should keep the {IDLE_S}s idle clock fresh)\n{stack.diag(r)}"
        )
        assert sent <= a1 + ABSOLUTE_S + LATE, f"refused only {sent - a1:.2f}s after sign-in\n{stack.diag(r)}"
        _refused(stack, r, "absolute", target)
        break
    else:
        pytest.fail(f"still served {time.monotonic() - a1:.2f}s after sign-in (absolute limit {ABSOLUTE_S}s)")
    assert served >= int(ABSOLUTE_S) - 1, f"only {served} active requests were served"

    # No further: neither active nor passive requests get through any more.
    time.sleep(0.5)
    r = browser.get(f"/abs/later-{tag}")
    _refused(stack, r, "absolute", f"/abs/later-{tag}")
    r = browser.get(f"{PASSIVE_PATH}/abs-{tag}", headers={"X-Lapse-Activity": "passive"})
    _refused(stack, r, "absolute", f"{PASSIVE_PATH}/abs-{tag}")
    assert not stack.upstream.saw(f"/abs/later-{tag}") and not stack.upstream.saw(f"abs-{tag}")


# --------------------------------------------------------------------------- lapse unavailable


class _StubHandler(BaseHTTPRequestHandler):
    """lapse up but failing: every answer is a 503 (a store that cannot answer)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        body = b'{"error": "store unavailable"}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _failing_lapse(port: int) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", port), _StubHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _unavailable_page(stack: Stack, r: httpx.Response) -> None:
    assert r.status_code in (502, 503), f"expected the unavailable page (502/503)\n{stack.diag(r)}"
    assert UNAVAILABLE_TEXT in r.text, f"expected the {UNAVAILABLE_TEXT!r} page\n{stack.diag(r)}"
    assert "text/html" in r.headers.get("content-type", ""), stack.diag(r)
    assert "e2e-upstream" not in r.text, f"the app answered\n{stack.diag(r)}"


def test_lapse_down_gives_the_unavailable_page_never_the_app(stack: Stack, browser: Browser) -> None:
    tag = secrets.token_hex(4)
    browser.login(f"/down/start-{tag}", stack=stack)  # a live session: only lapse stands in the way

    stack.lapse.kill()
    try:
        for target in (f"/down/page-{tag}?x=1", f"{PASSIVE_PATH}/down-{tag}", "/_lapse/login?next=%2F"):
            _unavailable_page(stack, browser.get(target))
        # lapse running but unable to decide (its store down: 503) -- nginx would make that a 500
        with _failing_lapse(stack.lapse.port):
            _unavailable_page(stack, browser.get(f"/down/store-{tag}?x=1"))
        assert not stack.upstream.saw(f"-{tag}?x=1"), "the app was reached while lapse was down"
        assert not stack.upstream.saw(f"down-{tag}"), "the app was reached while lapse was down"
    finally:
        stack.lapse.start()

    # back up: lapse decides again (the session may have gone idle meanwhile)
    r = browser.get(f"/down/back-{tag}")
    assert r.status_code == 200 or login_redirect(r) is not None, stack.diag(r)
