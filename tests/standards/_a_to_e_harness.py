"""Shared helpers for the checklist A-E acceptance tests (slice s1): the gateway over httpx ASGI on
SQLite with the injected clock (tests/web/test_gateway.py's ``harness``), plus small readers for
cookies, the session status and the audit trail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from ..web.test_gateway import PASSWORD, T0, Harness, _set_cookies, harness, run

__all__ = ["PASSWORD", "T0", "BASIC", "PRESET_APPS", "Harness", "harness", "run", "cookie", "set_cookie_attrs",
           "issued", "status", "activity", "events_named", "lapse_cli", "write_config"]

EPS = 2.0  # seconds: the test tolerance ε (writes may be coalesced by at most 1 s, CONTRACT §3)

# One app, so an idle or absolute lapse there also ends the session (and clears the cookie).
BASIC = """
[server]
mode = "{mode}"
upstream = "{upstream}"
trusted_proxies = ["127.0.0.1/32"]

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[defaults]
idle = "10m"
absolute = "1h"
passive_paths = ["/poll*"]

[[apps]]
name = "main"
hosts = ["app.test"]
"""

PRESETS = ("pci-dss-4", "nist-63b4-aal1", "nist-63b4-aal2", "nist-63b4-aal3", "nist-63b3-aal2",
           "nist-63b3-aal3", "hipaa", "disa-stig-user", "disa-stig-admin", "owasp-high-value")

# One app per shipped preset, on host "<preset>.test", nothing else set: the preset's own values apply.
PRESET_APPS = BASIC + "".join(f'\n[[apps]]\nname = "{p}"\nhosts = ["{p}.test"]\npreset = "{p}"\n' for p in PRESETS)


def cookie(sid: str) -> dict[str, str]:
    """The Cookie header a script must send itself (CONTRACT §4: the cookie is Secure)."""
    return {"cookie": f"__Host-lapse={sid}"}


def issued(r: httpx.Response) -> str:
    """The session ID a response set."""
    return _set_cookies(r)["__Host-lapse"]


def set_cookie_attrs(r: httpx.Response, name: str = "__Host-lapse") -> dict[str, str]:
    """Attributes of the Set-Cookie line for ``name``, keys lower-cased, the value under ``"="``."""
    for line in r.headers.get_list("set-cookie"):
        head, _, rest = line.partition("=")
        if head == name:
            value, *attrs = rest.split(";")
            out = {"=": value}
            for a in attrs:
                k, _, v = a.strip().partition("=")
                out[k.lower()] = v
            return out
    raise AssertionError(f"no Set-Cookie for {name}: {r.headers.get_list('set-cookie')}")


async def status(h: Harness, sid: str | None, path: str = "/", host: str = "app.test") -> dict:
    """The PASSIVE status endpoint's body."""
    headers = {"host": host, **(cookie(sid) if sid else {})}
    r = await h.client.get(f"/_lapse/session?path={path}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def activity(h: Harness, sid: str, token: str | None, path: str = "/", host: str = "app.test",
                   **extra: str) -> httpx.Response:
    """The ACTIVE heartbeat; ``token=None`` sends no X-CSRF-Token at all."""
    headers = {"host": host, **cookie(sid), **extra}
    if token is not None:
        headers["x-csrf-token"] = token
    return await h.client.post(f"/_lapse/session/activity?path={path}", headers=headers)


async def events_named(h: Harness, name: str) -> list[dict]:
    return [e for e in await h.events() if e["event"] == name]


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "lapse.toml"
    conf.write_text(text)
    return conf


def lapse_cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lapse --config CONF ARGS...`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), *args], capture_output=True,
                          text=True, timeout=30, cwd=conf.parent)


__all__ += ["EPS", "PRESETS"]
