"""Monitors of one session that wake together share one check; a push never gets a stale answer."""

from __future__ import annotations

import asyncio

import lapse.enforce
from lapse.audit import AuditLog
from lapse.core.policy import Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.monitor import Connections, Facts
from lapse.store.memory import MemoryStore

from ..core.helpers import Clock, ListSink

T0 = 1_800_000_000.0


def test_monitors_of_one_session_share_the_check_at_their_deadline_and_pushes_are_fresh(monkeypatch):
    async def main():
        clock = Clock(T0)
        store = MemoryStore(clock)
        sink = ListSink()
        gate = Gate(store, compile_policy(PolicySpec(defaults=Layer({"idle": 60.0}))), AuditLog([sink]), b"k" * 32)
        checks: list[bool] = []
        real = Gate.check

        async def counted(self, **kw):  # noqa: ANN001, ANN003, ANN202
            checks.append(kw.get("passive_header", False))
            return await real(self, **kw)

        monkeypatch.setattr(lapse.enforce.Gate, "check", counted)
        sid, _ = await gate.sign_in("ann", host="a.test")
        hub = Connections(lambda: gate, gate.audit, store)
        facts = Facts("a.test", "/ws", "GET", None, sid, "GET /ws")
        opened = await gate.check(host="a.test", path="/ws", session_id=sid)
        checks.clear()
        monitors = [hub.open(facts, opened) for _ in range(50)]
        tasks = [asyncio.create_task(m.watch()) for m in monitors]
        await asyncio.sleep(0.01)
        first = len(checks)
        assert first <= 2  # 50 monitors armed on one or two checks, not 50

        # A revocation is pushed: every monitor re-checks afresh (no answer from before the push).
        assert await gate.revoke(gate.key_of(sid), "admin")
        reasons = await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
        assert reasons == ["revoked"] * 50
        assert sum(1 for e in sink.events if e.event == "session.denied") <= 2  # not one per connection
        for m in monitors:
            m.close()
        assert len(hub) == 0

    asyncio.run(main())
