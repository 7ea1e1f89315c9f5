"""Real servers for the connection tests: a small upstream (WebSocket echo, server push, SSE) and lapse
in proxy mode in front of it (``lapse serve``'s own ``Service`` on uvicorn), on the embedded SQLite
store; the test holds a second handle on the same file, as another replica would."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from lapse.config import LoadedConfig, load_config, parse_config
from lapse.runtime import open_runtime
from lapse.web.serve import Service

from ..support import free_port, port_open


async def _echo(ws: WebSocket) -> None:
    await ws.accept(subprotocol=(ws.scope.get("subprotocols") or [None])[0])
    await ws.send_text("user=" + ws.headers.get("remote-user", ""))
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await ws.send_text("echo:" + message["text"])
            else:
                await ws.send_bytes(message.get("bytes") or b"")
    except WebSocketDisconnect:
        return


async def _push(ws: WebSocket) -> None:
    """The server talks every 0.2 s; the client never does."""
    await ws.accept()
    try:
        n = 0
        while True:
            await ws.send_text(f"tick {n}")
            n += 1
            await asyncio.sleep(0.2)
    except Exception:
        return


async def _sse(request: Request) -> StreamingResponse:
    async def ticks() -> Any:
        n = 0
        while True:
            yield f"data: tick {n}\n\n"
            n += 1
            await asyncio.sleep(0.2)

    return StreamingResponse(ticks(), media_type="text/event-stream")


async def _plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello " + request.headers.get("remote-user", ""))


UPSTREAM = Starlette(routes=[
    WebSocketRoute("/ws", _echo), WebSocketRoute("/slow/ws", _echo), WebSocketRoute("/quiet/ws", _echo),
    WebSocketRoute("/hard/ws", _echo), WebSocketRoute("/push", _push), Route("/sse", _sse),
    Route("/slow/sse", _sse), Route("/", _plain),
])

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
mode = "proxy"
upstream = "{upstream}"

[store]
url = "sqlite:///state/lapse.db"
sweep_interval = "1s"

[audit]
sinks = ["store"]

[defaults]
idle = "2s"
absolute = "1h"
warn_before = "1s"

[[apps]]
name = "slow"
hosts = ["127.0.0.1"]
paths = ["/slow/*"]
idle = "1m"

[[apps]]
name = "quiet"
hosts = ["127.0.0.1"]
paths = ["/quiet/*"]
websocket_activity = "^(?!ping)"

[[apps]]
name = "hard"
hosts = ["127.0.0.1"]
paths = ["/hard/*"]
idle = "1m"
absolute = "3s"

[[apps]]
name = "main"
hosts = ["127.0.0.1"]
"""


def open_files_at_least(n: int) -> int:
    """Raise this process's ``RLIMIT_NOFILE`` towards ``n``; the soft limit it now has.

    The hard limit too where allowed (root with CAP_SYS_RESOURCE); otherwise up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard) if hard != resource.RLIM_INFINITY else hard))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else n, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextmanager
def serve(app: Any, port: int | None = None, lifespan: str = "off") -> Iterator[str]:
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Lapse:
    """lapse in front of the upstream, and a second handle on its store (another replica)."""

    def __init__(self, loaded: LoadedConfig, address: str) -> None:
        self.loaded, self.address = loaded, address

    def run(self, work: Any) -> Any:
        async def go() -> Any:
            async with open_runtime(self.loaded) as rt:
                return await work(rt)

        return asyncio.run(go())

    def sign_in(self, user: str = "alice", path: str = "/") -> str:
        async def work(rt: Any) -> str:
            sid, _ = await rt.gate.sign_in(user, host="127.0.0.1", path=path, ip="127.0.0.1")
            return sid

        return self.run(work)

    def revoke(self, sid: str, reason: str = "admin") -> bool:
        return self.run(lambda rt: rt.gate.revoke(rt.gate.key_of(sid), reason))

    def audit(self, n: int = 200) -> list[Any]:
        return self.run(lambda rt: rt.store.tail_audit(n))

    def audit_once(self, event: str, reason: str | None = None, n: int = 500, timeout: float = 2.0) -> list[Any]:
        """The events named ``event`` (with ``reason``), waiting until one is there: lapse writes the
        ``connection.terminated`` of a cut just after the close frame, in a batch with the moment's others."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.audit(n) if e.event == event and (reason is None or e.reason == reason)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def cookie(self, sid: str) -> str:
        return f"{self.loaded.config.server.effective_cookie_name}={sid}"


@contextmanager
def lapse_in_front(tmp: Path, config: str = CONFIG) -> Iterator[Lapse]:
    with serve(UPSTREAM) as upstream:
        port = free_port()
        loaded = parse_config(config.format(port=port, upstream=f"http://{upstream}"), base_dir=tmp)
        with serve(Service(loaded, None), port, lifespan="on") as address:
            yield Lapse(loaded, address)


@contextmanager
def lapse_process_in_front(tmp: Path, config: str = CONFIG) -> Iterator[Lapse]:
    """As ``lapse_in_front``, but lapse is ``lapse serve`` in a child process (uvloop, its own GIL): for the
    soak, where client, upstream and lapse on one GIL would time the test process, not lapse."""
    with serve(UPSTREAM) as upstream:
        port = free_port()
        path = tmp / "lapse.toml"
        path.write_text(config.format(port=port, upstream=f"http://{upstream}"))
        log = tmp / "lapse.log"
        with log.open("wb") as out:  # a file, not a pipe nobody reads: a full pipe would block lapse's logging
            proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(path), "serve"], cwd=tmp,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            while not port_open(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"lapse serve did not start: {log.read_text()[-2000:]}")
                time.sleep(0.02)
            yield Lapse(load_config(path), f"127.0.0.1:{port}")
        finally:
            proc.terminate()
            proc.wait(10)
