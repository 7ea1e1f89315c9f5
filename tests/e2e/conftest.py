"""End to end: a real nginx and a real Caddy, running deploy/nginx.conf and deploy/Caddyfile
verbatim, in front of a small upstream app, with `lapse serve` deciding.

The deploy files carry four placeholders, documented at their top: ``{{BIND}}``, ``{{PORT}}``,
``{{LAPSE}}`` and ``{{APP}}``. :func:`render` replaces exactly those, as plain text, and refuses a
file that has any other (or lacks one), so the tests run what users copy.

What each test gets (the ``stack`` fixture, once per proxy, per module):

- the upstream app (:class:`Upstream`): a stdlib HTTP server on loopback, in this process, that
  answers every GET with JSON echoing the path and query it got and the identity headers, and
  records each request;
- lapse: ``python -m lapse --config lapse.toml serve`` in forward-auth mode with short limits (idle
  3 s, absolute 8 s, ``/api/poll*`` passive), SQLite in a temporary folder, and the user alice;
- nginx or Caddy on a free loopback port, with the rendered deploy file.

Every server runs in its own process group and is stopped by that id (SIGTERM, then SIGKILL).
nginx or caddy missing: the tests skip, or FAIL when ``CI=true`` (scripts/test.sh installs them).

Cookies: lapse's session cookie is ``__Host-lapse`` with ``Secure`` even on plain-http loopback
(browsers accept that on 127.0.0.1); httpx would never send a Secure cookie over http, so
:class:`Browser` keeps its own jar and writes the ``Cookie`` header itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest

from ..support import free_port, in_ci, port_open

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")

USER = "alice"
GROUP = "e2e-staff"
PASSWORD = "e2e: correct horse battery staple"
IDLE_S = 3.0
ABSOLUTE_S = 8.0
PASSIVE_PATH = "/api/poll"  # matches passive_paths = ["/api/poll*"]
COOKIE = "__Host-lapse"
UNAVAILABLE_TEXT = "Sign-in service unavailable"

LAPSE_TOML = """\
# written by tests/e2e/conftest.py
[server]
listen = "127.0.0.1:{lapse_port}"
mode = "forward-auth"
public_url = "http://127.0.0.1:{proxy_port}"
trusted_proxies = ["127.0.0.1/32", "::1/128"]
secret_file = "secret"

[store]
url = "sqlite:///lapse.db"
sweep_interval = "1s"

[audit]
sinks = ["store", "jsonl:audit.jsonl"]

[login]
max_attempts = 100

[defaults]                 # generous: the session itself outlives the app's limits, so a refusal
idle = "30m"               # names the app's reason (idle, absolute), not "unknown"
absolute = "12h"

[[apps]]
name = "e2e"
hosts = ["127.0.0.1", "localhost"]
idle = "{idle}s"
absolute = "{absolute}s"
warn_before = "1s"
passive_paths = ["{passive}*"]
"""


# --------------------------------------------------------------------------- helpers




def find_tool(name: str) -> str:
    """The binary, or skip (FAIL under CI=true: there the test command installs it)."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path:
        return path
    message = f"{name} is not installed (scripts/test.sh installs it: apt-get install nginx caddy)"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)






def render(template: Path, values: dict[str, str]) -> str:
    """The deploy file with its {{NAME}} placeholders filled in: exactly these, nothing else."""
    text = template.read_text()
    found = set(PLACEHOLDER.findall(text))
    if found != set(values):
        raise AssertionError(
            f"{template.name}: placeholders {sorted(found)} in the file, {sorted(values)} filled by the tests"
        )
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    return text


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Server:
    """One background server: its own process group, output to a log file, stopped by id."""

    def __init__(self, name: str, argv: list[str], cwd: Path, port: int, env: dict[str, str] | None = None):
        self.name, self.argv, self.cwd, self.port, self.env = name, argv, cwd, port, env
        self.log = cwd / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: workers are stopped with it
            )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before listening on {self.port}:\n"
                    f"$ {' '.join(self.argv)}\n{tail(self.log)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.name} did not listen on {self.port} within {timeout}s:\n{tail(self.log)}")
            time.sleep(0.05)

    def _signal_group(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM to the group (graceful), SIGKILL after 10 s."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self._signal_group(signal.SIGKILL)  # anything of the group still left
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group, then wait until the port refuses connections."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc = None
        deadline = time.monotonic() + 5
        while port_open(self.port):
            assert time.monotonic() < deadline, f"{self.name} killed, but port {self.port} still accepts connections"
            time.sleep(0.05)


# --------------------------------------------------------------------------- upstream app


@dataclass
class Seen:
    method: str
    target: str  # path and query as received
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _AppServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        seen = Seen(self.command, self.path, list(self.headers.items()))
        self.server.seen.append(seen)
        split = urlsplit(self.path)
        body = json.dumps(
            {
                "app": "e2e-upstream",
                "method": self.command,
                "target": self.path,
                "path": split.path,
                "query": split.query,
                "remote_user": seen.all("Remote-User"),
                "remote_groups": seen.all("Remote-Groups"),
                "remote_user_underscore": seen.all("Remote_User"),
                "expires_in": seen.all("X-Lapse-Expires-In"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


class _AppServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _AppHandler)
        self.seen: list[Seen] = []


@dataclass
class Upstream:
    server: _AppServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def saw(self, marker: str) -> list[Seen]:
        """The requests the app got whose path/query contains ``marker``."""
        return [s for s in list(self.server.seen) if marker in s.target]


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = _AppServer(free_port())
    thread = threading.Thread(target=server.serve_forever, name="e2e-upstream", daemon=True)
    thread.start()
    try:
        yield Upstream(server)
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- a scripted browser


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get"), "inputs": {}})
        elif tag == "input" and self.forms and a.get("name"):
            if a.get("type", "text").lower() not in ("submit", "button", "reset", "image"):
                self.forms[-1]["inputs"].setdefault(a["name"], a.get("value", ""))


def login_form(html: str) -> dict[str, Any] | None:
    """The form of a login page (the one with a password field)."""
    parser = _Forms()
    parser.feed(html)
    return next((f for f in parser.forms if "password" in f["inputs"]), None)


def describe(r: httpx.Response, body_chars: int = 600) -> str:
    """One HTTP exchange, for assertion messages."""
    req = r.request
    lines = [f">>> {req.method} {req.url}"]
    lines += [f">>> {k}: {v}" for k, v in req.headers.items() if k.lower() not in ("accept-encoding", "user-agent")]
    lines.append(f"<<< {r.status_code} {r.reason_phrase}")
    lines += [f"<<< {k}: {v}" for k, v in r.headers.multi_items()]
    text = r.text
    lines.append(f"<<< {text[:body_chars]}{' ...' if len(text) > body_chars else ''}")
    return "\n".join(lines)


@dataclass
class Login:
    """Where a redirect to the login page points."""

    path: str
    next: str | None
    reason: str | None


def login_redirect(r: httpx.Response) -> Login | None:
    """The login target of a redirect response, or None if ``r`` is not one."""
    if r.status_code not in (302, 303, 307) or "location" not in r.headers:
        return None
    loc = urlsplit(r.headers["location"])
    if loc.path != "/_lapse/login":
        return None
    q = parse_qs(loc.query, keep_blank_values=True)
    return Login(loc.path, q.get("next", [None])[0], q.get("reason", [None])[0])


class Browser:
    """An httpx client that follows no redirects and keeps cookies the way a browser would on
    127.0.0.1 (Secure ones included), sending them in a hand-written ``Cookie`` header."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, follow_redirects=False, timeout=15.0)
        self.jar: dict[str, str] = {}
        self.set_cookies: list[str] = []  # every Set-Cookie seen, newest last
        self.signed_in_between = (0.0, 0.0)  # monotonic time before and after the last login POST

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, url: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        hdrs = dict(headers or {})
        if self.jar:
            hdrs.setdefault("Cookie", "; ".join(f"{k}={v}" for k, v in self.jar.items()))
        r = self.http.request(method, url, headers=hdrs, **kw)
        self.http.cookies.clear()  # only our own jar, never httpx's
        for value in r.headers.get_list("set-cookie"):
            self._store(value)
        return r

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self.request("GET", url, **kw)

    def _store(self, header: str) -> None:
        self.set_cookies.append(header)
        first, *attrs = [p.strip() for p in header.split(";")]
        name, _, value = first.partition("=")
        expired = False
        for attr in attrs:
            key, _, val = attr.partition("=")
            if key.lower() == "max-age":
                with contextlib.suppress(ValueError):
                    expired = int(val) <= 0
            elif key.lower() == "expires":
                with contextlib.suppress(TypeError, ValueError):
                    expired = parsedate_to_datetime(val).timestamp() < time.time()
        if expired:
            self.jar.pop(name, None)
        else:
            self.jar[name] = value

    def login(self, target: str, *, stack: Stack) -> httpx.Response:
        """From a protected URL to the page, signing in on the way; returns the page."""
        first = self.get(target)
        to_login = login_redirect(first)
        assert to_login is not None, f"no session: expected a redirect to the login page\n{stack.diag(first)}"
        assert to_login.next == target, f"next={to_login.next!r}, expected {target!r}\n{stack.diag(first)}"
        page = self.get(first.headers["location"])
        assert page.status_code == 200, f"login page\n{stack.diag(page)}"
        form = login_form(page.text)
        assert form is not None, f"no form with a password field on the login page\n{stack.diag(page)}"
        assert form["inputs"].get("csrf_token"), f"no csrf_token in the login form\n{stack.diag(page)}"
        assert form["inputs"].get("next") == target, (
            f"login form next={form['inputs'].get('next')!r}\n{stack.diag(page)}"
        )
        fields = {**form["inputs"], "username": USER, "password": PASSWORD}
        action = urljoin(str(page.url), form["action"] or str(page.url))
        before = time.monotonic()
        done = self.request("POST", action, data=fields)
        self.signed_in_between = (before, time.monotonic())  # lapse's auth_time lies in here
        assert done.status_code == 303, f"login POST\n{stack.diag(done)}"
        assert done.headers.get("location") == target, f"after login, expected 303 to {target!r}\n{stack.diag(done)}"
        assert any(h.startswith(f"{COOKIE}=") for h in done.headers.get_list("set-cookie")), (
            f"login set no {COOKIE} cookie\n{stack.diag(done)}"
        )
        landed = self.get(done.headers["location"])
        assert landed.status_code == 200, f"the page after login\n{stack.diag(landed)}"
        return landed


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    kind: str  # "nginx" | "caddy"
    base_url: str
    port: int
    lapse: Server
    proxy: Server
    upstream: Upstream
    workdir: Path
    browsers: list[Browser] = field(default_factory=list)

    def browser(self) -> Browser:
        b = Browser(self.base_url)
        self.browsers.append(b)
        return b

    def diag(self, r: httpx.Response | None = None) -> str:
        parts = [f"[{self.kind} on {self.base_url}]"]
        if r is not None:
            parts.append(describe(r))
        parts.append(f"--- lapse log (tail)\n{tail(self.lapse.log, 25)}")
        proxy_log = self.workdir / "nginx" / "logs" / "error.log" if self.kind == "nginx" else self.proxy.log
        parts.append(f"--- {self.kind} log (tail)\n{tail(proxy_log, 15)}")
        return "\n".join(parts)

    def close_browsers(self) -> None:
        for b in self.browsers:
            b.close()
        self.browsers.clear()


def _lapse_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lapse", "--config", str(config), *args]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAPSE_")}
    env.update(extra)
    return env


def _start_lapse(workdir: Path, lapse_port: int, proxy_port: int) -> Server:
    config = workdir / "lapse.toml"
    config.write_text(
        LAPSE_TOML.format(
            lapse_port=lapse_port,
            proxy_port=proxy_port,
            idle=int(IDLE_S),
            absolute=int(ABSOLUTE_S),
            passive=PASSIVE_PATH,
        )
    )
    env = _clean_env()
    check = subprocess.run(
        _lapse_cmd(config, "policy", "check", str(config)), cwd=workdir, env=env, capture_output=True, text=True
    )
    assert check.returncode == 0, f"lapse policy check refused the e2e config:\n{check.stdout}{check.stderr}"
    add = subprocess.run(
        _lapse_cmd(config, "users", "add", USER, "--password-stdin", "--group", GROUP),
        cwd=workdir,
        env=env,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
    )
    assert add.returncode == 0, f"lapse users add failed:\n{add.stdout}{add.stderr}"
    server = Server("lapse", _lapse_cmd(config, "serve"), workdir, lapse_port, env)
    server.start()
    return server


def _start_nginx(workdir: Path, port: int, lapse_port: int, app: str) -> Server:
    nginx = find_tool("nginx")
    prefix = workdir / "nginx"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "tmp").mkdir()
    (prefix / "nginx.conf").write_text(
        render(
            DEPLOY / "nginx.conf",
            {"BIND": "127.0.0.1", "PORT": str(port), "LAPSE": f"127.0.0.1:{lapse_port}", "APP": app},
        )
    )
    argv = [nginx, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "stderr"]
    test = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True)
    assert test.returncode == 0, f"nginx -t refused deploy/nginx.conf:\n{test.stderr}"
    server = Server("nginx", argv, workdir, port)
    server.start()
    return server


def _start_caddy(workdir: Path, port: int, lapse_port: int, app: str) -> Server:
    caddy = find_tool("caddy")
    home = workdir / "caddy"
    home.mkdir()
    (home / "Caddyfile").write_text(
        render(
            DEPLOY / "Caddyfile",
            {"BIND": "127.0.0.1", "PORT": str(port), "LAPSE": f"127.0.0.1:{lapse_port}", "APP": app},
        )
    )
    # Caddy writes autosave.json under XDG_CONFIG_HOME: keep it in the test folder.
    env = _clean_env(XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"), HOME=str(home))
    argv = [caddy, "run", "--adapter", "caddyfile", "--config", str(home / "Caddyfile")]
    server = Server("caddy", argv, workdir, port, env)
    server.start()
    return server


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def stack(
    request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    kind: str = request.param
    find_tool(kind)  # skip (or fail under CI) before starting anything
    workdir = tmp_path_factory.mktemp(f"e2e-{kind}")
    lapse_port, proxy_port = free_port(), free_port()
    lapse = _start_lapse(workdir, lapse_port, proxy_port)
    try:
        start = _start_nginx if kind == "nginx" else _start_caddy
        proxy = start(workdir, proxy_port, lapse_port, upstream.address)
    except BaseException:
        lapse.stop()
        raise
    st = Stack(kind, f"http://127.0.0.1:{proxy_port}", proxy_port, lapse, proxy, upstream, workdir)
    try:
        yield st
    finally:
        st.close_browsers()
        proxy.stop()
        lapse.stop()


@pytest.fixture
def browser(stack: Stack) -> Iterator[Browser]:
    b = stack.browser()
    try:
        yield b
    finally:
        b.close()
