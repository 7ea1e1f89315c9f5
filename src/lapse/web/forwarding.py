"""What an upstream is told about a request lapse lets through (proxy mode, HTTP and WebSocket).

The upstream trusts lapse as its proxy, so everything that speaks for lapse is
written by lapse alone: who the user is (``Remote-User``, ``Remote-Groups``),
where the request came from (``X-Forwarded-For``, ``X-Real-IP``,
``X-Forwarded-Proto``/``-Host``). A client's own versions of these are dropped,
and so is any header with an underscore in its name (CGI-style servers map
``Remote_User`` and ``Remote-User`` to the same variable; nginx drops them by
default for the same reason). lapse's own cookies stay with lapse: the
session ID is a bearer credential for every app behind the gateway, and no
upstream needs it in its logs.

And the path: proxy mode refuses a path with dot segments, empty segments or
backslashes (also percent-encoded), because the path lapse judges must be the
path the upstream serves, and HTTP clients and servers disagree about
collapsing ``/x/../pay``. Segments are read with their ``;parameters`` stripped,
as Tomcat, Jetty and older Spring read them (``/x/..;/pay`` is ``/pay`` there),
and the path judged is the stripped one (``/pay;jsessionid=1`` is judged as
``/pay``). Refusing every dot segment, rather than only those with a ``;``, is
the rule with no exceptions to learn: browsers resolve dot segments before
sending, so only hand-made requests carry them. A path still percent-encoded
after one decoding (``%252e``) is refused too: a server that decodes twice
would serve another path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, unquote

from ..core.session import Session
from .net import reencoded

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "proxy-connection"}
)
IDENTITY = frozenset({"remote-user", "remote-groups", "x-lapse-expires-in"})
CLIENT_MAY_NOT_SAY = IDENTITY | {"x-real-ip", "forwarded"}
CLIENT_MAY_NOT_SAY_PREFIXES = ("x-forwarded-", "x-original-")


def unsafe_path(raw: str) -> bool:
    """True for a raw (still percent-encoded) path whose meaning depends on who normalises it:
    ``.``/``..``/empty segments once ``;parameters`` are stripped, ``\\``, double encoding."""
    decoded = unquote(raw)
    if "\\" in decoded or reencoded(raw):
        return True
    segments = [s.split(";", 1)[0] for s in decoded.split("/")[1:]]
    return any(s in (".", "..") for s in segments) or "" in segments[:-1]


def upstream_path(scope: Mapping[str, Any]) -> str:
    """The path as the client sent it, percent-encoding intact (``/a%2Fb`` is not ``/a/b``): what the
    upstream gets and what ``unsafe_path`` reads. Policy judges ``net.canonical_path`` of it."""
    raw = scope.get("raw_path")
    return raw.decode("latin-1") if raw else quote(scope["path"], safe="/;=:@!$&'()*+,~")


def upstream_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    drop: frozenset[str],
    session: Session,
    client_ip: str | None,
    peer: str | None,
    peer_trusted: bool,
    proto: str,
    lapse_cookies: frozenset[str],
) -> list[tuple[str, str]]:
    """The client's headers minus ``drop``, hop-by-hop and what only lapse may say; then lapse's own."""
    incoming = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
    connection_tokens = {
        t.strip().lower() for k, v in incoming if k.lower() == "connection" for t in v.split(",") if t.strip()
    }
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    host = ""
    for name, value in incoming:
        low = name.lower()
        if low == "host":
            host = value
        if low == "x-forwarded-for":
            forwarded_for.append(value)
        if (
            low in drop or low in HOP_BY_HOP or low in connection_tokens or low in CLIENT_MAY_NOT_SAY
            or low.startswith(CLIENT_MAY_NOT_SAY_PREFIXES) or "_" in low
        ):
            continue
        if low == "cookie":
            value = _without(value, lapse_cookies)
            if not value:
                continue
        out.append((name, value))
    chain = ", ".join(forwarded_for) if peer_trusted and forwarded_for else ""
    hops = f"{chain}, {peer}" if chain and peer else (client_ip or peer or "")
    out += [
        ("remote-user", session.user),
        ("remote-groups", ",".join(session.groups)),
        ("x-forwarded-for", hops),
        ("x-real-ip", client_ip or peer or ""),
        ("x-forwarded-proto", proto),
        ("x-forwarded-host", host),
    ]
    return out


def _without(cookie_header: str, names: frozenset[str]) -> str:
    kept = [part.strip() for part in cookie_header.split(";") if part.strip().partition("=")[0].strip() not in names]
    return "; ".join(p for p in kept if p)
