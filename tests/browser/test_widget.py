"""The countdown widget in a real Chromium (issue 4, CONTRACT.md §6): the warning at the right time, "Stay
signed in", tabs that agree, expiry to the login page, a frozen or throttled tab, and axe-core on the dialog.

Limits (conftest): idle 6 s, warning 4 s before, so the dialog opens about 2 s after the last activity.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ..support import in_ci

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - depends on the environment
    if in_ci():
        raise
    pytest.skip("playwright is not installed (pip install 'playwright>=1.45,<2'; never `playwright install`)",
                allow_module_level=True)

from .conftest import IDLE_S, PASSWORD, REPO, SHORT_ABSOLUTE_S, SHORT_WARN_S, USER, WARN_S, Gateway

DIALOG = "#lapse-widget [role=alertdialog]"
SCREENSHOT = REPO / "docs" / "widget-dialog.png"


def sign_in(page: Any, gateway: Gateway, target: str, base: str | None = None) -> float:
    """Open ``target``, get sent to the login page, sign in, land back; returns time.monotonic() on landing."""
    base = base or gateway.base_url
    page.goto(base + target)
    assert urlsplit(page.url).path == "/_lapse/login", f"expected the login page, got {page.url}\n{gateway.diag()}"
    page.fill("#username", USER)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + target)
    wait_js(page, "window.lapse.state().session !== null")
    return time.monotonic()


def wait_js(page: Any, expression: str, timeout: float = 15.0) -> None:
    """Poll an expression from here (Playwright's own wait_for_function polls with the page's timers,
    which a test may have paused with page.clock). Generous: it returns as soon as the expression holds,
    and a loaded CI machine can take seconds to run a page's first fetch."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }}"):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def open_tab(page: Any, gateway: Gateway, target: str) -> None:
    page.goto(gateway.base_url + target)
    wait_js(page, "window.lapse.state().session !== null")


def seconds_shown(page: Any) -> int:
    text = page.locator("#lapse-m").text_content() or ""
    m = re.search(r"(\d+) seconds", text)
    assert m, f"no countdown in the dialog text {text!r}"
    return int(m.group(1))


def passive_status(page: Any) -> dict[str, Any]:
    return page.evaluate(
        "async () => (await fetch('/_lapse/session?path=' + encodeURIComponent(location.pathname),"
        " {cache: 'no-store', headers: {'X-Lapse-Activity': 'passive'}})).json()"
    )


def login_target(url: str) -> tuple[str, str | None, str | None]:
    parts = urlsplit(url)
    q = parse_qs(parts.query)
    return parts.path, q.get("next", [None])[0], q.get("reason", [None])[0]


def test_widget_is_injected_and_served(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    sign_in(page, gateway, "/inject")
    assert page.locator('script[src="/_lapse/widget.js"]').count() == 1
    answer = page.request.get(gateway.base_url + "/_lapse/widget.js")
    assert answer.ok and answer.headers["content-type"].startswith("text/javascript")


def test_dialog_appears_at_warning_time_and_counts_down(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    landed = sign_in(page, gateway, "/app/dialog")
    dialog = page.locator(DIALOG)
    assert not dialog.is_visible(), "the dialog opened long before the warning time"
    expect(dialog).to_be_visible(timeout=int((IDLE_S - WARN_S + 3) * 1000))
    opened = time.monotonic() - landed
    assert 0.8 <= opened <= IDLE_S - WARN_S + 1.0, f"dialog opened {opened:.2f}s after sign-in, expected ~{IDLE_S - WARN_S}s"

    # what a screen reader needs: an alert dialog, modal, named and described, focus on "Stay signed in"
    assert dialog.get_attribute("aria-modal") == "true"
    assert page.locator("#lapse-t").text_content()
    expect(page.get_by_role("alertdialog")).to_have_accessible_name(re.compile(r"\S"))
    expect(page.get_by_role("button", name="Stay signed in")).to_be_focused()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    live = page.locator("#lapse-widget [aria-live=polite]")
    assert live.count() == 1

    first = seconds_shown(page)
    assert 1 <= first <= WARN_S
    page.wait_for_timeout(1100)
    second = seconds_shown(page)
    assert second < first, f"the countdown did not move: {first} then {second}"
    assert live.text_content() == "", "the live region must not repeat the countdown every second"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def test_stay_signed_in_extends_the_session(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    sign_in(page, gateway, "/app/stay")
    page.focus("#notes")  # focus without input: the dialog must give it back
    dialog = page.locator(DIALOG)
    expect(dialog).to_be_visible(timeout=5000)
    before = passive_status(page)
    assert before["idle_expires_in"] <= WARN_S + 0.5
    page.get_by_role("button", name="Stay signed in").click()
    expect(dialog).to_be_hidden(timeout=2000)
    after = passive_status(page)
    assert after["authenticated"] is True
    assert after["idle_expires_in"] > IDLE_S - 1.0, f"Stay did not extend the session: {after}"
    assert page.evaluate("document.activeElement && document.activeElement.id") == "notes", "focus not restored"


def test_escape_means_stay(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    sign_in(page, gateway, "/app/escape")
    dialog = page.locator(DIALOG)
    expect(dialog).to_be_visible(timeout=5000)
    page.keyboard.press("Tab")  # focus stays inside the dialog
    expect(page.get_by_role("button", name="Sign out")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Stay signed in")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden(timeout=2000)
    assert passive_status(page)["idle_expires_in"] > IDLE_S - 1.0


def test_stay_in_one_tab_closes_the_dialog_in_all(context: Any, gateway: Gateway) -> None:
    one, two = context.new_page(), context.new_page()
    sign_in(one, gateway, "/app/tabs")
    open_tab(two, gateway, "/app/tabs")
    expect(one.locator(DIALOG)).to_be_visible(timeout=5000)
    expect(two.locator(DIALOG)).to_be_visible(timeout=2000)
    two.get_by_role("button", name="Stay signed in").click()
    expect(two.locator(DIALOG)).to_be_hidden(timeout=2000)
    expect(one.locator(DIALOG)).to_be_hidden(timeout=1500)
    assert passive_status(one)["idle_expires_in"] > IDLE_S - 1.5


def test_input_in_one_tab_counts_for_all(context: Any, gateway: Gateway) -> None:
    one, two = context.new_page(), context.new_page()
    landed = sign_in(one, gateway, "/app/input")
    open_tab(two, gateway, "/app/other")
    time.sleep(max(0.0, landed + 1.2 - time.monotonic()))
    two.bring_to_front()
    two.click("#notes")
    two.keyboard.type("hello")
    # the original warning time (2 s after sign-in) passes: neither tab warns, the server was told
    time.sleep(max(0.0, landed + IDLE_S - WARN_S + 1.0 - time.monotonic()))
    assert not one.locator(DIALOG).is_visible()
    assert not two.locator(DIALOG).is_visible()
    assert passive_status(one)["idle_expires_in"] > WARN_S


def test_expiry_sends_every_tab_to_the_login_page(context: Any, gateway: Gateway) -> None:
    target = "/app/expire?x=1&y=two%20words"
    one, two = context.new_page(), context.new_page()
    landed = sign_in(one, gateway, target)
    open_tab(two, gateway, "/app/second")
    one.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=int((IDLE_S + 3) * 1000))
    took = time.monotonic() - landed
    assert took <= IDLE_S + 1.5, f"expiry took {took:.2f}s"
    assert login_target(one.url) == ("/_lapse/login", target, "idle")
    two.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=3000)
    assert login_target(two.url) == ("/_lapse/login", "/app/second", "idle")


def test_sign_out_posts_the_csrf_token(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    sign_in(page, gateway, "/app/signout")
    expect(page.locator(DIALOG)).to_be_visible(timeout=5000)
    with page.expect_request(lambda r: r.url.endswith("/_lapse/logout")) as posted:
        page.get_by_role("button", name="Sign out").click()
    assert posted.value.method == "POST"
    assert "csrf_token=" in (posted.value.post_data or "")
    page.wait_for_load_state()
    assert page.evaluate("document.body.innerText").lower().count("signed out") >= 1
    assert passive_status(page)["authenticated"] is False


def test_frozen_background_tab_expires_on_time(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    landed = sign_in(page, gateway, "/app/frozen")
    cdp = context.new_cdp_session(page)
    cdp.send("Page.setWebLifecycleState", {"state": "frozen"})  # no timers, no events: a discarded-ish tab
    time.sleep(max(0.0, landed + IDLE_S + 1.0 - time.monotonic()))
    cdp.send("Page.setWebLifecycleState", {"state": "active"})
    woke = time.monotonic()
    page.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=4000)
    assert time.monotonic() - woke < 3.0
    assert login_target(page.url) == ("/_lapse/login", "/app/frozen", "idle")


def test_throttled_timers_without_events_still_expire(context: Any, gateway: Gateway) -> None:
    """No server-sent events (blocked: the widget polls), and no timer runs for longer than the idle limit,
    as in a background tab under intensive throttling or a sleeping laptop: when timers run again, the page
    goes straight to the login page, without first showing a stale warning."""
    context.clock.install()
    page = context.new_page()
    page.route("**/_lapse/events*", lambda route: route.abort())
    landed = sign_in(page, gateway, "/app/throttled")
    wait_js(page, "window.lapse.state().polling === true")
    page.evaluate("""() => { window.__dialogs = 0;
      new MutationObserver(() => { if (window.lapse.state().shown) window.__dialogs++; })
        .observe(document.body, {subtree: true, childList: true, attributes: true}); }""")
    page.clock.pause_at(int(time.time() * 1000) + 50)  # timers stop; the page's clock stands still
    paused = time.monotonic()
    time.sleep(max(0.0, landed + IDLE_S + 1.0 - time.monotonic()))
    assert page.locator(DIALOG).count() == 0 or not page.locator(DIALOG).is_visible()
    page.clock.fast_forward(int((time.monotonic() - paused) * 1000))  # time jumps; due timers fire once
    page.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=4000)
    assert login_target(page.url) == ("/_lapse/login", "/app/throttled", "idle")


def test_dialog_passes_axe(context: Any, gateway: Gateway, axe_script: Path) -> None:
    page = context.new_page()
    sign_in(page, gateway, "/app/axe")
    expect(page.locator(DIALOG)).to_be_visible(timeout=5000)
    page.add_script_tag(path=str(axe_script))
    result = page.evaluate(
        "async () => { const r = await axe.run(document.querySelector('#lapse-widget'));"
        " return {violations: r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.map(n => n.html)})), passes: r.passes.map(p => p.id)}; }"
    )
    assert result["violations"] == [], result["violations"]
    for rule in ("aria-dialog-name", "color-contrast", "button-name"):
        assert rule in result["passes"], f"axe did not check {rule}: passes {result['passes']}"


def test_absolute_warning_says_when_and_no_click_moves_it(context: Any, gateway: Gateway) -> None:
    base = gateway.base_url.replace("127.0.0.1", "localhost")  # the app "short": absolute 9 s
    page = context.new_page()
    landed = sign_in(page, gateway, "/app/absolute", base=base)
    dialog = page.locator(DIALOG)
    expect(dialog).to_be_visible(timeout=int((SHORT_ABSOLUTE_S - SHORT_WARN_S + 2) * 1000))
    assert time.monotonic() - landed <= SHORT_ABSOLUTE_S - SHORT_WARN_S + 1.0
    text = page.locator("#lapse-m").text_content() or ""
    assert re.search(r"ends at \d{1,2}:\d{2}.*\(in \d+ seconds\)\. Save your work\.", text), text
    expect(page.get_by_role("button", name="Sign in again now")).to_be_focused()
    page.mouse.wheel(0, 200)  # input is activity, but nothing moves the absolute deadline
    page.wait_for_timeout(700)
    expect(dialog).to_be_visible()
    assert passive_status(page)["absolute_expires_in"] < SHORT_WARN_S
    page.get_by_role("button", name="Dismiss").click()
    expect(dialog).to_be_hidden()
    page.wait_for_timeout(1500)  # new deadlines keep arriving: the dismissed warning stays dismissed
    expect(dialog).to_be_hidden()
    page.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=int((SHORT_ABSOLUTE_S + 2) * 1000))
    assert time.monotonic() - landed <= SHORT_ABSOLUTE_S + 1.5
    assert login_target(page.url) == ("/_lapse/login", "/app/absolute", "absolute")


# ------------------------------------------------ only real user activity extends a session (§6)

SCROLLS_ITSELF = """() => { const d = document.createElement('div'); d.style.height = '100000px';
    document.body.appendChild(d); setInterval(() => window.scrollBy(0, 5), 500); }"""


def activity_posts(page: Any) -> list[str]:
    """The active heartbeats the page sends from now on."""
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" and "/_lapse/session/activity" in r.url
            else None)
    return posts


def test_a_page_that_scrolls_itself_is_signed_out_at_the_idle_deadline(context: Any, gateway: Gateway) -> None:
    """An auto-scrolling log or a carousel is no user: programmatic scrolling, and the pointer moves
    Chromium synthesises when the content slides under a resting pointer, extend nothing."""
    page = context.new_page()
    posts = activity_posts(page)
    page.mouse.move(300, 300)  # before the page with the widget: the pointer rests over it, unmoved
    landed = sign_in(page, gateway, "/app/scrolls")
    page.evaluate(SCROLLS_ITSELF)
    while urlsplit(page.url).path != "/_lapse/login" and time.monotonic() - landed < IDLE_S + 3:
        page.mouse.move(300, 300)  # what Chromium does when content moves under a resting pointer: no movement
        page.wait_for_timeout(300)
    page.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=1000)
    took = time.monotonic() - landed
    assert took <= IDLE_S + 1.5, f"expiry took {took:.2f}s"
    assert login_target(page.url) == ("/_lapse/login", "/app/scrolls", "idle")
    assert posts == []


def test_a_wheel_and_keyboard_user_on_that_page_is_kept(context: Any, gateway: Gateway) -> None:
    page = context.new_page()
    posts = activity_posts(page)
    landed = sign_in(page, gateway, "/app/reads")
    page.evaluate(SCROLLS_ITSELF)
    page.mouse.move(300, 300)
    while time.monotonic() - landed < IDLE_S * 2:
        page.mouse.wheel(0, 120)
        page.wait_for_timeout(500)
        page.keyboard.press("ArrowDown")
        page.wait_for_timeout(500)
    assert urlsplit(page.url).path == "/app/reads"
    status = passive_status(page)
    assert status["authenticated"] is True and status["idle_expires_in"] > WARN_S
    assert posts, "real input sent no heartbeat"


def test_forged_peer_messages_do_not_keep_a_tab_alive(context: Any, gateway: Gateway) -> None:
    """Any script of the origin can post on the tabs' channel: an 'input' from far in the future, a
    non-number time, and a session body without a server time must not keep this tab sending heartbeats
    or freeze its countdown. A peer's input counts once, as of now: one heartbeat at most."""
    page = context.new_page()
    posts = activity_posts(page)
    landed = sign_in(page, gateway, "/app/forged")
    page.evaluate("""() => { const c = new BroadcastChannel('lapse');
        c.postMessage({t: 'input', at: Date.now() + 1e12, from: 'x'});
        c.postMessage({t: 'input', at: Infinity, from: 'x'});
        c.postMessage({t: 'beat', at: 'soon', from: 'x', p: location.pathname,
                       b: {authenticated: true, idle_expires_in: 1e9, absolute_expires_in: null}}); }""")
    wait_js(page, "window.lapse.state().lastInput > 0")
    assert page.evaluate("window.lapse.state().lastInput <= Date.now()")
    page.wait_for_url(re.compile(r"/_lapse/login\?"), timeout=int((2 * IDLE_S + 3) * 1000))
    took = time.monotonic() - landed
    assert took <= 2 * IDLE_S + 1.5, f"expiry took {took:.2f}s"
    assert login_target(page.url) == ("/_lapse/login", "/app/forged", "idle")
    assert len(posts) <= 1, posts
