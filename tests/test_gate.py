"""Gate reuses an answer only while decide() says it holds, and never past a change in the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import lapse.enforce
from lapse.audit import AuditLog, StoreSink
from lapse.core.policy import AppSpec, Layer, PolicySpec, compile_policy
from lapse.enforce import Gate
from lapse.store.sqlite import SqliteStore

from .core.helpers import Clock, ListSink

SPEC = PolicySpec(
    defaults=Layer({"idle": 60.0, "absolute": 600.0}),
    apps=(AppSpec("wiki", ("wiki.test",), Layer({"idle": 120.0, "absolute": 300.0})),),
)
T0 = 1_750_000_000.0


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The instants at which Gate really asked decide()."""
    calls: list[float] = []
    real = lapse.enforce.decide

    def counting(session, request, effective, now):  # noqa: ANN001, ANN202
        calls.append(now)
        return real(session, request, effective, now)

    monkeypatch.setattr(lapse.enforce, "decide", counting)
    return calls


def test_answers_are_reused_while_they_hold_and_revocation_elsewhere_is_seen_at_once(
    tmp_path: Path, asked: list[float]
) -> None:
    async def main() -> None:
        clock = Clock(T0)
        ours, theirs = SqliteStore(tmp_path / "s.db", clock), SqliteStore(tmp_path / "s.db", clock)
        sink = ListSink()
        gate = Gate(ours, compile_policy(SPEC), AuditLog([sink]), b"k" * 32)
        other = Gate(theirs, compile_policy(SPEC), AuditLog([]), b"k" * 32)  # another worker or the CLI
        sid, _ = await gate.sign_in("ann", host="wiki.test")

        async def check(host: str = "wiki.test", ip: str | None = None) -> int:
            return (await gate.check(host=host, path="/", ip=ip, session_id=sid)).decision.status

        assert await check() == 200 and len(asked) == 1
        clock.now = T0 + 0.5
        assert await check() == 200 and len(asked) == 1  # within the 1 s coalescing window: reused
        assert await check(ip="192.0.2.9") == 200 and len(asked) == 2  # another IP is another question
        assert await check(host="other.test") == 200 and len(asked) == 3  # another app too
        clock.now = T0 + 1.0
        assert await check() == 200 and len(asked) == 4  # the window closed: asked again (and it wrote)
        gate.policy = compile_policy(SPEC)  # a reload forgets every answer
        assert await check() == 200 and len(asked) == 5
        assert await check() == 200 and len(asked) == 5
        assert await other.revoke(gate.key_of(sid), "admin")  # elsewhere, through the same file
        verdict = await gate.check(host="wiki.test", path="/", session_id=sid)
        assert verdict.decision.status == 401 and verdict.decision.reason.value == "revoked"
        assert sink.count({"session.denied"}) == 1
        await ours.close()
        await theirs.close()

    asyncio.run(main())


def test_store_sink_events_are_written_with_the_change_once_and_other_sinks_still_get_them(tmp_path: Path) -> None:
    """Issue 8: sign-in and ends reach the store's audit through the write itself, never twice."""
    async def main() -> None:
        clock = Clock(T0)
        store = SqliteStore(tmp_path / "s.db", clock)
        sink = ListSink()
        gate = Gate(store, compile_policy(SPEC), AuditLog([StoreSink(store), sink]), b"k" * 32)
        writes: list[int] = []
        real_write = store.write

        async def counting(before, after, events=()):  # noqa: ANN001, ANN202
            writes.append(len(events))
            return await real_write(before, after, events)

        store.write = counting  # type: ignore[method-assign]
        sid, _ = await gate.sign_in("ann", host="wiki.test")
        clock.now = T0 + 5
        assert (await gate.check(host="wiki.test", path="/", session_id=sid)).decision.allowed
        assert await gate.revoke(gate.key_of(sid), "admin")
        names = [e.event for e in await store.tail_audit(10)]
        assert names == ["session.created", "session.revoked"]
        assert [e.event for e in sink.events] == names
        assert writes == [0, 1]  # the allowed request's write carried nothing; the end carried its event

        plain = Gate(store, compile_policy(SPEC), AuditLog([sink]), b"k" * 32)  # no store sink: nothing stored
        await plain.sign_in("bob", host="wiki.test")
        assert [e.event for e in await store.tail_audit(10)] == names
        await store.close()

    asyncio.run(main())
