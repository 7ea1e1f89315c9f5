"""Step-up end to end (issue 7): ``lapse serve`` in proxy mode as a real process, a user enrolled with
``lapse users totp``, real one-time codes at the real time, a 2 s ``max_auth_age``."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from lapse import totp

from ..support import free_port, serve_in_thread
from .test_serve import _wait_up

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
mode = "proxy"
upstream = "{upstream}"

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[[apps]]
name = "console"
hosts = ["127.0.0.1"]
idle = "5m"

  [[apps.privileged]]
  paths = ["/admin/*"]
  max_auth_age = "2s"
  mfa = true
"""


def _upstream_page(request) -> PlainTextResponse:  # noqa: ANN001
    return PlainTextResponse(f"upstream {request.url.path} for {request.headers.get('remote-user')}")


def _lapse(conf: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, cwd=conf.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


class Browser:
    """Keeps lapse's cookies by hand: they are ``Secure`` (``__Host-``), which browsers honour on
    ``http://127.0.0.1`` but Python's cookie jar does not (CONTRACT §4: scripts send them themselves)."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=5)
        self.jar: dict[str, str] = {}

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        headers = {**kwargs.pop("headers", {}), "cookie": "; ".join(f"{k}={v}" for k, v in self.jar.items())}
        r = self.client.request(method, path, headers=headers, **kwargs)
        for line in r.headers.get_list("set-cookie"):
            name, _, rest = line.partition("=")
            self.jar[name] = rest.split(";", 1)[0]
        return r

    def sign_in(self, password: str, code: str | None) -> httpx.Response:
        page = self.request("GET", "/_lapse/login", params={"next": "/admin/panel", "reason": "step_up"})
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        form = {"username": "root", "password": password, "next": "/admin/panel", "csrf_token": token}
        return self.request("POST", "/_lapse/login", data={**form, **({"totp": code} if code else {})})


def test_step_up_with_real_codes_through_a_running_gateway(tmp_path: Path):
    port = free_port()
    password = "a long passphrase"
    with serve_in_thread(Starlette(routes=[Route("/{p:path}", _upstream_page)])) as upstream:
        conf = tmp_path / "lapse.toml"
        conf.write_text(CONFIG.format(port=port, upstream=upstream))
        _lapse(conf, "users", "add", "root", "--password-stdin", stdin=password + "\n")
        enrolled = _lapse(conf, "users", "totp", "root")
        secret = re.search(r"secret=([A-Z2-7]+)", enrolled).group(1)
        recovery = re.findall(r"^\s+([a-z0-9]{5}-[a-z0-9]{5})$", enrolled, re.M)
        proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        try:
            _wait_up(port, proc)
            base = f"http://127.0.0.1:{port}"
            browser = Browser(base)
            asked = browser.sign_in(password, None)
            assert asked.status_code == 200 and 'name="totp"' in asked.text  # the password is not enough
            code = totp.code_at(secret, time.time())
            r = browser.sign_in(password, code)
            assert r.status_code == 303, r.text
            first = browser.jar["__Host-lapse"]
            assert browser.request("GET", "/admin/panel").text == "upstream /admin/panel for root"
            # The same code again is refused, even with the right password (RFC 6238 §5.2).
            assert "not valid" in browser.sign_in(password, code).text

            time.sleep(2.1)  # max_auth_age passes; the session itself is fine
            api = browser.request("GET", "/admin/panel", headers={"accept": "application/json"})
            assert api.status_code == 401 and api.json() == {"reason": "step_up"}
            assert 'error="insufficient_user_authentication", max_age=2' in api.headers["www-authenticate"]
            page = browser.request("GET", "/admin/panel", headers={"accept": "text/html"})
            assert page.status_code == 303 and "reason=step_up" in page.headers["location"]
            assert browser.request("GET", "/other").status_code == 200

            r = browser.sign_in(password, recovery[0])  # a lost phone: a recovery code instead
            assert r.status_code == 303, r.text
            second = browser.jar["__Host-lapse"]
            assert second != first
            assert browser.request("GET", "/admin/panel").status_code == 200
            browser.jar["__Host-lapse"] = first
            old = browser.request("GET", "/other", headers={"accept": "application/json"})
            assert (old.status_code, old.json()) == (401, {"reason": "revoked"})
            events = _lapse(conf, "audit", "tail", "-n", "50")
            for name in ("session.step_up_required", "session.step_up", "session.revoked"):
                assert name in events
        finally:
            proc.terminate()
            proc.wait(10)
