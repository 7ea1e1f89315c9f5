"""A revocation on another replica cuts a WebSocket, on Redis: two lapse gateways in proxy mode (each
``lapse serve``'s own ``Service`` on uvicorn, each with its own ``RedisStore`` handle) on one real
``redis-server``. The socket goes through replica A; the user signs out on replica B; A hears it on
the pub/sub channel the write script publishes to, and cuts within a second. (Without the push the
monitor would only look again after ``MAX_SLEEP``, 30 s.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from lapse.config import parse_config
from lapse.web.serve import Service

from ..redis_server import RedisServer
from ..support import free_port
from .harness import CONFIG, UPSTREAM, Lapse, serve

SLACK = 1.0


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[Lapse, Lapse]]:
    redis = RedisServer(tmp_path / "redis").start()
    config = CONFIG.replace('url = "sqlite:///state/lapse.db"', f'url = "{redis.url}"')
    try:
        with ExitStack() as stack:
            upstream = stack.enter_context(serve(UPSTREAM))
            running = []
            for _ in "ab":  # one folder: the same secret file, so the same session keys
                port = free_port()
                loaded = parse_config(config.format(port=port, upstream=f"http://{upstream}"), base_dir=tmp_path)
                running.append(Lapse(loaded, stack.enter_context(serve(Service(loaded, None), port, "on"))))
            yield running[0], running[1]
    finally:
        redis.stop()


def test_a_logout_on_replica_b_cuts_a_websocket_on_replica_a_within_a_second(replicas) -> None:
    a, b = replicas
    sid = a.sign_in("alice", "/slow/ws")  # idle 1m: only the revocation can end it
    with connect(f"ws://{a.address}/slow/ws", additional_headers={"Cookie": a.cookie(sid)}, open_timeout=5,
                 proxy=None) as ws:
        assert ws.recv(timeout=2) == "user=alice"
        with httpx.Client(base_url=f"http://{b.address}", headers={"Cookie": b.cookie(sid)}) as client:
            token = client.get("/_lapse/session").json()["csrf_token"]
            assert client.post("/_lapse/logout", headers={"x-csrf-token": token}).status_code == 200
        signed_out = time.monotonic()  # B has written the end by now
        with pytest.raises(Exception) as closed:
            ws.recv(timeout=SLACK + 2)
        taken = time.monotonic() - signed_out
    assert type(closed.value).__name__ == "ConnectionClosedError", closed.value
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (4401, "lapse: session revoked")
    assert taken <= SLACK, taken
    a.audit_once("connection.terminated", "revoked")
    ended = [e for e in a.audit() if e.event in ("session.revoked", "connection.terminated")]
    assert [(e.event, e.reason) for e in ended] == [("session.revoked", "logout"), ("connection.terminated", "revoked")]
