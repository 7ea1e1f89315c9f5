"""Who is asking, and about which request: facts from the wire, trusting only trusted proxies.

``X-Forwarded-For``, ``X-Real-IP``, ``X-Original-*`` and ``X-Forwarded-*`` are
believed only when the TCP peer is in ``trusted_proxies``; from anyone else
they are ignored, so a client cannot choose its own IP, network or path.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_REENCODED = re.compile(r"%[0-9a-fA-F]{2}")

_CACHE_MAX = 4096


class Trust:
    """Membership in ``trusted_proxies``, cached per peer address."""

    def __init__(self, networks: Iterable[IpNetwork]) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __call__(self, address: str | None) -> bool:
        if not address:
            return False
        hit = self._cache.get(address)
        if hit is None:
            hit = _in(address, self.networks)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[address] = hit
        return hit


def _in(address: str, networks: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks if n.version == ip.version)


def _valid_ip(text: str) -> str | None:
    text = text.strip().strip('"').strip("[]")
    if text.count(":") == 1 and "." in text:  # "1.2.3.4:5678"
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_ip(peer: str | None, headers: dict[str, str], trusted: Trust) -> str | None:
    """The client's address: the rightmost ``X-Forwarded-For`` hop that is not a trusted proxy.

    Walking from the right stops at the first untrusted hop: everything left
    of it was written by someone we do not trust. ``X-Real-IP`` is used when
    there is no ``X-Forwarded-For``.
    """
    if not trusted(peer):
        return peer
    forwarded = headers.get("x-forwarded-for")
    if forwarded:
        hops = [h for h in (p.strip() for p in forwarded.split(",")) if h]
        for hop in reversed(hops):
            ip = _valid_ip(hop)
            if ip is None:
                break  # garbage: trust nothing further left
            if not trusted(ip):
                return ip
        return peer
    real = headers.get("x-real-ip")
    if real:
        return _valid_ip(real) or peer
    return peer


@dataclass(frozen=True, slots=True)
class Original:
    """The request a proxy asks forward-auth about."""

    method: str
    host: str
    path: str  # without the query string
    uri: str  # path and query, as the client sent them


def requested_host(headers: dict[str, str], peer_trusted: bool) -> str:
    """The host the client asked for: ``X-Forwarded-Host`` from a trusted proxy, else ``Host``."""
    return (headers.get("x-forwarded-host") if peer_trusted else None) or headers.get("host", "")


class Unjudgeable(Exception):
    """Forward-auth cannot know which request it is asked about; the message names the fix."""


def original_request(headers: dict[str, str], peer: str | None, peer_trusted: bool) -> Original:
    """nginx sends ``X-Original-Method``/``-URI``; Caddy and Traefik ``X-Forwarded-Method``/``-Uri``/``-Host``.

    Never a guess: judging ``/`` in place of a missing or unbelievable URI would let every path
    rule pass, so a peer outside ``trusted_proxies`` or a proxy that sends no URI is ``Unjudgeable``.
    """
    if not peer_trusted:
        raise Unjudgeable(f"{peer or 'a client'} is not in trusted_proxies, so the URI it names cannot be believed: "
                          "add the proxy's address to trusted_proxies")
    uri = headers.get("x-original-uri") or headers.get("x-forwarded-uri")
    if not uri:
        raise Unjudgeable(f"the proxy at {peer} sent neither X-Original-URI nor X-Forwarded-Uri: set X-Original-URI "
                          "(nginx: proxy_set_header X-Original-URI $request_uri)")
    method = headers.get("x-original-method") or headers.get("x-forwarded-method") or "GET"
    host = headers.get("x-forwarded-host") or headers.get("host", "")
    if not uri.startswith("/"):
        uri = "/" + uri
    return Original(method.upper(), host, canonical_path(uri.split("?", 1)[0]), uri)


def reencoded(raw: str) -> bool:
    """True when ``raw`` is still percent-encoded after one decoding (``%252e``, ``%2570``): a server (or a
    chain of them) that decodes twice would serve another path (``..``, ``p``) than the one lapse judges."""
    # One decoding leaves a %XX only where the raw path had "%25" (an encoded "%"): the hot path checks that.
    return "%25" in raw and _REENCODED.search(unquote(raw)) is not None


def canonical_path(raw: str) -> str:
    """The path a normalising server serves for ``raw``: percent-decoded once, ``\\`` as ``/``, each
    segment's ``;parameters`` stripped, dot segments resolved, empty segments dropped.

    Forward-auth judges this form: the proxy in front passes the raw URI on, so ``/x/../p%61y`` must be
    judged as the ``/pay`` the app will serve. Parameters go before dot segments are resolved because
    Tomcat, Jetty and older Spring read ``..;`` and ``.;`` as ``..`` and ``.``: ``/x/..;/pay`` is
    ``/pay`` to them, and ``/pay;jsessionid=1/admin`` is ``/pay/admin``. A server that keeps ``;`` as
    a plain character serves a path lapse judges at least as strictly.
    """
    decoded = unquote(raw).replace("\\", "/")
    segments: list[str] = []
    last = ""
    for segment in decoded.split("/"):
        last = segment.split(";", 1)[0]
        if last in ("", "."):
            continue
        if last == "..":
            if segments:
                segments.pop()
            continue
        segments.append(last)
    tail = "/" if segments and last in ("", ".", "..") else ""
    return "/" + "/".join(segments) + tail


def header_dict(raw: Iterable[tuple[bytes, bytes]], wanted: frozenset[bytes] | None = None) -> dict[str, str]:
    """ASGI headers as a dict of lower-case names, only the ``wanted`` ones if given (the rest are
    never decoded). A repeated header's last value wins, except ``X-Forwarded-For`` and ``Cookie``,
    which are joined as their grammars allow."""
    out: dict[str, str] = {}
    for name, value in raw:
        if wanted is not None and name not in wanted:
            continue
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in out and key in ("x-forwarded-for", "cookie"):
            out[key] += (", " if key == "x-forwarded-for" else "; ") + text
        else:
            out[key] = text
    return out
