"""The store contract: every adapter (``conftest.ADAPTERS``) passes every test here.

``apply_write`` (store/base.py) is the specification of ``write``; the property
test at the end runs random histories against each adapter and against
``apply_write`` on a plain dict, and requires the same answers and records.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lapse.core import events as ev
from lapse.core.activity import Activity, observe
from lapse.core.decide import end, revoke, sign_in, sweep
from lapse.core.events import AuditEvent
from lapse.core.policy import Limits
from lapse.core.session import Session, merge, record_activity, session_key, vouched
from lapse.store.base import AuditQuery, SessionExists, SsoLink, User, WriteResult, apply_write

APPLIED, ENDED, CONFLICT = WriteResult.APPLIED, WriteResult.ENDED, WriteResult.CONFLICT
T0 = 1_700_000_000.25  # not a whole second: timestamps must round-trip as exact floats
run = asyncio.run


def make_session(
    n: int = 0, *, user: str = "alice", t: float = T0, expires_in: float = 3600.0, **changes: Any
) -> Session:
    """A fresh session as ``sign_in`` makes it (the key: the keyed hash of a made-up ID)."""
    s = Session(
        key=session_key(b"test-secret", f"sid-{n}"),
        user=user,
        auth_time=t,
        created_at=t,
        activity=((0.0, t),),
        last_seen_at=t,
        expires_at=t + expires_in,
        ip="192.0.2.1",
    )
    return s.with_(**changes) if changes else s


def active(s: Session, at: float, limit: float | None = 900.0, ip: str | None = None) -> Session:
    """What ``decide`` writes back for an active request at ``at`` under ``limit``."""
    activity = record_activity(s.activity, limit, at)
    return s.with_(
        activity=activity,
        last_seen_at=max(at, s.last_seen_at),
        expires_at=activity[-1][1] + 3600.0,
        ip=s.ip if ip is None else ip,
        stats=observe(s.stats, at - s.last_active_at, at, f"/keepalive/{int(at) % 3}") if activity != s.activity
        else s.stats,
    )


# ------------------------------------------------------------------ basics


async def test_now_is_the_injected_clock(store: Any, clock: Any) -> None:
    clock.t = T0
    assert await store.now() == T0
    clock.advance(12.5)
    assert await store.now() == T0 + 12.5


async def test_read_missing_key(store: Any, clock: Any) -> None:
    clock.t = T0 + 0.125
    assert await store.read(session_key(b"k", "nobody")) == (None, T0 + 0.125)
    assert await store.read("not-even-hex") == (None, T0 + 0.125)


ROUND_TRIPS = [
    make_session(1),
    make_session(
        2,
        user="bob@example.com",
        auth_time=T0 - 0.1,
        activity=((0.0, T0), (60.0, T0 + 0.3), (900.0, T0 + 1.7), (math.inf, T0 + 2.000001)),
        last_seen_at=T0 + 3.1,
        expires_at=math.inf,
        ip="2001:db8::1",
        mfa=True,
        groups=("admins", "billing team", ""),
        device="Firefox on Android",
    ),
    make_session(3, ip=None, groups=("one",), ended_at=T0 + 9.9, end_reason="logout", device="psql – ünïcode"),
    make_session(4, activity=((0.0, T0), (math.inf, T0 + 1)), expires_at=T0 + 1e-6).with_(key="plain-key/not-hex"),
    make_session(5).with_(key="ABCDEF0123456789ABCDEF0123456789"),  # upper-case hex is another key than lower
]


@pytest.mark.parametrize("session", ROUND_TRIPS, ids=lambda s: s.key[:8])
async def test_create_read_round_trip(store: Any, clock: Any, session: Session) -> None:
    await store.create(session)
    got, now = await store.read(session.key)
    assert got == session
    assert now == clock()
    assert [type(x) for step in got.activity for x in step] == [float] * (2 * len(session.activity))
    assert await store.read(session.key.lower() if session.key != session.key.lower() else "x" + session.key) == (
        None,
        clock(),
    )


async def test_sign_in_record_round_trips(store: Any) -> None:
    limits = Limits(app="wiki", network=None, idle=900.0, absolute=8 * 3600.0, warn_before=60.0, sources={},
                    rules=(), on_ip_change="allow", allow_users=None, allow_groups=None,
                    generous_idle=900.0, generous_absolute=8 * 3600.0)
    d = sign_in(session_key(b"k", "sid"), "carol", T0, limits, ip="198.51.100.7", mfa=True, groups=("staff",),
                device="curl")
    await store.create(d.session)
    assert (await store.read(d.session.key))[0] == d.session
    assert d.session.device == "curl"


async def test_device_is_kept_through_writes_and_the_end(store: Any, twin: Any) -> None:
    """Set once at sign-in: activity, an IP change and the end keep it; no write can change it."""
    s = make_session(1, device="Chrome on Linux")
    await store.create(s)
    later = active(s, T0 + 10, ip="203.0.113.9").with_(device="curl")
    assert await store.write(s, later) == APPLIED
    got = (await twin.read(s.key))[0]
    assert got.device == "Chrome on Linux" and got.ip == "203.0.113.9"
    assert [x.device for x in await twin.sessions("alice")] == ["Chrome on Linux"]
    assert await store.write(got, revoke(got, "logout", T0 + 11).session) == APPLIED
    assert (await twin.read(s.key))[0].device == "Chrome on Linux"


async def test_thousands_of_groups_are_stored_by_every_store(store: Any, twin: Any) -> None:
    """An IdP's groups claim of 2,500 entries (67 KB joined): every store keeps it through writes and the end
    (Redis once raised ValueError at sign-in, a 500, where SQLite stored it)."""
    groups = tuple(f"/org/department-{i:05d}/team" for i in range(2500))
    s = make_session(1, groups=groups)
    await store.create(s)
    assert (await twin.read(s.key))[0] == s
    later = active(s, T0 + 10)
    assert await store.write(s, later) == APPLIED
    got = (await twin.read(s.key))[0]
    assert got.groups == groups
    assert await store.write(got, revoke(got, "logout", T0 + 11).session) == APPLIED
    assert (await twin.read(s.key))[0].groups == groups


async def test_create_refuses_an_existing_key(store: Any) -> None:
    s = make_session(1)
    await store.create(s)
    with pytest.raises(SessionExists):
        await store.create(make_session(1, user="mallory"))
    ended = s.with_(ended_at=T0 + 5, end_reason="logout")
    assert await store.write(s, ended) == APPLIED
    with pytest.raises(SessionExists):  # not even over an ended record: no resurrection (invariant 5)
        await store.create(make_session(1))
    assert (await store.read(s.key))[0] == ended


# ------------------------------------------------------------------ writes


async def test_forward_write_merges_and_clocks_never_move_back(store: Any) -> None:
    s = make_session(1)
    await store.create(s)
    newer = active(s, T0 + 10, ip="203.0.113.9")
    older = active(s, T0 + 5, limit=60.0, ip="203.0.113.5")  # a request that read earlier, landing later
    assert await store.write(s, newer) == APPLIED
    assert (await store.read(s.key))[0] == newer
    assert await store.write(s, older) == APPLIED
    stored = (await store.read(s.key))[0]
    assert stored == merge(newer, older)
    assert stored.last_seen_at == T0 + 10 and stored.ip == "203.0.113.9" and stored.expires_at == newer.expires_at
    for limit in (0.0, 60.0, 900.0, math.inf):  # invariant 4: no idle clock moved back ...
        assert vouched(stored.activity, limit) >= vouched(newer.activity, limit)
    assert vouched(stored.activity, 60.0) == T0 + 5  # ... and the stale write's news at 60 s was kept


async def test_forward_write_ignores_identity_fields(store: Any) -> None:
    """Only clocks (and the ip) merge; user, auth_time, created_at, mfa and groups stay as stored."""
    s = make_session(1)
    await store.create(s)
    forged = active(s, T0 + 1).with_(user="mallory", auth_time=T0 + 1, created_at=T0 + 1, mfa=True, groups=("root",))
    assert await store.write(s, forged) == APPLIED
    assert (await store.read(s.key))[0] == apply_write(s, s, forged)[1]


async def test_last_seen_only_write_keeps_newer_stored_clocks(store: Any) -> None:
    s = make_session(1)
    await store.create(s)
    a = active(s, T0 + 20, ip="203.0.113.20")
    assert await store.write(s, a) == APPLIED
    seen = s.with_(last_seen_at=T0 + 7, ip="203.0.113.7", expires_at=s.expires_at - 100)
    assert await store.write(s, seen) == APPLIED
    assert (await store.read(s.key))[0] == merge(a, seen) == a


async def test_write_to_ended_record_changes_nothing(store: Any) -> None:
    s = make_session(1)
    await store.create(s)
    over = revoke(s, "logout", T0 + 3).session
    assert await store.write(s, over) == APPLIED
    assert (await store.read(s.key))[0] == over
    assert await store.write(s, active(s, T0 + 4)) == ENDED  # no upsert resurrects it (invariant 5)
    assert await store.write(s, end(s, "admin", T0 + 5)) == ENDED  # the first end is final
    assert await store.write(over, over) == ENDED
    assert (await store.read(s.key))[0] == over


async def test_write_to_missing_record_creates_nothing(store: Any) -> None:
    s = make_session(1)
    assert await store.write(s, active(s, T0 + 1)) == ENDED
    assert await store.write(s, end(s, "logout", T0 + 1)) == ENDED
    assert (await store.read(s.key))[0] is None
    assert await store.sessions() == []


async def test_end_on_stale_clocks_conflicts(store: Any) -> None:
    s = make_session(1)
    await store.create(s)
    moved = active(s, T0 + 30)
    assert await store.write(s, moved) == APPLIED
    stale_end = sweep(s, 10.0, 3600.0, T0 + 20).session  # judged idle on the clocks it read
    assert stale_end.ended
    assert await store.write(s, stale_end) == CONFLICT
    assert (await store.read(s.key))[0] == moved
    assert await store.write(s.with_(auth_time=T0 - 1), end(moved, "logout", T0 + 31)) == CONFLICT
    assert (await store.read(s.key))[0] == moved


async def test_end_records_the_end_on_the_stored_record(store: Any) -> None:
    """Clocks other than activity/auth_time moving is no conflict; the stored ones are kept."""
    s = make_session(1)
    await store.create(s)
    seen = s.with_(last_seen_at=T0 + 8, ip="203.0.113.8", expires_at=s.expires_at + 8)
    assert await store.write(s, seen) == APPLIED
    assert await store.write(s, end(s, "logout", T0 + 9)) == APPLIED
    assert (await store.read(s.key))[0] == seen.with_(ended_at=T0 + 9, end_reason="logout")


async def test_concurrent_ends_exactly_one_applies(store: Any, twin: Any) -> None:
    """Invariant 6: a revoke and the sweeper race; one end is recorded, one event is owed."""
    sessions = [make_session(i) for i in range(20)]
    for s in sessions:
        await store.create(s)
    for s in sessions:
        by_admin, by_sweeper = end(s, "admin", T0 + 1), end(s, "idle", T0 + 2)
        results = await asyncio.gather(store.write(s, by_admin), twin.write(s, by_sweeper))
        assert sorted(r.value for r in results) == ["applied", "ended"]
        winner = by_admin if results[0] == APPLIED else by_sweeper
        assert (await twin.read(s.key))[0] == winner
        assert (await store.read(s.key))[0] == winner


async def test_handles_see_each_others_writes(store: Any, twin: Any) -> None:
    s = make_session(1)
    await store.create(s)
    a = active(s, T0 + 5)
    assert await twin.write(s, a) == APPLIED
    assert (await store.read(s.key))[0] == a
    assert await store.write(s, end(s, "idle", T0 + 6)) == CONFLICT


# ------------------------------------------------------------ queries


async def test_due_returns_live_sessions_past_their_deadline_in_order(store: Any) -> None:
    now = T0 + 1000
    expiring = {0: now - 10, 1: now - 500, 2: now, 3: now + 0.001, 4: now - 250, 5: math.inf}
    for n, at in expiring.items():
        await store.create(make_session(n, expires_at=at))
    await store.create(make_session(6, expires_at=now - 900, ended_at=now - 1, end_reason="logout"))
    due = await store.due(now, 100)
    assert [s.key for s in due] == [make_session(n).key for n in (1, 4, 0, 2)]
    assert [s.expires_at for s in due] == sorted(s.expires_at for s in due)
    assert [s.key for s in await store.due(now, 2)] == [make_session(n).key for n in (1, 4)]
    assert await store.due(now, 0) == []
    assert await store.due(now - 1000, 10) == []
    s1 = (await store.read(make_session(1).key))[0]
    assert await store.write(s1, sweep(s1, 60.0, 3600.0, now).session) == APPLIED
    assert [s.key for s in await store.due(now, 100)] == [make_session(n).key for n in (4, 0, 2)]


async def test_sessions_lists_live_ones_oldest_first(store: Any) -> None:
    await store.create(make_session(1, user="alice", t=T0 + 30))
    await store.create(make_session(2, user="bob", t=T0 + 20))
    await store.create(make_session(3, user="alice", t=T0 + 10))
    await store.create(make_session(4, user="alice", t=T0 + 5, ended_at=T0 + 6, end_reason="logout"))
    key = lambda n: make_session(n).key  # noqa: E731
    assert [s.key for s in await store.sessions("alice")] == [key(3), key(1)]
    assert [s.key for s in await store.sessions("bob")] == [key(2)]
    assert await store.sessions("nobody") == []
    assert [s.key for s in await store.sessions()] == [key(3), key(2), key(1)]
    assert (await store.sessions("alice"))[0] == make_session(3, user="alice", t=T0 + 10)


async def test_count_live(store: Any) -> None:
    assert await store.count_live() == 0
    a, b = make_session(1), make_session(2)
    await store.create(a)
    await store.create(b)
    assert await store.count_live() == 2
    assert await store.write(a, end(a, "logout", T0 + 1)) is APPLIED
    assert await store.count_live() == 1


async def test_purge_forgets_records_ended_before(store: Any) -> None:
    await store.create(make_session(1, ended_at=T0 + 10, end_reason="idle"))
    await store.create(make_session(2, ended_at=T0 + 20, end_reason="logout"))
    await store.create(make_session(3))
    assert await store.purge(T0 + 20) == 1  # ended exactly at the instant: kept
    assert (await store.read(make_session(1).key))[0] is None
    assert (await store.read(make_session(2).key))[0] is not None
    assert await store.purge(T0 + 1e9) == 1
    assert (await store.read(make_session(3).key))[0] == make_session(3)  # live ones never go
    assert await store.purge(T0 + 1e9) == 0


# --------------------------------------------------------------- users


async def test_users_crud(store: Any) -> None:
    assert await store.get_user("alice") is None
    assert await store.users() == []
    alice = User("alice", "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", admin=True, groups=("ops", "dev"),
                 created_at=T0, extra={"totp": {"secret": "JBSWY3DPEHPK3PXP"}, "recovery": ["a", "b"]})
    bob = User("bob", "h2", disabled=True, created_at=T0 + 0.5)
    await store.put_user(bob)
    await store.put_user(alice)
    got = await store.get_user("alice")
    assert got == alice and got.extra == alice.extra
    assert await store.users() == [alice, bob]
    replaced = User("alice", "h3", groups=(), created_at=T0, extra={})
    await store.put_user(replaced)
    got = await store.get_user("alice")
    assert got == replaced and got.extra == {} and not got.admin
    assert await store.delete_user("alice") is True
    assert await store.delete_user("alice") is False
    assert [u.name for u in await store.users()] == ["bob"]


# ------------------------------------------------------------ failures


async def test_failures_count_within_a_window_and_clear(store: Any) -> None:
    assert await store.failures("user:alice", T0, 60.0) == 0
    for n in range(1, 4):
        assert await store.failures("user:alice", T0 + n, 60.0, add=True) == n
    assert await store.failures("ip:192.0.2.1", T0, 60.0) == 0  # keys are independent
    assert await store.failures("user:alice", T0 + 59, 60.0) == 3
    assert await store.failures("user:alice", T0 + 61, 60.0) == 0  # the window began at T0+1: still 3 until T0+61
    assert await store.failures("user:alice", T0 + 62, 60.0, add=True) == 1  # a new window
    await store.clear_failures("user:alice")
    assert await store.failures("user:alice", T0 + 63, 60.0) == 0


async def test_failures_reserve_atomically_and_give_back(store: Any, twin: Any) -> None:
    """The login throttle counts an attempt before checking it and gives a right one back (web/attempts.py):
    concurrent reservations, from two handles, each get their own count; a give-back never goes below 0
    and never opens a window."""
    counts = await asyncio.gather(*(s.failures("ip:192.0.2.1", T0, 60.0, add=1) for s in [store, twin] * 20))
    assert sorted(counts) == list(range(1, 41))
    assert await store.failures("ip:192.0.2.1", T0 + 1, 60.0, add=-1) == 39
    assert await twin.failures("ip:192.0.2.1", T0 + 1, 60.0) == 39
    assert await store.failures("user:bob", T0, 60.0, add=-1) == 0  # nothing to give back: no window opened
    assert await store.failures("user:bob", T0 + 30, 60.0, add=1) == 1
    assert await store.failures("user:bob", T0 + 31, 60.0, add=-1) == 0
    assert await store.failures("user:bob", T0 + 32, 60.0, add=-1) == 0  # never below 0
    assert await store.failures("user:bob", T0 + 89, 60.0, add=1) == 1  # the window that began at T0+30 holds
    assert await store.failures("user:bob", T0 + 91, 60.0) == 0
    assert await store.failures("ip:192.0.2.1", T0 + 61, 60.0, add=-1) == 0  # an ended window is not reopened
    assert await store.failures("ip:192.0.2.1", T0 + 62, 60.0, add=1) == 1


# --------------------------------------------------------------- audit


async def test_audit_append_and_tail(store: Any) -> None:
    assert await store.tail_audit(5) == []
    first = [AuditEvent(T0 + i / 7, ev.DENIED, ev.FAILURE, "alice", "k" * 32, "wiki", "192.0.2.1", "GET /x", "idle")
             for i in range(3)]
    second = [AuditEvent(T0 + 10, ev.CREATED, ev.SUCCESS, "bob", "k" * 32, "billing", None),
              AuditEvent(T0 + 11, ev.LOGIN, ev.FAILURE, None, None, None, "::1", "POST /_lapse/login", None)]
    await store.append_audit(first)
    await store.append_audit(second)
    await store.append_audit([])
    assert await store.tail_audit(2) == second
    assert await store.tail_audit(100) == first + second
    assert await store.tail_audit(0) == []
    assert [e.to_dict() for e in await store.tail_audit(5)] == [e.to_dict() for e in first + second]


async def test_audit_purge_keeps_the_retention_window(store: Any) -> None:
    events = [AuditEvent(T0 + i, ev.CREATED, ev.SUCCESS, "alice") for i in range(5)]
    await store.append_audit(events)
    assert await store.purge_audit(T0 + 2) == 2
    assert await store.tail_audit(10) == events[2:]
    assert await store.purge_audit(T0 + 2) == 0


async def test_search_audit_filters_newest_first(store: Any) -> None:
    """Issue 8: the admin page's audit search and ``audit report`` read through this."""
    k1, k2 = "a" * 32, "b" * 32
    evidence = {"idle_s": 61.5, "age_s": 3600.0, "samples": 3, "gap_mean_s": 60.0, "gap_cv": 0.01}
    events = [
        AuditEvent(T0 + 1, ev.CREATED, ev.SUCCESS, "alice", k1, "wiki", "192.0.2.1"),
        AuditEvent(T0 + 2, ev.DENIED, ev.FAILURE, "alice", k1, "billing", "192.0.2.1", "GET /b", "idle"),
        AuditEvent(T0 + 3, ev.EXPIRED, ev.SUCCESS, "alice", k1, None, None, None, "idle", evidence),
        AuditEvent(T0 + 4, ev.REVOKED, ev.SUCCESS, "bob", k2, None, None, None, "admin", {"idle_s": 1.0}),
    ]
    await store.append_audit(events)
    assert await store.search_audit(AuditQuery()) == events[::-1]
    assert await store.search_audit(AuditQuery(), limit=1) == [events[3]]
    ends = await store.search_audit(AuditQuery(events=(ev.EXPIRED, ev.REVOKED)))
    assert ends == [events[3], events[2]]
    assert ends[1].activity == evidence  # the evidence round-trips
    assert await store.search_audit(AuditQuery(user="alice", app="billing")) == [events[1]]
    assert await store.search_audit(AuditQuery(session="a" * 12)) == events[2::-1]  # a handle is a prefix
    assert await store.search_audit(AuditQuery(reason="idle", since=T0 + 2.5)) == [events[2]]
    assert await store.search_audit(AuditQuery(since=T0 + 2, until=T0 + 4)) == [events[2], events[1]]
    assert await store.search_audit(AuditQuery(user="carol")) == []


def _event(name: str, s: Session, at: float, reason: str | None = None) -> AuditEvent:
    return AuditEvent(at, name, ev.SUCCESS, s.user, s.key, "wiki", s.ip, None, reason)


async def test_events_are_stored_with_the_change_exactly_when_it_is(store: Any, twin: Any) -> None:
    """Issue 8: ``create`` and ``write`` append their events with the state change, never without it."""
    s = make_session(1)
    created = [_event(ev.CREATED, s, T0)]
    await store.create(s, created)
    with pytest.raises(SessionExists):
        await store.create(s, [_event(ev.CREATED, s, T0 + 0.5)])
    assert await twin.tail_audit(10) == created

    moved = active(s, T0 + 10)
    assert await store.write(s, moved) == APPLIED  # no events: nothing appended
    stale_end = end(s, "idle", T0 + 20)
    assert await store.write(s, stale_end, [_event(ev.EXPIRED, s, T0 + 20, "idle")]) == CONFLICT
    assert await twin.tail_audit(10) == created

    step = moved.with_(last_seen_at=T0 + 12, ip="203.0.113.5")
    noted = [_event(ev.WARNING, step, T0 + 12)]
    assert await store.write(s, step, noted) == APPLIED  # stale ``before``: the slow path, events too
    expired = [_event(ev.EXPIRED, moved, T0 + 30, "idle")]
    assert await store.write(moved, end(moved, "idle", T0 + 30), expired) == APPLIED
    assert await twin.tail_audit(10) == created + noted + expired
    assert await twin.write(moved, end(moved, "admin", T0 + 31), [_event(ev.REVOKED, moved, T0 + 31)]) == ENDED
    assert await store.tail_audit(10) == created + noted + expired
    assert (await twin.read(s.key))[0].end_reason == "idle"


async def test_concurrent_ends_store_exactly_one_end_event(store: Any, twin: Any) -> None:
    """Invariant 6 with the audit: of two racing ends, the one that lands brings the only event."""
    sessions = [make_session(i) for i in range(10)]
    for s in sessions:
        await store.create(s)
    for s in sessions:
        results = await asyncio.gather(
            store.write(s, end(s, "admin", T0 + 1), [_event(ev.REVOKED, s, T0 + 1, "admin")]),
            twin.write(s, end(s, "idle", T0 + 2), [_event(ev.EXPIRED, s, T0 + 2, "idle")]),
        )
        assert sorted(r.value for r in results) == ["applied", "ended"]
    events = await store.tail_audit(100)
    assert sorted(e.session for e in events) == sorted(s.key for s in sessions)  # one each
    stored = {s.key: (await store.read(s.key))[0].end_reason for s in sessions}
    assert all(stored[e.session] == e.reason for e in events)  # the event is the end that landed


async def test_activity_statistics_round_trip_and_move_with_activity(store: Any) -> None:
    """Issue 8: ``stats`` is stored with the record and moves exactly when activity moves."""
    s = make_session(1)
    await store.create(s)
    assert (await store.read(s.key))[0].stats is None
    a1 = active(s, T0 + 60)
    assert a1.stats is not None and a1.stats.n == 1
    assert await store.write(s, a1) is APPLIED
    assert (await store.read(s.key))[0] == a1
    a2 = active(a1, T0 + 120.5)
    assert await store.write(a1, a2) is APPLIED
    got = (await store.read(s.key))[0]
    assert got.stats == a2.stats and got.stats.n == 2
    # A stale writer with older activity does not roll the statistics back.
    assert await store.write(s, a1.with_(last_seen_at=T0 + 200)) is APPLIED
    assert (await store.read(s.key))[0].stats == a2.stats
    long_path = observe(None, 1.0, T0, "/" + "é" * 100)
    assert isinstance(long_path, Activity) and len(long_path.path.encode()) <= 64


async def test_a_write_on_unchanged_clocks_may_move_the_deadline_earlier(store: Any) -> None:
    """A stricter policy after a reload: the sweeper's earlier deadline lands (late expiries otherwise)."""
    s = make_session(1)
    await store.create(s)
    earlier = s.with_(expires_at=s.expires_at - 1000)
    assert await store.write(s, earlier) is APPLIED
    assert (await store.read(s.key))[0].expires_at == earlier.expires_at
    # ...but a writer that judged stale clocks only ever moves it later.
    moved = active(earlier, T0 + 50)
    assert await store.write(earlier, moved) is APPLIED
    assert await store.write(earlier, earlier.with_(expires_at=T0 + 1, last_seen_at=T0 + 60)) is APPLIED
    assert (await store.read(s.key))[0].expires_at == moved.expires_at


# ------------------------------------------------------- property test

_examples = itertools.count()

TIMES = st.floats(min_value=-60.0, max_value=600.0, allow_nan=False)
LIMITS = st.sampled_from([None, 0.0, 60.0, 900.0, 3600.0, math.inf])
IPS = st.sampled_from([None, "192.0.2.1", "192.0.2.2", "2001:db8::9"])
IDX = st.integers(min_value=0, max_value=10_000)
WHO = st.integers(min_value=0, max_value=1)  # which session
VIA = st.integers(min_value=0, max_value=1)  # which handle

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("read"), WHO, VIA),
        st.tuples(st.just("active"), WHO, VIA, IDX, LIMITS, TIMES, IPS),  # before = a snapshot, possibly stale
        st.tuples(st.just("seen"), WHO, VIA, IDX, TIMES, IPS),  # last_seen/ip only
        st.tuples(st.just("extend"), WHO, VIA, IDX, TIMES),  # the sweeper moves expires_at (either way)
        st.tuples(st.just("cross"), WHO, VIA, IDX, IDX),  # after from another snapshot: maybe older than before
        st.tuples(st.just("forge"), WHO, VIA, IDX, TIMES),  # after changes fields a merge must not touch
        st.tuples(st.just("skew"), WHO, VIA, IDX, TIMES),  # before's auth_time is not the stored one
        st.tuples(st.just("end"), WHO, VIA, IDX, st.sampled_from(["idle", "absolute", "logout"]), TIMES),
    ),
    min_size=1,
    max_size=25,
)


def _after(op: tuple[Any, ...], snaps: list[Session]) -> tuple[Session, Session]:
    """(before, after) for a write op, from the snapshots seen of that session."""
    kind, _, _, i, *rest = op
    before = snaps[i % len(snaps)]
    if kind == "active":
        limit, dt, ip = rest
        return before, active(before, before.last_seen_at + dt, limit, ip)
    if kind == "seen":
        dt, ip = rest
        return before, before.with_(last_seen_at=before.last_seen_at + dt, ip=ip)
    if kind == "extend":
        (dt,) = rest
        return before, before.with_(expires_at=before.expires_at + dt)
    if kind == "cross":
        (j,) = rest
        return before, snaps[j % len(snaps)]
    if kind == "forge":
        (dt,) = rest
        forged = active(before, before.last_seen_at + abs(dt), 60.0)
        return before, forged.with_(auth_time=before.auth_time + dt, mfa=not before.mfa, groups=("x",), user="eve")
    if kind == "skew":
        (dt,) = rest
        skewed = before.with_(auth_time=before.auth_time + (dt or 1.0))
        return skewed, (active(before, before.last_seen_at + abs(dt)) if dt > 0 else end(before, "logout", T0 + 1))
    reason, dt = rest
    return before, end(before, reason, before.last_seen_at + abs(dt))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_histories_match_apply_write(
    adapter: Any, tmp_path: Path, clock: Any, ops: list[tuple[Any, ...]]
) -> None:
    """A fresh store per example; the ``clock`` fixture only supplies the store's clock."""
    place = tmp_path / f"example-{next(_examples)}"
    place.mkdir()
    originals = [
        make_session(0, user="alice"),
        make_session(1, user="bob", ip=None, groups=("g",)).with_(key="not-hex:bob"),
    ]

    async def scenario() -> None:
        first = adapter.open(place, clock)
        handles = [first, adapter.open(place, clock) if adapter.shared else first]
        try:
            model: dict[str, Session] = {}
            snaps: list[list[Session]] = [[s] for s in originals]
            for s in originals:
                await first.create(s)
                model[s.key] = s
            for op in ops:
                kind, who, via = op[:3]
                key = originals[who].key
                if kind == "read":
                    got, _ = await handles[via].read(key)
                    assert got == model[key]
                    snaps[who].append(got)
                    continue
                before, after = _after(op, snaps[who])
                expected, record = apply_write(model[key], before, after)
                got = await handles[via].write(before, after)
                assert got == expected, (op, before, after, model[key])
                if record is not None:
                    model[key] = record
                snaps[who].append(after)
                for s in originals:
                    assert (await handles[1 - via].read(s.key))[0] == model[s.key], (op, before, after)
        finally:
            for h in {id(h): h for h in handles}.values():
                await h.close()

    run(scenario())


# --------------------------------------------------------------- sso links


def make_link(session: str, **changes: Any) -> SsoLink:
    link = SsoLink(session, "https://idp.test", "sub-1", "sid-1", "id.token.x", "refresh-1", False, T0, T0 + 3600)
    return replace(link, **changes)


async def test_links_put_get_replace(store: Any) -> None:
    assert await store.get_link("k1") is None
    await store.put_link(make_link("k1"))
    assert await store.get_link("k1") == make_link("k1")
    await store.put_link(make_link("k1", refresh_token=None, checked_at=T0 + 5, admin=True))
    assert await store.get_link("k1") == make_link("k1", refresh_token=None, checked_at=T0 + 5, admin=True)


async def test_links_found_by_sid_else_subject_within_one_issuer(store: Any, twin: Any) -> None:
    await store.put_link(make_link("k1"))
    await store.put_link(make_link("k2", sid="sid-2"))
    await store.put_link(make_link("k3", sid=None, subject="sub-2"))
    await store.put_link(make_link("k4", issuer="https://other.test"))
    assert [x.session for x in await twin.find_links("https://idp.test", sid="sid-1")] == ["k1"]
    assert sorted(x.session for x in await twin.find_links("https://idp.test", subject="sub-1")) == ["k1", "k2"]
    assert [x.session for x in await twin.find_links("https://other.test", sid="sid-1")] == ["k4"]
    assert await twin.find_links("https://idp.test", sid="nope") == []
    assert await twin.find_links("https://idp.test") == []


async def test_first_use_once_until_it_expires(store: Any, twin: Any, clock: Any) -> None:
    assert await store.first_use("jti:a", T0 + 10) is True
    assert await twin.first_use("jti:a", T0 + 10) is False  # a replay, also through another handle
    assert await store.first_use("jti:b", T0 + 10) is True
    clock.advance(10)
    assert await store.first_use("jti:a", T0 + 20) is True  # forgotten once its time is up


async def test_forget_drops_a_marker_so_it_may_be_used_again(store: Any, twin: Any) -> None:
    """A back-channel logout that failed after marking its jti must be retryable (the marker is dropped)."""
    assert await store.first_use("jti:a", T0 + 10) is True
    assert await store.first_use("jti:b", T0 + 10) is True
    await twin.forget("jti:a")
    await twin.forget("jti:never")  # nothing to drop: no error
    assert await store.first_use("jti:a", T0 + 10) is True
    assert await store.first_use("jti:b", T0 + 10) is False  # the others stay


async def test_claim_is_set_once_and_permanent(store: Any, twin: Any, clock: Any) -> None:
    """The OIDC user-name binding: the first value holds, through every handle, past any purge."""
    assert await store.claim("oidc-user:bob", '["https://idp.test","sub-1"]') == '["https://idp.test","sub-1"]'
    assert await twin.claim("oidc-user:bob", '["https://idp.test","sub-2"]') == '["https://idp.test","sub-1"]'
    assert await store.claim("oidc-user:carol", "x\x1fé") == "x\x1fé"
    clock.advance(10 * 365 * 86400)
    await store.purge_links(T0 + 20 * 365 * 86400)
    assert await store.claim("oidc-user:bob", "other") == '["https://idp.test","sub-1"]'


async def test_a_released_claim_can_be_claimed_anew(store: Any, twin: Any) -> None:
    """An administrator gives a name to someone new (``lapse users unbind``): the next claim wins, once."""
    assert await store.claim("oidc-user:erin", "old") == "old"
    assert await twin.release("oidc-user:erin") is True
    assert await store.release("oidc-user:erin") is False
    assert await store.claim("oidc-user:erin", "new") == "new"
    assert await twin.claim("oidc-user:erin", "third") == "new"


async def test_concurrent_claims_exactly_one_wins(store: Any, twin: Any) -> None:
    answers = await asyncio.gather(*(h.claim("oidc-user:dave", f"v{i}") for i, h in enumerate([store, twin] * 5)))
    assert len(set(answers)) == 1 and answers[0] in {f"v{i}" for i in range(10)}


async def test_purge_links_forgets_what_is_past_keeping(store: Any, clock: Any) -> None:
    await store.put_link(make_link("old", keep_until=T0 + 1))
    await store.put_link(make_link("new", keep_until=T0 + 100))
    await store.first_use("jti:old", T0 + 1)
    await store.first_use("jti:new", T0 + 100)
    assert await store.purge_links(T0 + 50) == 2
    assert await store.get_link("old") is None
    assert await store.get_link("new") is not None
    assert await store.first_use("jti:new", T0 + 100) is False
