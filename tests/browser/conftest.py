"""Real-browser tests of the countdown widget (CONTRACT.md §6): Debian's Chromium driven by Playwright.

What runs, once per module:

- an upstream app: a stdlib HTTP server on loopback answering every GET with a small HTML page
  (``<head>`` and ``<body>``, a text field and a button), so lapse's proxy injects the widget;
- lapse: ``python -m lapse --config lapse.toml serve`` in proxy mode with ``inject_widget = true``,
  SQLite in a temporary folder, idle 6 s, absolute 40 s, warning 4 s before, and the user alice;
  the host ``localhost`` (same port) is the app "short": absolute 9 s, warning 5 s, idle 1 min;
- Chromium (``/usr/bin/chromium``; never a downloaded browser, see ../shared/SETUP-NOTES.md §5).

Chromium, Playwright or npm missing: the tests skip, or FAIL when ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ..support import free_port, missing, port_open

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
USER = "alice"
PASSWORD = "browser: correct horse battery staple"
IDLE_S, ABSOLUTE_S, WARN_S = 6.0, 40.0, 4.0
SHORT_ABSOLUTE_S, SHORT_WARN_S = 9.0, 5.0  # app "short" on host localhost: idle 1m

LAPSE_TOML = """\
# written by tests/browser/conftest.py
[server]
listen = "127.0.0.1:{port}"
mode = "proxy"
upstream = "http://127.0.0.1:{upstream_port}"
inject_widget = true
secret_file = "secret"

[store]
url = "sqlite:///lapse.db"
sweep_interval = "1s"

[audit]
sinks = ["store"]

[login]
max_attempts = 1000

[defaults]
idle = "{idle}s"
absolute = "{absolute}s"
warn_before = "{warn}s"

[[apps]]                   # the absolute warning: reached through http://localhost:PORT (first match wins)
name = "short"
hosts = ["localhost"]
idle = "1m"
absolute = "{short_absolute}s"
warn_before = "{short_warn}s"

[[apps]]
name = "browser"
hosts = ["*"]
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Upstream page</title></head>
<body><main><h1>Upstream page</h1><p>{path}</p>
<label>Notes <input id="notes" type="text"></label> <button id="other" type="button">Other</button>
</main></body></html>
"""










def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------- upstream


class _Page(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        body = PAGE.format(path=self.path.replace("&", "&amp;").replace("<", "&lt;")).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="browser-upstream", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- lapse


@dataclass
class Gateway:
    base_url: str
    workdir: Path
    log: Path

    def diag(self) -> str:
        return f"--- lapse log (tail)\n{tail(self.log, 30)}"


@pytest.fixture(scope="module")
def gateway(upstream_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("browser-lapse")
    port = free_port()
    config = workdir / "lapse.toml"
    config.write_text(LAPSE_TOML.format(port=port, upstream_port=upstream_port, idle=int(IDLE_S),
                                        absolute=int(ABSOLUTE_S), warn=int(WARN_S),
                                        short_absolute=int(SHORT_ABSOLUTE_S), short_warn=int(SHORT_WARN_S)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    lapse = [sys.executable, "-m", "lapse", "--config", str(config)]
    add = subprocess.run([*lapse, "users", "add", USER, "--password-stdin"], cwd=workdir, env=env,
                         input=PASSWORD + "\n", capture_output=True, text=True)
    assert add.returncode == 0, f"lapse users add failed:\n{add.stdout}{add.stderr}"
    log = workdir / "lapse.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*lapse, "serve"], cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert proc.poll() is None, f"lapse serve exited with {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"lapse serve did not listen on {port}:\n{tail(log)}"
            time.sleep(0.05)
        yield Gateway(f"http://127.0.0.1:{port}", workdir, log)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is not installed (scripts/test.sh installs it: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install 'playwright>=1.45,<2'; never `playwright install`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(chromium: Any) -> Iterator[Any]:
    """A fresh browser profile (own cookies, own BroadcastChannel scope) per test."""
    ctx = chromium.new_context(viewport={"width": 900, "height": 600})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def axe_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """axe-core from npm, installed once into a temporary folder."""
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (needed for axe-core)")
    prefix = tmp_path_factory.mktemp("axe")
    done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
                           "axe-core@4"], capture_output=True, text=True, timeout=180)
    script = prefix / "node_modules" / "axe-core" / "axe.min.js"
    if done.returncode != 0 or not script.exists():
        missing(f"npm install axe-core@4 failed:\n{done.stdout}{done.stderr}")
    return script
