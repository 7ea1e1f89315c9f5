"""The sweeper: sessions nobody comes back to still end, each with exactly one event
(ARCHITECTURE.md invariant 6, CONTRACT.md §5), also with several replicas on one store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from lapse.audit import AuditLog
from lapse.core.events import AuditEvent
from lapse.core.policy import AppSpec, Layer, PolicySpec, compile_policy
from lapse.enforce import Gate, run_sweeper
from lapse.store.memory import MemoryStore
from lapse.store.sqlite import SqliteStore

from .core.helpers import Clock, ListSink

SPEC = PolicySpec(
    defaults=Layer({"idle": 60.0, "absolute": 600.0}),
    apps=(AppSpec("wiki", ("wiki.test",), Layer({"idle": 120.0, "absolute": 300.0})),),
)
T0 = 1_750_000_000.0


def test_abandoned_sessions_end_once_and_old_records_are_purged():
    async def main():
        clock = Clock(T0)
        store = MemoryStore(clock)
        sink = ListSink()
        gate = Gate(store, compile_policy(SPEC), AuditLog([sink]), b"s" * 32)
        ids = [(await gate.sign_in(f"u{i}", host="wiki.test"))[0] for i in range(5)]
        await gate.check(host="wiki.test", path="/", session_id=ids[0])  # same instant: nothing moves
        stop = asyncio.Event()
        task = asyncio.create_task(run_sweeper(gate, 0.005, retention=3600.0, stop=stop))
        await asyncio.sleep(0.03)
        assert sink.count({"session.expired"}) == 0  # nothing is due yet
        clock.now = T0 + 119.9
        await asyncio.sleep(0.03)
        assert sink.count({"session.expired"}) == 0  # the wiki's 120 s is the most generous idle
        clock.now = T0 + 120
        for _ in range(100):
            if sink.count({"session.expired"}) == 5:
                break
            await asyncio.sleep(0.01)
        expired = [e for e in sink.events if e.event == "session.expired"]
        assert sorted(e.user for e in expired) == [f"u{i}" for i in range(5)]
        assert {e.reason for e in expired} == {"idle"} and {e.outcome for e in expired} == {"success"}
        await asyncio.sleep(0.03)
        assert sink.count({"session.expired"}) == 5  # never twice
        assert await store.sessions() == []
        # Past the most generous absolute limit the ended records are forgotten,
        # and audit events older than the retention too.
        await store.append_audit([AuditEvent(T0 - 7200, "auth.login", "success")])
        clock.now = T0 + 120 + 301 + 3600
        await asyncio.sleep(0.1)  # the next purge is PURGE_EVERY seconds of store time later: it is
        assert (await store.read(gate.key_of(ids[0])))[0] is None
        assert all(e.ts >= T0 for e in await store.tail_audit(100))
        stop.set()
        await task

    asyncio.run(main())


class FailingOnce(ListSink):
    """A sink whose first write of an end fails (a full disk), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def write(self, events):  # noqa: ANN001, ANN201
        if not self.failed and any(e.event == "session.expired" for e in events):
            self.failed = True
            raise OSError(28, "No space left on device")
        await super().write(events)


def test_a_sink_that_fails_stops_neither_the_sweeper_nor_the_other_sinks(caplog):
    """CONTRACT §5: abandoned sessions end, once each, also after a sink failed in a pass (it killed the loop)."""
    async def main():
        clock = Clock(T0)
        store = MemoryStore(clock)
        good, flaky = ListSink(), FailingOnce()
        gate = Gate(store, compile_policy(SPEC), AuditLog([good, flaky]), b"s" * 32)
        for i in range(3):
            await gate.sign_in(f"u{i}", host="wiki.test")
        stop = asyncio.Event()
        task = asyncio.create_task(run_sweeper(gate, 0.005, retention=3600.0, stop=stop))
        clock.now = T0 + 120
        for _ in range(200):
            if good.count({"session.expired"}) == 3:
                break
            await asyncio.sleep(0.01)
        assert good.count({"session.expired"}) == 3  # the good sink got every end, the failed one too
        assert flaky.count({"session.expired"}) == 2  # all but the one its failed write carried
        late = (await gate.sign_in("late", host="wiki.test"))[0]
        clock.now = T0 + 240
        for _ in range(200):
            if good.count({"session.expired"}) == 4:
                break
            await asyncio.sleep(0.01)
        assert not task.done() and good.count({"session.expired"}) == 4
        assert (await store.read(gate.key_of(late)))[0].ended
        stop.set()
        await task

    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "lapse.sweeper"] == [
        "sweeper: store unavailable, will retry: audit sink FailingOnce failed: [Errno 28] No space left on device",
        "sweeper: passes succeed again"]


def test_an_unexpected_error_in_a_pass_is_logged_and_the_next_pass_runs(caplog):
    """Whatever breaks one pass (here the store's ``due`` raising a bug), the loop logs it once and goes on."""
    async def main():
        clock = Clock(T0)
        store = MemoryStore(clock)
        sink = ListSink()
        gate = Gate(store, compile_policy(SPEC), AuditLog([sink]), b"s" * 32)
        await gate.sign_in("u", host="wiki.test")
        due, calls = store.due, 0

        async def broken_once(now, limit):  # noqa: ANN001, ANN202
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            return await due(now, limit)

        store.due = broken_once  # type: ignore[method-assign]
        clock.now = T0 + 120
        stop = asyncio.Event()
        task = asyncio.create_task(run_sweeper(gate, 0.005, retention=3600.0, stop=stop))
        for _ in range(200):
            if sink.count({"session.expired"}) == 1:
                break
            await asyncio.sleep(0.01)
        assert sink.count({"session.expired"}) == 1 and not task.done()
        stop.set()
        await task

    asyncio.run(main())
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lapse.sweeper"]
    assert logged == [("ERROR", "sweeper: a pass failed, will retry"), ("WARNING", "sweeper: passes succeed again")]


REPLICA = """
import asyncio, sys, time
from lapse.audit import AuditLog, JsonlSink
from lapse.core.policy import AppSpec, Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.store.sqlite import SqliteStore

async def main(db, out):
    spec = PolicySpec(defaults=Layer({"idle": 60.0, "absolute": 600.0}))
    store = SqliteStore(db, lambda: 1_750_000_000.0 + 1000)
    gate = Gate(store, compile_policy(spec), AuditLog([JsonlSink(out)]), b"s" * 32)
    total = 0
    for _ in range(20):
        total += await gate.sweep_once(limit=7)
    print(total)

from pathlib import Path
asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
"""


def test_replicas_sweeping_one_store_announce_each_end_once(tmp_path: Path):
    """Three processes sweep the same SQLite file at once: 150 sessions, 150 events in all."""
    db = tmp_path / "lapse.db"

    async def seed():
        store = SqliteStore(db, lambda: T0)
        gate = Gate(store, compile_policy(PolicySpec(defaults=Layer({"idle": 60.0, "absolute": 600.0}))),
                    AuditLog([]), b"s" * 32)
        for i in range(150):
            await gate.sign_in(f"user{i}")
        await store.close()

    asyncio.run(seed())
    procs = [
        subprocess.Popen([sys.executable, "-c", REPLICA, str(db), str(tmp_path / f"audit{n}.jsonl")],
                         stdout=subprocess.PIPE, text=True)
        for n in range(3)
    ]
    counts = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(counts) == 150
    events = [json.loads(line) for n in range(3) for line in (tmp_path / f"audit{n}.jsonl").read_text().splitlines()]
    assert len(events) == 150 and {e["event"] for e in events} == {"session.expired"}
    assert len({e["session"] for e in events}) == 150


def test_sweeper_survives_a_store_outage(tmp_path: Path, caplog):
    async def main():
        clock = Clock(T0)
        store = SqliteStore(tmp_path / "x.db", clock)
        sink = ListSink()
        gate = Gate(store, compile_policy(SPEC), AuditLog([sink]), b"s" * 32)
        await gate.sign_in("alice")
        await store.close()  # the store goes away
        stop = asyncio.Event()
        task = asyncio.create_task(run_sweeper(gate, 0.005, 3600.0, stop))
        await asyncio.sleep(0.05)
        assert not task.done()
        stop.set()
        await task

    asyncio.run(main())
    errors = [r for r in caplog.records if r.name == "lapse.sweeper"]
    assert len(errors) == 1 and "store unavailable" in errors[0].getMessage()

