"""Proxy mode: stream an allowed request to the upstream app and its answer back.

Bodies are streamed both ways, never buffered whole; a request without a body
(no ``Content-Length``, no ``Transfer-Encoding``) goes on without one, not as an
empty chunked stream. What the upstream is told (identity, client address, no
hop-by-hop headers, no lapse cookies) is ``forwarding``'s.

What comes back is the upstream's, except what could speak for lapse or for the
connection: hop-by-hop headers and those the answer's ``Connection`` header names
(RFC 9110 §7.6.1) stop here, and so does a ``Set-Cookie`` for one of lapse's
cookies (an upstream could otherwise fix a user's session ID or clear it), with
one log line per cause. Every answer here is to a signed-in request: one
without ``Cache-Control`` gets ``no-store``, so no shared cache keeps an
authenticated page and the back button shows none after sign-out (OWASP ASVS
V8.2.1); an upstream that sets its own keeps it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..core.session import Session
from ..outage import OutageLog
from .forwarding import HOP_BY_HOP, upstream_headers, upstream_path

WIDGET_TAG = '<script src="/_lapse/widget.js" defer{nonce}></script>'
HEAD_LIMIT = 64 * 1024  # look this far into an HTML page for </head>; past it, pass the page on untouched
_NONCE = re.compile(r"'nonce-([A-Za-z0-9+/=_-]+)'")
_HEAD_END = re.compile(rb"</head\s*>", re.IGNORECASE)

log = logging.getLogger("lapse.proxy")


class Upstream:
    def __init__(self, base_url: str, *, timeout: float = 60.0, inject_widget: bool = False) -> None:
        self.inject_widget = inject_widget
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            follow_redirects=False,
        )
        self._dropped = OutageLog(log, "upstream response header dropped")

    async def forward(self, request: Request, session: Session, client_ip: str | None, *, peer_trusted: bool,
                      lapse_cookies: frozenset[str]) -> Response:
        """Stream the request on (see ``forwarding``: what the upstream is told) and its answer back.

        The client's ``Host`` goes on too: one upstream serves every app of a proxy-mode config, so it
        must route by the Host lapse judged the request for.
        """
        scope = request.scope
        skip = frozenset({"accept-encoding"}) if self.inject_widget else frozenset()
        peer = scope["client"][0] if scope.get("client") else None
        headers = upstream_headers(
            scope["headers"], drop=skip, session=session, client_ip=client_ip, peer=peer, peer_trusted=peer_trusted,
            proto=scope.get("scheme", "http"), lapse_cookies=lapse_cookies,
        )
        if self.inject_widget:
            # Pages come back uncompressed, so the script tag can go in without re-encoding them.
            headers.append(("accept-encoding", "identity"))
        query = scope.get("query_string", b"")
        path = upstream_path(scope)
        url = httpx.URL(path=path, query=query) if query else httpx.URL(path=path)
        upstream_request = self.client.build_request(
            request.method, url, headers=headers, content=_body(request) if _has_body(request) else None,
        )
        try:
            answer = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": "bad_gateway", "detail": f"upstream unreachable: {type(exc).__name__}"}, 502)
        body = answer.aiter_raw()
        drop = HOP_BY_HOP
        if self.inject_widget and _injectable(answer):
            body = _inject(body, _script_tag(answer.headers.get("content-security-policy", "")))
            drop = HOP_BY_HOP | {"content-length"}  # the page grows by one tag
        response = StreamingResponse(body, status_code=answer.status_code, background=BackgroundTask(answer.aclose))
        # Raw bytes pass through as they came (encoding, length); see the module docstring for what stops here.
        response.raw_headers = self._passed(answer.headers, drop, lapse_cookies)
        return response

    def _passed(
        self, headers: httpx.Headers, drop: frozenset[str], lapse_cookies: frozenset[str]
    ) -> list[tuple[bytes, bytes]]:
        """The answer's headers the client may see (module docstring), plus ``no-store`` where none was said."""
        named = {t.strip().lower() for v in headers.get_list("connection") for t in v.split(",") if t.strip()}
        ours = {n.lower() for n in lapse_cookies}  # browsers match the __Host- prefix in any case
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers.multi_items():
            low = name.lower()
            if low in drop or low in named:
                continue
            cookie = value.split("=", 1)[0].strip() if low == "set-cookie" else ""
            if cookie.lower() in ours:
                self._dropped.refused(ValueError(f"the upstream tried to set lapse's cookie {cookie}"))
                continue
            out.append((name.encode("latin-1"), value.encode("latin-1")))
        if "cache-control" not in headers:
            out.append((b"cache-control", b"no-store"))
        return out

    async def aclose(self) -> None:
        await self.client.aclose()


def _has_body(request: Request) -> bool:
    return "content-length" in request.headers or "transfer-encoding" in request.headers


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def _injectable(answer: httpx.Response) -> bool:
    kind = answer.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    encoding = answer.headers.get("content-encoding", "identity").lower()
    return kind == "text/html" and encoding == "identity" and answer.request.method != "HEAD"


def _script_tag(csp: str) -> bytes:
    """The widget's script tag, with the page's CSP nonce when it has one (else the CSP would block it)."""
    found = _NONCE.search(csp)
    return WIDGET_TAG.format(nonce=f' nonce="{found.group(1)}"' if found else "").encode()


async def _inject(body: AsyncIterator[bytes], tag: bytes) -> AsyncIterator[bytes]:
    """Stream the page, putting ``tag`` before ``</head>``; chunk boundaries may fall anywhere."""
    head, passing = b"", False
    async for chunk in body:
        if passing:
            yield chunk
            continue
        head += chunk
        found = _HEAD_END.search(head)
        if found or len(head) > HEAD_LIMIT:
            if found and b"/_lapse/widget.js" not in head[: found.start()]:
                head = head[: found.start()] + tag + head[found.start() :]
            yield head
            passing = True
    if not passing and head:
        yield head
