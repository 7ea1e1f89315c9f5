"""The widget as a Jinja global: ``{{ lapse_widget() }}`` in any template (Flask, Starlette, FastAPI).

Texts go in as keyword arguments (``text_idle="..."`` becomes ``data-text-idle``, docs/widget.md)
and a CSP ``nonce`` as is; every value is escaped.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

from .core import WIDGET_TAG


def lapse_widget(*, nonce: str | None = None, root: str = "", **data: str) -> Markup:
    """The script tag. ``root``: the app's mount prefix (Flask ``request.script_root``, Django
    ``request.META["SCRIPT_NAME"]``), below which lapse's endpoints live when the app is mounted."""
    root = root.rstrip("/")
    if nonce is None and not data and not root:
        return Markup(WIDGET_TAG)
    if root:
        data = {"base": f"{root}/_lapse", **data}
    attrs = "".join(f' data-{k.replace("_", "-")}="{escape(v)}"' for k, v in data.items())
    if nonce is not None:
        attrs += f' nonce="{escape(nonce)}"'
    return Markup(f'<script src="{escape(root)}/_lapse/widget.js" defer{attrs}></script>')


def install(env: Any) -> Any:
    """Add ``lapse_widget`` to a ``jinja2.Environment`` (Flask: ``app.jinja_env``; Starlette: ``templates.env``)."""
    env.globals["lapse_widget"] = lapse_widget
    return env


__all__ = ["install", "lapse_widget"]
