"""The admin and self-service pages in real Chromium (issue 8; CONTRACT.md §4).

A lapse of its own (forward-auth mode, idle 1 h) with an admin ``root`` and
seeded sessions, one of them a script that pinged every minute through one
path (an automation suspect). Checks: login redirect, live countdowns that
tick, revoking a session with the page's own form (CSRF), the self-service
page ending another own session (ASVS 5.0 7.5.2), axe-core on both pages, no
CSP violation; screenshots go to docs/ (README "Admin and self-service pages").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lapse.config import load_config
from lapse.identity import hash_password
from lapse.runtime import open_runtime
from lapse.store.base import User

from ..support import free_port, port_open
from .conftest import REPO, tail

PASSWORD = "admin: correct horse battery staple"
DOCS = REPO / "docs"
CONFIG = """\
[server]
listen = "127.0.0.1:{port}"
secret_file = "secret"

[store]
url = "sqlite:///lapse.db"

[audit]
sinks = ["store"]

[report]
min_samples = 20

[defaults]
idle = "1h"
absolute = "12h"

[[apps]]
name = "billing"
hosts = ["billing.test"]
idle = "15m"

[[apps]]
name = "wiki"
hosts = ["*"]
"""


async def _seed(config: Path) -> None:
    """Sessions signed in over the last hour; ``ci-bot`` pinged /api/keepalive every 60 s."""
    t = [time.time() - 3000]
    async with open_runtime(load_config(config), clock=lambda: t[0]) as rt:
        for name, admin in (("root", True), ("alice", False), ("carol", False), ("ci-bot", False)):
            await rt.store.put_user(User(name, hash_password(PASSWORD), admin=admin, created_at=t[0]))
        gate = rt.gate
        bot, _ = await gate.sign_in("ci-bot", host="wiki.test", ip="10.0.4.17")
        await gate.sign_in("carol", host="billing.test", ip="192.0.2.44")
        alice, _ = await gate.sign_in("alice", host="wiki.test", ip="198.51.100.7")
        for i in range(45):
            t[0] += 60 + (i % 3) * 0.1
            await gate.check(host="wiki.test", path="/api/keepalive", ip="10.0.4.17", session_id=bot)
            if i % 7 == 0:
                await gate.check(host="wiki.test", path=f"/page/{i}", ip="198.51.100.7", session_id=alice)
        await gate.sign_in("carol", host="wiki.test", ip="203.0.113.9")


@pytest.fixture(scope="module")
def admin_lapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("admin-lapse")
    port = free_port()
    config = workdir / "lapse.toml"
    config.write_text(CONFIG.format(port=port))
    # Playwright's sync API holds an event loop in this thread: seed from another.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _seed(config)).result()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    log = workdir / "lapse.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(config), "serve"], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert proc.poll() is None, f"lapse serve exited:\n{tail(log)}"
            assert time.monotonic() < deadline, f"lapse serve did not listen:\n{tail(log)}"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _sign_in(page: Any, base: str, user: str, target: str) -> None:
    page.goto(base + target)
    assert "/_lapse/login" in page.url
    page.fill("#username", user)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + target)


def _axe(page: Any, axe_script: Path) -> None:
    page.add_script_tag(path=str(axe_script))
    result = page.evaluate(
        "async () => { const r = await axe.run(document);"
        " return r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.html).slice(0, 3)})); }"
    )
    assert result == [], result


def test_admin_page_in_chromium(chromium: Any, admin_lapse: str, axe_script: Path) -> None:
    from playwright.sync_api import expect

    # bypass_csp only so axe-core can be injected; the CSP itself is checked by the console listener below.
    ctx = chromium.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=False)
    try:
        page = ctx.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        _sign_in(page, admin_lapse, "root", "/_lapse/admin")
        expect(page.get_by_role("heading", name="Live sessions")).to_be_visible()
        rows = page.locator("section[aria-labelledby=live-h] tbody tr")
        expect(rows).to_have_count(5)  # root, ci-bot, carol x2, alice
        countdown = page.locator("[data-deadline]").first
        first = countdown.text_content()
        assert re.fullmatch(r"(\d+h )?\d+m \d\ds", first or ""), first  # the script ran (under the CSP)
        page.wait_for_timeout(1200)
        assert countdown.text_content() != first  # and it ticks
        suspects = page.locator("section[aria-labelledby=report-h] tbody tr")
        expect(suspects).to_have_count(1)
        expect(suspects.first).to_contain_text("ci-bot")
        expect(suspects.first).to_contain_text("/api/keepalive")
        page.wait_for_function("document.querySelector('img.charts').complete && "
                               "document.querySelector('img.charts').naturalWidth > 0", timeout=20000)
        assert problems == [], problems  # no CSP violation, no script error
        page.screenshot(path=str(DOCS / "admin-page.png"), full_page=True)

        # Filter by user, then end all of ci-bot's sessions with the page's own (CSRF) form.
        page.fill("input[name=user]", "ci-bot")
        page.get_by_role("button", name="Filter").click()
        expect(rows).to_have_count(1)
        page.get_by_role("button", name="End all of ci-bot's sessions").click()
        expect(page.get_by_role("status")).to_have_text("Ended 1 session.")
        page.goto(admin_lapse + "/_lapse/admin?a_event=session.revoked&a_user=ci-bot")
        audit = page.locator("section[aria-labelledby=audit-h] tbody tr")
        expect(audit).to_have_count(1)
        expect(audit.first).to_contain_text("admin")
    finally:
        ctx.close()
    axe_ctx = chromium.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    try:
        page = axe_ctx.new_page()
        _sign_in(page, admin_lapse, "root", "/_lapse/admin")
        _axe(page, axe_script)
    finally:
        axe_ctx.close()


def test_self_service_page_in_chromium(chromium: Any, admin_lapse: str, axe_script: Path) -> None:
    """ASVS 5.0 7.5.2: carol sees her sessions (IP, last active, deadlines) and ends the other one."""
    from playwright.sync_api import expect

    ctx = chromium.new_context(viewport={"width": 1100, "height": 700}, bypass_csp=True)
    try:
        page = ctx.new_page()
        _sign_in(page, admin_lapse, "carol", "/_lapse/sessions")
        rows = page.locator("tbody tr")
        expect(rows).to_have_count(3)  # two seeded, this browser's
        expect(page.get_by_text("(this browser)")).to_be_visible()
        page.screenshot(path=str(DOCS / "sessions-page.png"), full_page=True)
        _axe(page, axe_script)
        page.get_by_role("button", name="End all other sessions").click()
        expect(page.get_by_role("status")).to_have_text("Ended 2 sessions.")
        expect(rows).to_have_count(1)
    finally:
        ctx.close()
