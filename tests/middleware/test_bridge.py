"""The sync bridge: jobs on the embedded stores run in the request thread, one thread at a time
with the loop thread; other jobs still make the hop to the loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lapse.middleware.core import Settings, loaded_config
from lapse.middleware.sync import Bridge, drive

from .common import write_config


@pytest.fixture
def bridge(tmp_path: Path):
    b = Bridge(loaded_config(write_config(tmp_path, store="sqlite:///lapse.db")), Settings.of("standalone"))
    yield b
    b.close()


async def where(_e) -> int:
    return threading.get_ident()


def test_store_jobs_run_in_the_calling_thread_and_endpoints_on_the_loop(bridge):
    assert bridge.run(where) == threading.get_ident()
    assert bridge.on_loop(where) != threading.get_ident()


def test_the_loop_threads_writes_never_wait_for_a_group_commit(bridge):
    """A request thread runs SQLite's store without a loop: it must never find a write the loop thread
    queued for a group commit (it could neither wait for it nor settle it), so the bridge turns it off."""
    store = bridge.enforcer.rt.store
    assert store.group_commit is False

    async def loop_writes(e) -> str:
        sid, _ = await e.rt.gate.sign_in("zoe")
        session, _ = await e.rt.store.read(e.rt.gate.key_of(sid))
        moved = session.with_(last_seen_at=session.last_seen_at + 1)
        assert await e.rt.store.write(session, moved) is not None
        assert not e.rt.store._queued  # written at once, nothing left for a later turn
        return sid

    sid = bridge.on_loop(loop_writes)
    assert bridge.run(lambda e: e.rt.gate.check(host="localhost", path="/", session_id=sid)) is not None


def test_a_request_thread_waits_while_the_loop_thread_is_busy(bridge):
    order: list[str] = []

    async def busy(_e) -> None:
        order.append("loop starts")
        time.sleep(0.3)  # holds the loop thread (and so its turn) without yielding
        order.append("loop ends")

    async def judge(_e) -> None:
        order.append("request")

    assert bridge.enforcer is not None  # started before the race
    loop_job = threading.Thread(target=bridge.on_loop, args=(busy,))
    loop_job.start()
    while not order:
        time.sleep(0.001)
    bridge.run(judge)
    loop_job.join()
    assert order == ["loop starts", "loop ends", "request"]


def test_many_threads_judge_one_sqlite_store_at_once(bridge):
    sids = [bridge.run(lambda e, u=u: e.rt.gate.sign_in(u))[0] for u in ("a", "b", "c", "d")]
    errors: list[BaseException] = []

    def hammer(sid: str) -> None:
        try:
            for i in range(300):
                verdict = bridge.run(lambda e: e.rt.gate.check(host="app", path="/", session_id=sid))
                assert verdict.decision.allowed
                if i % 50 == 0:  # the loop thread at work meanwhile
                    assert bridge.on_loop(lambda e: e.rt.store.count_live()) == 4
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


class Pending:
    """What awaiting an unfinished future hands to whoever drives the coroutine."""

    def __await__(self):
        yield self


def test_a_job_that_waits_on_the_loop_is_refused():
    async def waits() -> None:
        await Pending()

    with pytest.raises(RuntimeError, match="waited on the event loop"):
        drive(waits())
