"""A real OpenID provider (npm ``oidc-provider``, tests/oidc/idp) on loopback, and lapse in front of it.

The IdP runs once per module on a free port; it knows two lapse instances
(``rp1`` with back-channel logout, ``rp2`` without), whose ports are chosen
up front because the IdP must know their redirect URIs. ``node_modules`` is
installed by scripts/test.sh, or here with ``npm ci`` if it is missing.
Without node/npm the tests skip (and FAIL under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import uvicorn

from lapse.config import parse_config
from lapse.runtime import open_runtime
from lapse.web import Gateway

from ..support import free_port, missing, port_open

IDP_DIR = Path(__file__).with_name("idp")
SECRET = "lapse-test-client-secret-0123456789"


@dataclass
class Idp:
    url: str
    rp1_port: int
    rp2_port: int
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()


def _npm_install() -> None:
    if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        missing("npm is not installed (scripts/test.sh installs nodejs and npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True, capture_output=True,
                   timeout=300)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    node = shutil.which("node")
    if node is None:
        missing("node is not installed (scripts/test.sh installs nodejs and npm)")
    _npm_install()
    port, rp1, rp2 = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("idp") / "idp.log"
    env = {**os.environ, "IDP_PORT": str(port), "RP1": f"http://127.0.0.1:{rp1}", "RP2": f"http://127.0.0.1:{rp2}",
           "SECRET": SECRET}
    with log.open("w") as out:
        proc = subprocess.Popen([node, "idp.mjs"], cwd=IDP_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            if port_open(port) or proc.poll() is not None:
                break
            time.sleep(0.05)
        if not port_open(port):
            pytest.fail(f"the test IdP did not start:\n{log.read_text()}")
        yield Idp(f"http://127.0.0.1:{port}", rp1, rp2, log)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


LAPSE = """
[server]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
trusted_proxies = ["127.0.0.1/32"]

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[org]
max_absolute = "2h"

[defaults]
idle = "30m"
absolute = "8h"

[[apps]]
name = "billing"
hosts = ["billing.test"]
absolute = "1h"
allow = ["group:finance"]

  [[apps.privileged]]
  paths = ["/admin*"]
  max_auth_age = "5m"

  [[apps.privileged]]
  paths = ["/vault*"]
  max_auth_age = "3s"

[[apps]]
name = "wiki"
hosts = ["wiki.test"]

[oidc]
issuer = "{issuer}"
client_id = "{client}"
client_secret_file = "client-secret"
scopes = ["openid", "profile"]
admin_groups = ["lapse-admins"]
require_logout_typ = true
revalidate_every = "{revalidate}"
"""


class Clock:
    """Real time, moved forward by the test (lapse's store clock; the IdP keeps real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Lapse:
    """A lapse gateway served on a real port in a thread, with the store's clock in the test's hand."""

    def __init__(self, rt: Any, gateway: Gateway, clock: Clock, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.rt, self.gateway, self.clock, self.url, self._loop = rt, gateway, clock, url, loop

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop (the store and provider live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def events(self, name: str | None = None) -> list[dict]:
        evs = [e.to_dict() for e in self.call(self.rt.store.tail_audit(1000))]
        return [e for e in evs if name is None or e["event"] == name]

    def auth(self, sid: str | None, host: str = "wiki.test", uri: str = "/") -> httpx.Response:
        headers = {"x-forwarded-host": host, "x-forwarded-uri": uri, "x-forwarded-method": "GET"}
        if sid:
            headers["cookie"] = f"__Host-lapse={sid}"
        return httpx.get(self.url + "/_lapse/auth", headers=headers)


@pytest.fixture
def make_lapse(idp: Idp, tmp_path: Path) -> Iterator[Any]:
    started: list[tuple[uvicorn.Server, threading.Thread, asyncio.AbstractEventLoop, Any]] = []

    def start(client: str = "rp1", revalidate: str = "none") -> Lapse:
        port = idp.rp1_port if client == "rp1" else idp.rp2_port
        place = tmp_path / client
        place.mkdir()
        (place / "client-secret").write_text(SECRET + "\n")
        text = LAPSE.format(port=port, issuer=idp.url, client=client, revalidate=revalidate)
        (place / "lapse.toml").write_text(text)  # for the CLI, on the same store
        loaded = parse_config(text, str(place / "lapse.toml"), place)
        clock = Clock()
        loop = asyncio.new_event_loop()
        box: dict[str, Any] = {}

        async def open_() -> None:
            cm = open_runtime(loaded, clock=clock)
            box["cm"], box["rt"] = cm, await cm.__aenter__()
            box["gw"] = Gateway(box["rt"])

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await box["gw"](scope, receive, send)

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off",
                                interface="asgi3", proxy_headers=False)
        server = uvicorn.Server(config)

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(open_())
            loop.run_until_complete(server.serve())
            loop.run_until_complete(box["gw"].oidc.revoker.drain())  # as lapse serve does at shutdown
            loop.run_until_complete(box["gw"].oidc.provider.aclose())
            loop.run_until_complete(box["cm"].__aexit__(None, None, None))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        assert server.started, "lapse did not start"
        started.append((server, thread, loop, box))
        return Lapse(box["rt"], box["gw"], clock, f"http://127.0.0.1:{port}", loop)

    yield start
    for server, thread, _loop, _box in started:
        server.should_exit = True
        thread.join(10)


# ------------------------------------------------------------ browser-ish


def set_cookies(r: httpx.Response) -> dict[str, str]:
    out = {}
    for line in r.headers.get_list("set-cookie"):
        name, _, rest = line.partition("=")
        out[name] = rest.split(";", 1)[0]
    return out


_FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
_INPUT = re.compile(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', re.S)


def idp_form(page: str, index: int = 0) -> tuple[str, dict[str, str]]:
    action, body = _FORM.findall(page)[index]
    return html.unescape(action), {k: html.unescape(v) for k, v in _INPUT.findall(body)}


class Browser:
    """Plain HTTP standing in for a browser: the IdP's cookies in a jar, lapse's by hand
    (``__Host-`` cookies are ``Secure``; httpx will not send those over http://127.0.0.1)."""

    def __init__(self, lapse: Lapse, idp: Idp) -> None:
        self.lapse, self.idp = lapse, idp
        self.at_idp = httpx.Client(follow_redirects=False, timeout=10)
        self.cookies: dict[str, str] = {}

    def _lapse(self, method: str, url: str, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if self.cookies:
            headers["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items() if v)
        r = httpx.request(method, url if url.startswith("http") else self.lapse.url + url, headers=headers, **kw)
        for k, v in set_cookies(r).items():
            self.cookies[k] = v
        return r

    def get(self, url: str, **kw: Any) -> httpx.Response:
        return self._lapse("GET", url, **kw)

    def post(self, url: str, **kw: Any) -> httpx.Response:
        return self._lapse("POST", url, **kw)

    def at_idp_until_back(self, url: str, user: str = "alice") -> str:
        """Follow the IdP (sign in and consent as needed) until it sends us back to lapse; that URL."""
        for _ in range(20):
            if url.startswith(self.lapse.url):
                return url
            r = self.at_idp.get(url)
            if r.status_code in (302, 303):
                url = urljoin(url, r.headers["location"])
                continue
            assert r.status_code == 200, (r.status_code, r.text[:500])
            action, fields = idp_form(r.text)
            if fields.get("prompt") == "login":
                fields |= {"login": user, "password": "anything"}
            elif "xsrf" in fields:
                fields["logout"] = "yes"
            r = self.at_idp.post(urljoin(url, action), data=fields)
            assert r.status_code in (302, 303), (r.status_code, r.text[:500])
            url = urljoin(url, r.headers["location"])
        raise AssertionError("the IdP never sent the browser back")

    def sign_in(self, next_: str = "/", user: str = "alice") -> httpx.Response:
        r = self.get("/_lapse/oidc/login", params={"next": next_})
        assert r.status_code == 303, r.text
        back = self.at_idp_until_back(r.headers["location"], user)
        return self.get(back)

    @property
    def sid(self) -> str | None:
        return self.cookies.get("__Host-lapse") or None

    def logout_at_idp(self) -> None:
        """The user signs out at the IdP itself (not through lapse)."""
        r = self.at_idp.get(self.idp.url + "/session/end")
        action, fields = idp_form(r.text)
        r = self.at_idp.post(urljoin(self.idp.url, action), data=fields | {"logout": "yes"})
        assert r.status_code in (200, 302, 303), r.text[:300]


@pytest.fixture
def browser_for(idp: Idp) -> Any:
    made: list[Browser] = []

    def make(lapse: Lapse) -> Browser:
        b = Browser(lapse, idp)
        made.append(b)
        return b

    yield make
    for b in made:
        b.at_idp.close()
