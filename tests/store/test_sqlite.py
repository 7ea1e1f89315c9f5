"""What only the SQLite adapter promises: durability, clear failures, its schema, its hot path."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lapse.audit import AuditLog
from lapse.core import events as ev
from lapse.core.decide import end
from lapse.core.events import AuditEvent
from lapse.core.policy import Layer, PolicySpec, compile_policy
from lapse.core.session import Session, record_activity, session_key
from lapse.enforce import Gate
from lapse.store.base import StoreUnavailable, WriteResult
from lapse.store.sqlite import SCHEMA_VERSION, SchemaError, SqliteStore

T0 = 1_700_000_000.25
run = asyncio.run


def make_session(n: int, t: float = T0) -> Session:
    return Session(
        key=session_key(b"test-secret", f"sid-{n}"),
        user="alice",
        auth_time=t,
        created_at=t,
        activity=((0.0, t),),
        last_seen_at=t,
        expires_at=t + 3600,
    )


def clock() -> float:
    return T0


# ------------------------------------------------------------- kill -9

# Session i: created at t = 1000 + i, then three writes j = 1..3, each an active request at t + j
# (the third from a stale read, so it takes the BEGIN IMMEDIATE path). "committed i j" is printed
# only after the write returned.
WRITER = """
import asyncio, sys
from lapse.core.session import Session, record_activity
from lapse.store.sqlite import SqliteStore

def state(i, j):
    t = 1000.0 + i
    s = Session(key=f"{i:032x}", user="u", auth_time=t, created_at=t, activity=((0.0, t),),
                last_seen_at=t, expires_at=t + 3600)
    if j == 0:
        return s
    return s.with_(activity=record_activity(s.activity, 900.0, t + j), last_seen_at=t + j, expires_at=t + j + 3600)

async def main(path, start):
    store = SqliteStore(path, lambda: 0.0)
    i = start
    while True:
        await store.create(state(i, 0))
        print(f"committed {i} 0", flush=True)
        for j in (1, 2, 3):
            before = state(i, 0 if j == 3 else j - 1)
            result = await store.write(before, state(i, j))
            assert result.value == "applied", result
            print(f"committed {i} {j}", flush=True)
        i += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _state(i: int, j: int) -> Session:
    t = 1000.0 + i
    s = Session(key=f"{i:032x}", user="u", auth_time=t, created_at=t, activity=((0.0, t),), last_seen_at=t,
                expires_at=t + 3600)
    if j == 0:
        return s
    return s.with_(activity=record_activity(s.activity, 900.0, t + j), last_seen_at=t + j, expires_at=t + j + 3600)


def _write_then_kill(path: Path, start: int, run_for: float) -> dict[int, int]:
    """Run the writer, SIGKILL it ``run_for`` seconds into its writing; return {session: last reported step}.

    The kill comes from a timer, not after a given line, so it lands anywhere in the writer's loop
    (inside a transaction, between a commit and its report, ...).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killer = threading.Timer(run_for, os.kill, (proc.pid, signal.SIGKILL))
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    committed: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the kill closes the pipe
            if not committed:
                killer.start()
            _, i, j = line.split()
            committed[int(i)] = int(j)
    finally:
        killer.cancel()
        watchdog.cancel()
        proc.kill()
        proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
    assert proc.returncode == -signal.SIGKILL, f"writer died on its own: {stderr}"
    assert len(committed) > 20, f"writer barely started: {stderr}"
    return committed


def test_kill_9_loses_no_committed_write(tmp_path: Path) -> None:
    path = tmp_path / "state" / "lapse.db"
    reported = _write_then_kill(path, 0, 0.15)
    reported |= _write_then_kill(path, 1_000_000, 0.1)  # reopen a killed file, go on, kill again

    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    raw.close()
    store = SqliteStore(path, clock)

    async def check() -> None:
        for i, j in reported.items():
            got, _ = await store.read(f"{i:032x}")
            assert got is not None, f"session {i} was reported committed and is gone"
            assert got.last_seen_at >= 1000.0 + i + j, f"session {i} lost its committed write {j}"
            step = int(got.last_seen_at - (1000.0 + i))  # a later write may have committed unreported
            assert got == _state(i, step)
        await store.close()

    run(check())


# --------------------------------------------------- concurrent processes

RACER = """
import asyncio, sys
from lapse.core import events as ev
from lapse.core.decide import end
from lapse.core.events import AuditEvent
from lapse.core.session import record_activity
from lapse.store.sqlite import SqliteStore

async def main(path, me, n):
    store = SqliteStore(path, lambda: 0.0, busy_timeout=10.0)
    print("ready", flush=True)
    sys.stdin.readline()
    out = []
    for i in range(n):
        key = f"{i:032x}"
        while True:
            s, _ = await store.read(key)
            if s.ended:
                out.append("ended")
                break
            if me % 2:  # odd racers are busy users too: their activity makes others' ends conflict
                await store.write(s, s.with_(activity=record_activity(s.activity, 900.0, s.last_active_at + 1)))
                s, _ = await store.read(key)
                if s.ended:
                    out.append("ended")
                    break
            result = await store.write(s, end(s, f"racer{me}", 5.0))
            if result.value != "conflict":
                out.append(result.value)
                break
    print(" ".join(out), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def test_processes_racing_to_end_sessions_end_each_once(tmp_path: Path) -> None:
    """Invariant 6 across processes: each session's end is APPLIED by exactly one of them."""
    path, n, racers = tmp_path / "x.db", 300, 4
    store = SqliteStore(path, clock)
    for i in range(n):
        run(store.create(make_session(i, t=1.0).with_(key=f"{i:032x}")))
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(path), str(me), str(n)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me in range(racers)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:  # all at once
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    results = []
    for out, err in outs:
        assert err == "", err
        results.append(out.split())
    for i in range(n):
        column = [r[i] for r in results]
        assert column.count("applied") == 1, (i, column)
        stored, _ = run(store.read(f"{i:032x}"))
        winner = column.index("applied")
        assert stored.end_reason == f"racer{winner}"
    run(store.close())


# ---------------------------------------------------------- the hot path


def _two_live(store: SqliteStore) -> tuple[Session, Session, Session, Session]:
    """Two stored sessions and, for each, its record after an active request at T0 + 5."""
    s, b = make_session(1), make_session(2)
    run(store.create(s))
    run(store.create(b))
    moved = [x.with_(activity=record_activity(x.activity, 900.0, T0 + 5), last_seen_at=T0 + 5) for x in (s, b)]
    return s, b, moved[0], moved[1]


def test_a_turns_writes_share_one_transaction_each_with_its_own_outcome(tmp_path: Path) -> None:
    """Group commit: the event-free writes of one event-loop turn are one BEGIN ... COMMIT; a stale one
    takes the slow path inside it; an end is one UPDATE in autocommit, at once."""
    store = SqliteStore(tmp_path / "x.db", clock)
    s, b, a, _ = _two_live(store)
    b1 = b.with_(activity=record_activity(b.activity, 60.0, T0 + 1))
    run(store.write(b, b1))
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)

    async def together() -> list[WriteResult]:
        return await asyncio.gather(store.write(s, a), store.write(b, b.with_(last_seen_at=T0 + 2)))

    assert run(together()) == [WriteResult.APPLIED, WriteResult.APPLIED]  # the second was stale: merged
    assert [q.split()[0] for q in statements] == ["BEGIN", "UPDATE", "UPDATE", "SELECT", "UPDATE", "COMMIT"]
    assert run(store.read(s.key))[0] == a
    merged = run(store.read(b.key))[0]
    assert merged.activity == b1.activity and merged.last_seen_at == T0 + 2

    statements.clear()
    assert run(store.write(a, end(a, "logout", T0 + 6))) == WriteResult.APPLIED
    assert len(statements) == 1 and statements[0].startswith("UPDATE")
    statements.clear()
    late = a.with_(activity=record_activity(a.activity, 900.0, T0 + 7), last_seen_at=T0 + 7)
    assert run(store.write(a, late)) == WriteResult.ENDED  # never touches an ended session
    store.db.set_trace_callback(None)
    run(store.close())


def test_a_failed_group_commit_fails_every_write_of_the_turn_and_recovers(tmp_path: Path) -> None:
    """Another process holding the write lock past busy_timeout: every write of the turn is told
    (StoreUnavailable, the gateway's 503), none is lost silently, and the next turn works."""
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock, busy_timeout=0.05)
    s, b, sa, ba = _two_live(store)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")

    async def together() -> list[object]:
        return await asyncio.gather(store.write(s, sa), store.write(b, ba), return_exceptions=True)

    outcomes = run(together())
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    blocker.execute("ROLLBACK")
    blocker.close()
    assert run(together()) == [WriteResult.APPLIED, WriteResult.APPLIED]
    assert run(store.read(s.key))[0].last_seen_at == T0 + 5
    run(store.close())


def test_a_write_whose_caller_gave_up_before_the_commit_is_not_made(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db", clock)
    s, b, sa, ba = _two_live(store)

    async def one_gives_up() -> WriteResult:
        gone = asyncio.ensure_future(store.write(s, sa))
        kept = asyncio.ensure_future(store.write(b, ba))
        await asyncio.sleep(0)  # both queued in this turn
        gone.cancel()
        return await kept

    assert run(one_gives_up()) == WriteResult.APPLIED
    assert run(store.read(b.key))[0] == ba
    assert run(store.read(s.key))[0] == s  # activity unrecorded: judged idle early, never late
    run(store.close())


def test_a_write_stranded_by_a_closed_loop_does_not_block_the_next_loop(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db", clock)
    s, _, sa, _ = _two_live(store)
    loop = asyncio.new_event_loop()

    async def queue_only() -> None:
        store._queue(s, sa)  # the group commit is scheduled for the next turn, which never comes

    loop.create_task(queue_only())
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert run(asyncio.wait_for(store.write(s, sa), 5)) == WriteResult.APPLIED
    run(store.close())


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _gate(store: SqliteStore) -> Gate:
    policy = compile_policy(PolicySpec(defaults=Layer({"idle": 60.0, "absolute": 600.0})))
    return Gate(store, policy, AuditLog([]), b"k" * 32)


def test_an_end_does_not_overtake_an_activity_queued_before_it(tmp_path: Path) -> None:
    """CONTRACT §3 (judged early by at most min(1 s, 1% of idle)): two requests of one session in one turn,
    either side of the idle deadline. The first is active in time; the second must see its activity."""
    clock = _Clock(T0)
    store = SqliteStore(tmp_path / "x.db", clock)
    gate = _gate(store)

    async def scenario() -> list[int]:
        sid, _ = await gate.sign_in("ann", host="app.test")

        async def request(at: float) -> int:
            clock.now = at
            return (await gate.check(host="app.test", path="/", session_id=sid)).decision.status

        return list(await asyncio.gather(request(T0 + 59.999), request(T0 + 60.001)))

    assert run(scenario()) == [200, 200]
    run(store.close())


def test_a_pages_parallel_requests_write_once_and_stay_remembered(tmp_path: Path) -> None:
    """Reading a session with a write queued commits the queue first: the burst coalesces as before."""
    clock = _Clock(T0)
    store = SqliteStore(tmp_path / "x.db", clock)
    gate = _gate(store)
    statements: list[str] = []

    async def scenario() -> None:
        sid, _ = await gate.sign_in("ann", host="app.test")
        clock.now = T0 + 10
        store.db.set_trace_callback(statements.append)
        await asyncio.gather(*[gate.check(host="app.test", path=f"/{i}", session_id=sid) for i in range(6)])
        store.db.set_trace_callback(None)

    run(scenario())
    assert [q.split()[0] for q in statements] == ["UPDATE"]
    assert len(store._cache) == 1
    run(store.close())


def test_a_bad_write_in_a_batch_fails_alone(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db", clock)
    s, b, moved, good = _two_live(store)
    bad = moved.with_(last_seen_at=math.nan)

    async def together() -> list[object]:
        return await asyncio.gather(store.write(s, bad), store.write(b, good), return_exceptions=True)

    outcomes = run(together())
    assert isinstance(outcomes[0], ValueError) and outcomes[1] == WriteResult.APPLIED
    assert run(store.read(b.key))[0] == good
    run(store.close())


def test_a_failure_after_the_commit_is_told_to_every_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The change counter failing (its file's disk) after the COMMIT: 503s, not requests that hang."""
    store = SqliteStore(tmp_path / "x.db", clock)
    s, b, sa, ba = _two_live(store)

    def broken() -> tuple[bytes, bytes]:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store._changes, "bump", broken)

    async def together() -> list[object]:
        return await asyncio.wait_for(asyncio.gather(store.write(s, sa), store.write(b, ba), return_exceptions=True), 5)

    outcomes = run(together())
    assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
    monkeypatch.undo()
    run(store.close())


def test_close_writes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock)
    s, _, sa, _ = _two_live(store)

    async def queue_then_close() -> WriteResult:
        pending = asyncio.ensure_future(store.write(s, sa))
        await asyncio.sleep(0)  # queued, its commit not run yet
        await store.close()
        return await pending

    assert run(queue_then_close()) == WriteResult.APPLIED
    again = SqliteStore(path, clock)
    assert run(again.read(s.key))[0] == sa
    run(again.close())


def test_bytes_per_session_stay_small(tmp_path: Path) -> None:
    path, n = tmp_path / "x.db", 3000
    store = SqliteStore(path, clock)

    async def fill() -> None:
        for i in range(n):
            s = make_session(i).with_(ip="192.0.2.10", groups=("staff",), user=f"user{i % 50}")
            await store.create(s)
            await store.write(s, s.with_(activity=record_activity(s.activity, 900.0, T0 + 60), last_seen_at=T0 + 60))

    run(fill())
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    per_session = path.stat().st_size / n
    run(store.close())
    assert per_session < 260, per_session  # ~210 B measured at 100k (table ~140, two indexes ~33 each)


# ------------------------------------------------------ failing clearly


def test_corrupt_file_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    path.write_bytes(b"this is not a database, it only lives where one should " * 100)
    with pytest.raises(StoreUnavailable, match="x.db"):
        SqliteStore(path, clock)


def test_damaged_pages_are_unavailable_not_another_error(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock)
    for i in range(300):
        run(store.create(make_session(i)))
    run(store.close())  # checkpoints: everything is in the main file now
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(page, len(data), page):  # scribble over every page but the header page
        data[offset : offset + page] = os.urandom(page)
    path.write_bytes(bytes(data))
    with pytest.raises(StoreUnavailable):
        reopened = SqliteStore(path, clock)
        try:
            run(reopened.read(make_session(7).key))
            run(reopened.sessions())
            run(reopened.create(make_session(1000)))
        finally:
            run(reopened.close())


@pytest.mark.parametrize("where", ["parent-is-a-file", "path-is-a-folder"])
def test_unusable_path_is_unavailable(tmp_path: Path, where: str) -> None:
    if where == "parent-is-a-file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "x.db"
    else:
        path = tmp_path / "x.db"
        path.mkdir()
    with pytest.raises(StoreUnavailable, match="open failed"):
        SqliteStore(path, clock)


def test_locked_past_the_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock, busy_timeout=0.05)
    s = make_session(1)
    run(store.create(s))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            run(store.create(make_session(2)))
        with pytest.raises(StoreUnavailable, match="locked"):
            run(store.write(s, s.with_(last_seen_at=T0 + 1)))
        assert run(store.read(s.key))[0] == s  # WAL: readers are never blocked by the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert run(store.write(s, s.with_(last_seen_at=T0 + 1))) == WriteResult.APPLIED
    run(store.close())


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db", clock)
    run(store.ping())
    run(store.close())
    run(store.close())
    with pytest.raises(StoreUnavailable, match="closed"):
        run(store.ping())
    with pytest.raises(StoreUnavailable):
        run(store.read("k"))


def test_an_end_and_its_event_commit_together_or_not_at_all(tmp_path: Path) -> None:
    """Issue 8: the ``store`` sink in the same transaction. An audit INSERT that fails takes the end with it."""
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock)
    s, fresh = make_session(1), make_session(2)
    run(store.create(s))
    expired = [AuditEvent(T0 + 5, ev.EXPIRED, ev.SUCCESS, s.user, s.key, None, None, None, "idle")]
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TRIGGER refuse BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit refused'); END")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="audit refused"):
            run(store.write(s, end(s, "idle", T0 + 5), expired))
        assert run(store.read(s.key))[0] == s  # still live: the sweeper ends it again, with its event
        with pytest.raises(sqlite3.IntegrityError, match="audit refused"):
            run(store.create(fresh, expired))
        assert run(store.read(fresh.key))[0] is None
        assert not store.db.in_transaction
        raw.execute("DROP TRIGGER refuse")
        assert run(store.write(s, end(s, "idle", T0 + 5), expired)) == WriteResult.APPLIED
        assert run(store.tail_audit(5)) == expired
    finally:
        raw.close()
        run(store.close())


def test_writes_without_events_stay_one_autocommit_statement(tmp_path: Path) -> None:
    """The request path (an allowed request carries no events) opens no transaction."""
    store = SqliteStore(tmp_path / "x.db", clock)
    s = make_session(1)
    run(store.create(s))
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    try:
        after = s.with_(activity=record_activity(s.activity, 900.0, T0 + 5), last_seen_at=T0 + 5)
        assert run(store.write(s, after)) == WriteResult.APPLIED
        assert len(statements) == 1 and statements[0].startswith("UPDATE sessions")
        statements.clear()
        expired = [AuditEvent(T0 + 9, ev.EXPIRED, ev.SUCCESS, s.user, s.key, None, None, None, "idle")]
        assert run(store.write(after, end(after, "idle", T0 + 9), expired)) == WriteResult.APPLIED
        assert [x.split()[0] for x in statements] == ["BEGIN", "UPDATE", "INSERT", "COMMIT"]
    finally:
        store.db.set_trace_callback(None)
        run(store.close())


# --------------------------------------------------------------- schema


def test_schema_version_is_recorded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    run(SqliteStore(path, clock).close())
    raw = sqlite3.connect(path, isolation_level=None)
    assert raw.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (str(SCHEMA_VERSION),)
    run(SqliteStore(path, clock).close())  # reopening the current version is fine
    raw.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    raw.close()
    with pytest.raises(SchemaError, match="newer lapse") as refused:
        SqliteStore(path, clock)
    assert isinstance(refused.value, StoreUnavailable)


def test_schema_1_file_gains_the_stats_column_and_keeps_its_sessions(tmp_path: Path) -> None:
    """Issue 8: a database written before activity statistics opens, and its sessions read back."""
    path = tmp_path / "x.db"
    s = make_session(1)
    store = SqliteStore(path, clock)
    run(store.create(s))
    run(store.close())
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("ALTER TABLE sessions DROP COLUMN stats")  # as schema 1 wrote it
    raw.execute("ALTER TABLE sessions DROP COLUMN device")
    raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    raw.close()
    store = SqliteStore(path, clock)
    try:
        got, _ = run(store.read(s.key))
        assert got == s and got.stats is None
        after = s.with_(activity=record_activity(s.activity, 900.0, T0 + 5), last_seen_at=T0 + 5)
        from lapse.core.activity import observe

        after = after.with_(stats=observe(None, 5.0, T0 + 5, "/x"))
        assert run(store.write(s, after)) is WriteResult.APPLIED
    finally:
        run(store.close())
    store = SqliteStore(path, clock)
    try:
        assert run(store.read(s.key))[0].stats == after.stats
    finally:
        run(store.close())


def test_schema_2_file_gains_the_device_column_and_keeps_its_sessions(tmp_path: Path) -> None:
    """A database from before device labels opens; its sessions read "not known", new ones keep theirs."""
    path = tmp_path / "x.db"
    old = make_session(1)
    store = SqliteStore(path, clock)
    run(store.create(old))
    run(store.close())
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("ALTER TABLE sessions DROP COLUMN device")  # as schema 2 wrote it
    raw.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
    raw.close()
    new = make_session(2).with_(device="Firefox on Android")
    store = SqliteStore(path, clock)
    try:
        assert run(store.read(old.key))[0] == old and old.device is None
        run(store.create(new))
    finally:
        run(store.close())
    store = SqliteStore(path, clock)
    try:
        assert run(store.read(new.key))[0].device == "Firefox on Android"
        assert store.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    finally:
        run(store.close())


def test_foreign_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    raw.commit()
    raw.close()
    with pytest.raises(SchemaError, match="not a lapse database"):
        SqliteStore(path, clock)


def test_pragmas(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "deeper" / "still" / "x.db", clock)  # the folder is created
    db = store.db
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert db.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    assert db.isolation_level is None
    run(store.close())


def test_checkpoints_happen_off_the_request_path(tmp_path: Path) -> None:
    """Commits only append to the WAL; the background thread copies it into the file."""
    path = tmp_path / "x.db"
    store = SqliteStore(path, clock)
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    size = path.stat().st_size

    async def fill() -> None:
        for n in range(2000):
            await store.create(make_session(n))

    run(fill())
    assert path.stat().st_size == size  # nothing checkpointed by the commits themselves
    for _ in range(60):
        if path.stat().st_size > size:
            break
        time.sleep(0.05)
    assert path.stat().st_size > size
    run(store.close())
    assert not any(t.name.startswith("lapse-checkpoint") and t.is_alive() for t in threading.enumerate())


def test_requests_leave_the_sweepers_index_alone(tmp_path: Path) -> None:
    """An allowed request's write does not move expires_at (no index write on the hot path)."""
    store = SqliteStore(tmp_path / "x.db", clock)
    s = make_session(1)
    run(store.create(s))
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    after = s.with_(activity=record_activity(s.activity, 900.0, T0 + 5), last_seen_at=T0 + 5)
    assert run(store.write(s, after)) is WriteResult.APPLIED
    assert len(statements) == 1 and "expires_at" not in statements[0]
    run(store.close())


def test_the_read_cache_never_serves_what_another_connection_changed(tmp_path: Path) -> None:
    """Another worker or the CLI revokes a session: this handle sees it at once (the shared change counter)."""
    path = tmp_path / "x.db"
    ours, theirs = SqliteStore(path, clock), SqliteStore(path, clock)
    s = make_session(1)
    run(ours.create(s))
    cached = run(ours.read(s.key))[0]
    assert run(ours.read(s.key))[0] is cached  # served from memory
    assert run(theirs.write(s, end(s, "admin", T0 + 1))) is WriteResult.APPLIED
    again = run(ours.read(s.key))[0]
    assert again.ended and again.end_reason == "admin"
    # Our own writes keep the memory exact.
    t = make_session(2)
    run(ours.create(t))
    moved = t.with_(activity=record_activity(t.activity, 900.0, T0 + 5), last_seen_at=T0 + 5)
    assert run(ours.write(run(ours.read(t.key))[0], moved)) is WriteResult.APPLIED
    assert run(ours.read(t.key))[0] == run(theirs.read(t.key))[0] == moved
    run(ours.close())
    run(theirs.close())


def test_a_revocation_through_a_symlinked_path_is_seen_at_once(tmp_path: Path) -> None:
    """The CLI opens the file through a symlink: the gateway's memory hears of it at its next read (one
    change counter per real file, not per spelling of its path)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "lapse.db").symlink_to(tmp_path / "real" / "lapse.db")
    gateway = SqliteStore(tmp_path / "real" / "lapse.db", clock)
    cli = SqliteStore(tmp_path / "lapse.db", clock)
    try:
        s = make_session(1)
        run(gateway.create(s))
        live = run(gateway.read(s.key))[0]
        assert run(gateway.read(s.key))[0] is live  # served from memory
        assert run(cli.write(live, end(live, "admin", T0 + 1))) is WriteResult.APPLIED
        seen = run(gateway.read(s.key))[0]
        assert seen.ended and seen.end_reason == "admin"
    finally:
        run(gateway.close())
        run(cli.close())


def test_a_commit_nobody_announced_is_seen_within_the_trust_bound(tmp_path: Path, monkeypatch) -> None:
    """A writer killed between its commit and its counter bump, or the ``sqlite3`` shell: the other handles'
    memory is trusted at most TRUST seconds before ``PRAGMA data_version`` is asked again."""
    from lapse.store import sqlite as sqlite_store

    path = tmp_path / "x.db"
    gateway, cli = SqliteStore(path, clock), SqliteStore(path, clock)
    try:
        s, t = make_session(1), make_session(2)
        run(gateway.create(s))
        run(gateway.create(t))
        live = run(gateway.read(s.key))[0]

        def killed() -> tuple[bytes, bytes]:
            raise KeyboardInterrupt  # Ctrl-C or kill -9 of `lapse sessions revoke` right after its COMMIT

        monkeypatch.setattr(cli._changes, "bump", killed)
        with pytest.raises(KeyboardInterrupt):
            run(cli.write(live, end(live, "admin", T0 + 1)))
        # The gateway goes on writing other sessions: its own bumps never told it anything.
        other = run(gateway.read(t.key))[0]
        moved = other.with_(activity=record_activity(other.activity, 900.0, T0 + 5), last_seen_at=T0 + 5)
        assert run(gateway.write(other, moved)) is WriteResult.APPLIED
        time.sleep(sqlite_store.TRUST * 1.5)
        seen = run(gateway.read(s.key))[0]
        assert seen.ended and seen.end_reason == "admin"
        # And an edit by another program (the sqlite3 shell) alike.
        with sqlite3.connect(path) as shell:
            shell.execute("DELETE FROM sessions")
        time.sleep(sqlite_store.TRUST * 1.5)
        assert run(gateway.read(t.key))[0] is None
    finally:
        run(gateway.close())
        run(cli.close())


def test_the_database_is_private_to_its_owner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It holds password hashes, the audit log and client IPs: 0700 folder, 0600 files (also -wal and -shm)
    whatever the umask; a file others can already read is used, with a warning to chmod it."""
    old = os.umask(0o022)
    try:
        store = SqliteStore(tmp_path / "state" / "lapse.db")
        store.db.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')")
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "state").iterdir() if p.name.startswith("lapse.db")}
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
        assert {modes[n] for n in ("lapse.db", "lapse.db-wal", "lapse.db-shm")} == {0o600}
        asyncio.run(store.close())
        loose = tmp_path / "loose.db"
        loose.touch(mode=0o644)
        with caplog.at_level(logging.WARNING, logger="lapse.store"):
            asyncio.run(SqliteStore(loose).close())
        assert any("readable by others than its owner (mode 644)" in r.getMessage() for r in caplog.records)
    finally:
        os.umask(old)
