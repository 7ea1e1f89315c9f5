"""Proxy mode for WebSockets: judged at the upgrade, watched for as long as they live.

The downstream side is the ASGI ``websocket`` scope (uvicorn); the upstream
side is a client connection from the ``websockets`` library. Messages are
relayed both ways as they come. A message from the client is activity (an
active ``Gate.check``) unless the app's ``websocket_activity`` pattern says
otherwise or the route is passive; a message from the server never is.

When the monitor (``lapse.monitor``) finds the session refused -- idle or
absolute deadline, revocation -- the client gets close code ``4401`` with the
reason (``"lapse: session idle"``), the upstream a normal close, and the audit
log ``connection.terminated``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import websockets
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect

from ..core.policy import normalize_host
from ..monitor import Facts, Monitor
from .forwarding import upstream_headers, upstream_path
from .net import canonical_path, client_ip, header_dict
from .tokens import parse_cookies

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("lapse.websocket")

CUT_CODE = 4401  # application range: "unauthorized" by analogy with HTTP 401
MAX_MESSAGE = 16 * 1024 * 1024  # as uvicorn's own default for the downstream side
_NOT_FORWARDED = frozenset({  # the websockets client writes its own handshake (and Host, from the upstream URL)
    "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept",
})
_UNSENDABLE = {1005, 1006, 1015}  # close codes that may not be put on the wire


def cut_reason(reason: str) -> str:
    """The close frame's reason text (at most 123 bytes by RFC 6455)."""
    return f"lapse: session {reason}"[:123]


class WebSocketProxy:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        base = gateway.upstream.base_url if gateway.upstream is not None else ""
        self.base = "ws" + base[len("http"):] if base.startswith("http") else base
        cfg = gateway.rt.loaded.config
        self.scheme = urlsplit(str(cfg.server.public_url)).scheme.lower()  # the scheme the gateway's pages have
        default = getattr(cfg.defaults, "websocket_activity", None)
        self.patterns: dict[str | None, re.Pattern[str] | None] = {None: _compile(default)}
        for app in cfg.apps:
            own = getattr(app, "websocket_activity", None)
            self.patterns[app.name] = _compile(own if own is not None else default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        headers = header_dict(scope["headers"])
        peer = scope["client"][0] if scope.get("client") else None
        ip = client_ip(peer, headers, gw.trust)
        sid = parse_cookies(headers.get("cookie", "")).get(gw.cookies.name)
        host, raw_path = headers.get("host", ""), upstream_path(scope)
        passive = headers.get("x-lapse-activity", "").lower() == "passive"
        refused = gw.unservable(host, raw_path)
        if refused is not None:
            await _refuse(scope, send, refused[0], "refused")
            return
        path = canonical_path(raw_path)
        if not _same_origin(headers.get("origin"), host, self.scheme):
            await _refuse(scope, send, 403, "origin")  # another site's page may not use this session
            return
        verdict = await gw._check(host=host, path=path, method="GET", ip=ip, passive=passive, sid=sid)
        d = verdict.decision
        if not d.allowed or d.session is None or sid is None:
            await _refuse(scope, send, d.status, d.reason.value if d.reason else "missing")
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        try:
            upstream = await connect(
                self._url(scope),
                additional_headers=self._headers(scope, d.session, ip, peer),
                subprotocols=scope.get("subprotocols") or None,
                compression=None,
                max_size=MAX_MESSAGE,
                proxy=None,
                user_agent_header=None,
                open_timeout=10,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            log.warning("websocket upstream unreachable: %s", exc)
            await send({"type": "websocket.close", "code": 1011, "reason": "upstream unreachable"})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        facts = Facts(host, path, "GET", ip, sid, f"GET {path}")
        monitor = gw.connections.open(facts, verdict)
        active = verdict.effective.active
        pattern = self.patterns.get(verdict.effective.limits.app, self.patterns[None])
        try:
            await self._relay(receive, send, upstream, monitor, active, pattern)
        finally:
            monitor.close()
            await upstream.close()

    async def _relay(self, receive: Receive, send: Send, upstream: ClientConnection, monitor: Monitor,
                     active: bool, pattern: re.Pattern[str] | None) -> None:
        async def from_client() -> tuple[str, Any]:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return "client", message.get("code", 1000)
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                if active and _matches(pattern, data):
                    reason = await monitor.activity()
                    if reason is not None:
                        return "cut", reason
                await upstream.send(data)

        async def from_server() -> tuple[str, Any]:
            try:
                async for data in upstream:
                    if isinstance(data, str):
                        await send({"type": "websocket.send", "text": data})
                    else:
                        await send({"type": "websocket.send", "bytes": data})
            except websockets.exceptions.ConnectionClosed:
                pass
            return "server", (upstream.close_code, upstream.close_reason)

        async def watched() -> tuple[str, Any]:
            reason = await monitor.watch()
            # The cut goes out the moment it is decided: when thousands of connections of one session
            # end together, each close frame must not wait for every other relay to be torn down.
            await _close(send, CUT_CODE, cut_reason(reason))
            return "cut", reason

        tasks = [asyncio.create_task(from_client()), asyncio.create_task(from_server()),
                 asyncio.create_task(watched())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        # A cut wins over the client's answer to it (its close frame may arrive in the same moment).
        winner = tasks[2] if tasks[2] in done else next(t for t in tasks if t in done)
        try:
            kind, value = winner.result()
        except Exception as exc:  # a send on a connection that just went away
            log.debug("websocket relay ended: %r", exc)
            kind, value = "server", (1011, "")
        if kind == "cut":
            if winner is not tasks[2]:  # cut on activity (a refused client message): not yet told
                await _close(send, CUT_CODE, cut_reason(value))
            self.gw.connections.terminated(monitor, value)
            await upstream.close(1000, "session ended")
        elif kind == "client":
            await upstream.close(value if value not in _UNSENDABLE and 1000 <= value < 5000 else 1000)
        else:
            code, reason = value
            await _close(send, code if code and code not in _UNSENDABLE else 1000, reason or "")

    def _url(self, scope: Scope) -> str:
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        return self.base + path.decode("latin-1") + (("?" + query.decode("latin-1")) if query else "")

    def _headers(self, scope: Scope, session: Any, ip: str | None, peer: str | None) -> list[tuple[str, str]]:
        gw = self.gw
        return upstream_headers(
            scope["headers"], drop=_NOT_FORWARDED, session=session, client_ip=ip, peer=peer,
            peer_trusted=gw.trust(peer), proto="wss" if scope.get("scheme") == "wss" else "ws",
            lapse_cookies=gw.cookies.names,
        )


def _same_origin(origin: str | None, host: str, scheme: str) -> bool:
    """A browser's upgrade says where the page came from; it must be this host, over the gateway's
    ``scheme`` (clients that are not browsers send no Origin). SameSite=Lax keeps other sites' pages
    out; this keeps sibling hosts out, and a plain-http page of this host off an https gateway."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.scheme.lower() == scheme and normalize_host(parts.netloc) == normalize_host(host) and bool(host)


def _compile(text: str | None) -> re.Pattern[str] | None:
    return None if text is None else re.compile(text)


def _matches(pattern: re.Pattern[str] | None, data: str | bytes) -> bool:
    if pattern is None:
        return True
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return pattern.search(text) is not None


async def _close(send: Send, code: int, reason: str) -> None:
    try:
        await send({"type": "websocket.close", "code": code, "reason": reason})
    except Exception as exc:  # the client is already gone
        log.debug("websocket close not sent: %r", exc)


async def _refuse(scope: Scope, send: Send, status: int, reason: str) -> None:
    """Refused at the upgrade: an HTTP answer with the reason where the server can send one, else a close."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = json.dumps({"reason": reason}).encode()
        await send({"type": "websocket.http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"x-lapse-reason", reason.encode()),
            (b"cache-control", b"no-store"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send({"type": "websocket.close", "code": 1008, "reason": cut_reason(reason)})
