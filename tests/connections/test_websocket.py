"""WebSockets and event streams through lapse in proxy mode, with real servers and real short timeouts:
cut at the idle or absolute deadline (to within a second), re-armed by client messages only, and cut
within a second of a revocation written by another handle on the same store (another replica)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from .harness import Lapse, lapse_in_front

IDLE = 2.0
SLACK = 1.0  # the issue asks for a cut within one second of the deadline


@pytest.fixture(scope="module")
def lapse(tmp_path_factory: pytest.TempPathFactory):
    with lapse_in_front(tmp_path_factory.mktemp("conn")) as running:
        yield running


def _open(lapse: Lapse, sid: str | None, path: str = "/ws", **kw):
    headers = {"Cookie": lapse.cookie(sid)} if sid else {}
    return connect(f"ws://{lapse.address}{path}", additional_headers=headers, open_timeout=5, **kw)


def _until_closed(ws, send_every: float | None = None, message: str = "hi", stop_after: float | None = None,
                  limit: float = 10.0) -> tuple[float, int | None, str | None, list[str]]:
    """Read (and maybe send) until the connection closes; (seconds taken, close code, reason, messages)."""
    started = time.monotonic()
    got: list[str] = []
    next_send = started + (send_every or 0)
    while time.monotonic() - started < limit:
        now = time.monotonic()
        sending = send_every is not None and (stop_after is None or now - started < stop_after)
        try:
            if sending and now >= next_send:
                ws.send(message)
                next_send = now + send_every
            got.append(ws.recv(timeout=0.05))
        except TimeoutError:
            continue
        except ConnectionClosed:
            break
    rcvd = ws.protocol.close_rcvd
    return time.monotonic() - started, rcvd.code if rcvd else None, rcvd.reason if rcvd else None, got


def test_refused_at_the_upgrade_without_a_session(lapse: Lapse) -> None:
    with pytest.raises(InvalidStatus) as caught:
        with _open(lapse, None):
            pass
    assert caught.value.response.status_code == 401
    assert caught.value.response.headers["x-lapse-reason"] == "missing"


def test_messages_pass_both_ways_with_identity(lapse: Lapse) -> None:
    sid = lapse.sign_in("alice", "/slow/ws")
    with _open(lapse, sid, "/slow/ws", subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        assert ws.recv(timeout=2) == "user=alice"
        ws.send("hello")
        assert ws.recv(timeout=2) == "echo:hello"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=2) == b"\x00\x01"


def test_idle_connection_is_cut_at_its_deadline(lapse: Lapse) -> None:
    sid = lapse.sign_in()
    with _open(lapse, sid) as ws:
        taken, code, reason, _ = _until_closed(ws)
    assert code == 4401 and reason == "lapse: session idle"
    assert IDLE - 0.3 <= taken <= IDLE + SLACK, taken
    events = lapse.audit_once("connection.terminated", "idle")
    assert events and events[-1].user == "alice" and events[-1].resource == "GET /ws" and events[-1].app == "main"


def test_client_messages_re_arm_the_monitor(lapse: Lapse) -> None:
    sid = lapse.sign_in()
    with _open(lapse, sid) as ws:
        taken, code, reason, got = _until_closed(ws, send_every=0.5, stop_after=4.0)
    assert code == 4401 and reason == "lapse: session idle"
    assert "echo:hi" in got
    # alive for the 4 s of messages, then cut one idle period after the last one
    assert 4.0 + IDLE - 0.6 <= taken <= 4.0 + IDLE + SLACK, taken


def test_server_messages_are_never_activity(lapse: Lapse) -> None:
    sid = lapse.sign_in()
    with _open(lapse, sid, "/push") as ws:
        taken, code, reason, got = _until_closed(ws)
    assert len(got) >= 5  # the server talked all along
    assert code == 4401 and reason == "lapse: session idle"
    assert IDLE - 0.3 <= taken <= IDLE + SLACK, taken


def test_the_activity_pattern_decides_which_client_messages_count(lapse: Lapse) -> None:
    sid = lapse.sign_in("alice", "/quiet/ws")
    with _open(lapse, sid, "/quiet/ws") as ws:  # websocket_activity = "^(?!ping)": pings are not activity
        taken, code, reason, got = _until_closed(ws, send_every=0.4, message="ping")
    assert "echo:ping" in got
    assert code == 4401 and reason == "lapse: session idle"
    assert IDLE - 0.3 <= taken <= IDLE + SLACK, taken


def test_absolute_deadline_cuts_a_busy_connection(lapse: Lapse) -> None:
    sid = lapse.sign_in("alice", "/hard/ws")
    with _open(lapse, sid, "/hard/ws") as ws:
        taken, code, reason, _ = _until_closed(ws, send_every=0.3)
    assert code == 4401 and reason == "lapse: session absolute"
    assert 3.0 - 0.3 <= taken <= 3.0 + SLACK, taken


def test_revocation_by_another_replica_cuts_within_a_second(lapse: Lapse) -> None:
    sid = lapse.sign_in("alice", "/slow/ws")  # idle 1m: only the revocation can end it
    with _open(lapse, sid, "/slow/ws") as ws:
        assert ws.recv(timeout=2) == "user=alice"
        result: list[float] = []
        revoker = threading.Timer(1.0, lambda: (lapse.revoke(sid), result.append(time.monotonic())))
        revoker.start()
        _, code, reason, _ = _until_closed(ws)
        closed = time.monotonic()
        revoker.join()
    assert code == 4401 and reason == "lapse: session revoked"
    assert closed - result[0] <= SLACK, closed - result[0]


def test_event_stream_ends_at_the_deadline_with_a_final_event(lapse: Lapse) -> None:
    sid = lapse.sign_in()
    started = time.monotonic()
    lines: list[str] = []
    with httpx.stream("GET", f"http://{lapse.address}/sse", headers={"Cookie": lapse.cookie(sid)},
                      timeout=10) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            lines.append(line)
    taken = time.monotonic() - started
    assert "data: tick 0" in lines
    assert lines[-3:-1] == ["event: session.ended", 'data: {"reason": "idle"}'] or \
        lines[-2:] == ["event: session.ended", 'data: {"reason": "idle"}'], lines[-4:]
    assert IDLE - 0.3 <= taken <= IDLE + SLACK, taken


def test_event_stream_is_cut_by_a_revocation(lapse: Lapse) -> None:
    sid = lapse.sign_in("alice", "/slow/sse")
    threading.Timer(1.0, lambda: lapse.revoke(sid, "logout")).start()
    started = time.monotonic()
    with httpx.stream("GET", f"http://{lapse.address}/slow/sse", headers={"Cookie": lapse.cookie(sid)},
                      timeout=10) as answer:
        lines = list(answer.iter_lines())
    taken = time.monotonic() - started
    assert 'data: {"reason": "revoked"}' in lines
    assert taken <= 1.0 + SLACK, taken


def test_plain_answers_pass_unwatched(lapse: Lapse) -> None:
    sid = lapse.sign_in()
    answer = httpx.get(f"http://{lapse.address}/", headers={"Cookie": lapse.cookie(sid)})
    assert answer.status_code == 200 and answer.text == "hello alice"
