"""Proxy mode for streaming answers (server-sent events, long polls): cut at the session's deadline.

A proxied answer that can last -- ``text/event-stream``, or a body without a
``Content-Length`` -- gets a monitor for as long as it streams. When the
monitor finds the session refused, the stream ends: an event stream first
gets a final event that says why::

    event: session.ended
    data: {"reason": "idle"}

and the audit log ``connection.terminated``. Answers with a length are not
watched: they end by themselves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.responses import Response, StreamingResponse

from ..enforce import Verdict
from ..monitor import Connections, Facts

FINAL_EVENT = "session.ended"


def lasting(response: Response) -> bool:
    """Whether a proxied answer may stream for long (and so needs a monitor)."""
    if not isinstance(response, StreamingResponse):
        return False
    kind = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "text/event-stream" or "content-length" not in response.headers


def guard(response: StreamingResponse, connections: Connections, facts: Facts, verdict: Verdict) -> None:
    """Put a monitor between the upstream's body and the client."""
    sse = response.headers.get("content-type", "").split(";", 1)[0].strip().lower() == "text/event-stream"
    response.body_iterator = _guarded(response.body_iterator, connections, facts, verdict, sse)


async def _guarded(body: AsyncIterator[bytes | str], connections: Connections, facts: Facts, verdict: Verdict,
                   sse: bool) -> AsyncIterator[bytes | str]:
    monitor = connections.open(facts, verdict)
    cut = asyncio.ensure_future(monitor.watch())
    chunks = body.__aiter__()
    pending: asyncio.Future[bytes | str] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(chunks.__anext__())
            await asyncio.wait((pending, cut), return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                yield chunk
                continue
            reason = cut.result()
            connections.terminated(monitor, reason)
            if sse:
                yield f"event: {FINAL_EVENT}\ndata: {json.dumps({'reason': reason})}\n\n".encode()
            return
    finally:
        cut.cancel()
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        monitor.close()
        close = getattr(chunks, "aclose", None)
        if close is not None:
            try:
                await close()
            except Exception:  # an upstream read cut short: nothing more to say
                pass
