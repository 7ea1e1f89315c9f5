"""The issue's soak: 1,000 idle WebSockets through lapse in proxy mode (real uvicorn servers, SQLite
store), idle limit 2 s. Every one must be closed with 4401 "session idle", none before its session's
deadline and none more than a second after it.

The connections belong to 100 sessions, opened round-robin in batches of 100, so every session's
last upgrade (an active check) is in the last batch: the deadlines fall after the opening burst,
and monitors opened early wake at their first deadline, find it moved, and re-arm. (With one
session per connection the deadlines fall *during* the burst, and with the client, the upstream and
lapse on one GIL the test then measures its own load: cuts came up to 0.7 s late there.) Each
session's deadline is read from the store (a passive check on a second handle, which moves nothing)
once all are open, so the bound is the session's own deadline, not the test's guess."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Frame, Opcode

from lapse.runtime import open_runtime

from .harness import Lapse, lapse_process_in_front, open_files_at_least

CONNECTIONS = 1000
SESSIONS = 100  # one batch: each opens one connection per session at once
SLACK = 1.0  # the issue: cut within one second of the deadline


class _Timed(ClientConnection):
    """A client connection that notes when the close frame arrived: the cut, as the client sees it.

    (The TCP connection ends a round trip later, once lapse reads the client's close reply: behind
    the teardown of the other connections cut at the same instant -- upstream close, audit.)"""

    cut_at: float | None = None

    def process_event(self, event: object) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.CLOSE and self.cut_at is None:
            self.cut_at = time.time()
        super().process_event(event)  # type: ignore[arg-type]


async def _soak(lapse: Lapse) -> tuple[list[float], list[tuple[int, float, int | None, str | None]]]:
    """The deadline per session, and (session, cut at, close code, reason) per connection (time.time)."""
    async with open_runtime(lapse.loaded) as rt:
        sids = [(await rt.gate.sign_in(f"user{i}", host="127.0.0.1", path="/ws"))[0] for i in range(SESSIONS)]

        async def closed(s: int, ws: _Timed) -> tuple[int, float, int | None, str | None]:
            await asyncio.wait_for(ws.wait_closed(), 20)
            assert ws.cut_at is not None, "closed without a close frame"
            return s, ws.cut_at, ws.close_code, ws.close_reason

        async def open_one(s: int) -> asyncio.Task:
            ws = await connect(f"ws://{lapse.address}/ws", additional_headers={"Cookie": lapse.cookie(sids[s])},
                               compression=None, ping_interval=None, proxy=None, open_timeout=10,
                               create_connection=_Timed)
            return asyncio.create_task(closed(s, ws))  # type: ignore[arg-type]

        waiting: list[asyncio.Task] = []
        for _ in range(CONNECTIONS // SESSIONS):
            waiting += await asyncio.gather(*(open_one(s) for s in range(SESSIONS)))
        deadlines = []
        for sid in sids:
            verdict = await rt.gate.check(host="127.0.0.1", path="/ws", passive_header=True, session_id=sid)
            assert verdict.decision.allowed and verdict.decision.deadline is not None, "expired while opening"
            deadlines.append(verdict.decision.deadline)
        return deadlines, await asyncio.gather(*waiting)


def test_no_idle_connection_outlives_its_deadline(tmp_path: Path) -> None:
    need = 2 * CONNECTIONS + 1024  # this process: clients and the upstream (lapse, a child, inherits it)
    assert open_files_at_least(need) >= need
    with lapse_process_in_front(tmp_path) as lapse:
        started = time.monotonic()
        deadlines, results = asyncio.run(_soak(lapse))
        taken = time.monotonic() - started
    assert len(results) == CONNECTIONS
    assert {(code, reason) for _, _, code, reason in results} == {(4401, "lapse: session idle")}
    late = sorted(closed - deadlines[s] for s, closed, _, _ in results)
    assert late[0] >= 0, f"cut {-late[0]:.3f} s before its deadline"
    assert late[-1] <= SLACK, f"cut {late[-1]:.3f} s after its deadline (median {late[len(late) // 2]:.3f} s)"
    print(f"{CONNECTIONS} connections in {taken:.1f} s; closed after the deadline by "
          f"{late[0]:.3f} .. {late[len(late) // 2]:.3f} (median) .. {late[-1]:.3f} s")
