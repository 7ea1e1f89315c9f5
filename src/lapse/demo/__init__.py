"""The bundled demo: "Acme Billing", a small upstream app that ``lapse demo`` runs behind lapse's proxy mode.

- :func:`create_demo_app` builds the upstream (a plain Starlette app; it trusts ``Remote-User``, so it
  must only listen where lapse alone can reach it, e.g. loopback).
- :data:`DEMO_CONFIG` is the lapse config for the demo, with a ``{state}`` placeholder for the folder
  that holds the demo's database and secret; :func:`demo_config` fills it in safely.
"""

from __future__ import annotations

import json
from pathlib import Path

from .app import create_demo_app

__all__ = ["DEMO_CONFIG", "create_demo_app", "demo_config"]

#: Proxy mode in front of the demo app on 127.0.0.1:8081. Short limits so the countdown shows within a
#: minute; a stricter ``payments`` app listed first (first match wins), and passive notification polling.
#: ``{state}`` is the only placeholder (TOML here has no other braces, so ``str.format`` is safe).
DEMO_CONFIG = """\
# lapse demo: the Acme Billing app behind lapse's proxy mode.
[server]
listen = "127.0.0.1:8080"
mode = "proxy"
upstream = "http://127.0.0.1:8081"
inject_widget = true
secret_file = "{state}/secret"

[store]
url = "sqlite:///{state}/demo.db"

[audit]
sinks = ["store"]

[defaults]
idle = "1m"
absolute = "10m"
warn_before = "30s"
passive_paths = ["/api/notifications*"]

# Listed first: the first app whose hosts and paths match wins.
[[apps]]
name = "payments"
hosts = ["*"]
paths = ["/payments*"]
idle = "30s"
warn_before = "15s"    # below idle, so the warning does not open the moment the page loads

[[apps]]
name = "acme"
hosts = ["*"]
"""


def demo_config(state_dir: str | Path) -> str:
    """:data:`DEMO_CONFIG` with ``{state}`` set to *state_dir* (relative paths: to the config's folder).

    The path is written as a TOML-escaped string body, so any folder name works.
    """
    state = Path(state_dir).as_posix().rstrip("/") or "/"
    escaped = json.dumps(state)[1:-1]  # JSON string escapes are valid TOML basic-string escapes
    return DEMO_CONFIG.format(state=escaped)
