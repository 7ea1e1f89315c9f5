"""What the middleware tests share: one policy, a settable clock, the audit log and cookie helpers."""

from __future__ import annotations

import re
from pathlib import Path

T0 = 1_800_000_000.0
IDLE = 600.0  # "10m"
ABSOLUTE = 3600.0  # "1h"

CONFIG = """
[server]
public_url = "http://127.0.0.1:8000"
secret_file = "secret"

[store]
url = "{store}"
sweep_interval = "{sweep}"

[audit]
sinks = ["store"]

[defaults]
idle = "10m"
absolute = "1h"
warn_before = "1m"
passive_paths = ["/api/poll*"]
"""


def write_config(folder: Path, *, store: str = "memory://", sweep: str = "1h") -> Path:
    """A lapse.toml in ``folder``. The sweeper waits an hour unless asked, so tests that move the clock
    see the request that discovers an expiry, not a sweep that raced it."""
    path = folder / "lapse.toml"
    path.write_text(CONFIG.format(store=store, sweep=sweep))
    return path


def set_cookies(headers) -> dict[str, str]:
    """name -> value of every Set-Cookie (httpx/requests/Django headers all offer get_list or getlist)."""
    lines = headers.get_list("set-cookie") if hasattr(headers, "get_list") else headers.getlist("set-cookie")
    out = {}
    for line in lines:
        name, _, rest = line.partition("=")
        out[name.strip()] = rest.split(";", 1)[0]
    return out


def csrf_field(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def names(events) -> list[tuple[str, str | None]]:
    """(event, reason) of audit events, oldest first."""
    return [(e.event, e.reason) for e in events]


BILLING = "billing.example.test"
APPS = """
[[apps]]
name = "billing"
hosts = ["billing.example.test"]
idle = "5m"
{allow}
  [[apps.privileged]]
  paths = ["/billing/admin/*"]
  methods = ["POST"]
  max_auth_age = "5m"
  mfa = true
"""
WIKI = """
[[apps]]
name = "wiki"
hosts = ["wiki.example.test"]
"""


def write_apps_config(folder: Path, *, store: str = "memory://", allow: bool = True, wiki: bool = False) -> Path:
    """``write_config`` plus a stricter billing app (5m idle, finance only, MFA step-up for POST
    /billing/admin/*) on its own host, and optionally a second app: a middleware serves one of them."""
    path = write_config(folder, store=store)
    apps = APPS.format(allow='allow = ["group:finance"]' if allow else "") + (WIKI if wiki else "")
    path.write_text(path.read_text() + apps)
    return path
