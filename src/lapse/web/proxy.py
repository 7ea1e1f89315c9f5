"""Proxy mode: stream an allowed request to the upstream app and its answer back.

Bodies are streamed both ways, never buffered whole. Hop-by-hop headers are
dropped; identity headers a client sends (``Remote-User``, ``Remote-Groups``)
are replaced by lapse's own, so an app can trust them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..core.session import Session

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "proxy-connection"}
)
IDENTITY = frozenset({"remote-user", "remote-groups", "x-lapse-expires-in"})


class Upstream:
    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            follow_redirects=False,
        )

    async def forward(self, request: Request, session: Session, client_ip: str | None) -> Response:
        scope = request.scope
        connection_tokens = {
            t.strip().lower() for t in request.headers.get("connection", "").split(",") if t.strip()
        }
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k not in HOP_BY_HOP and k not in IDENTITY and k not in connection_tokens and k != "host"
        ]
        headers += [("remote-user", session.user), ("remote-groups", ",".join(session.groups))]
        peer = scope["client"][0] if scope.get("client") else ""
        forwarded_for = request.headers.get("x-forwarded-for")
        headers = [(k, v) for k, v in headers if not k.startswith("x-forwarded-")]
        headers += [
            ("x-forwarded-for", f"{forwarded_for}, {peer}" if forwarded_for else (client_ip or peer)),
            ("x-forwarded-proto", scope.get("scheme", "http")),
            ("x-forwarded-host", request.headers.get("host", "")),
        ]
        url = httpx.URL(path=scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
                        query=scope.get("query_string", b""))
        upstream_request = self.client.build_request(
            request.method, url, headers=headers, content=_body(request),
        )
        try:
            answer = await self.client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": "bad_gateway", "detail": f"upstream unreachable: {type(exc).__name__}"}, 502)
        response = StreamingResponse(
            answer.aiter_raw(), status_code=answer.status_code, background=BackgroundTask(answer.aclose)
        )
        # Raw bytes pass through as they came (encoding, length); only hop-by-hop headers stop here.
        response.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers.multi_items()
            if k.lower() not in HOP_BY_HOP
        ]
        return response

    async def aclose(self) -> None:
        await self.client.aclose()


async def _body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk
