"""ARCHITECTURE.md invariants 1-6 and 8, over random histories of requests across
several apps, random policies and random clocks.

Each history runs through the real loop (``enforce.Gate`` over ``MemoryStore``
with a settable clock) and is checked against a model written from
CONTRACT.md §3 alone: the activity the model counts is only what the gateway
allowed, and every verdict must agree with the model's deadlines, with the one
latitude the contract grants (coalesced writes may judge a session idle early
by at most min(1 s, 1% of the limit), never late).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lapse.audit import AuditLog, StoreSink
from lapse.core.decide import coalesce_bound
from lapse.core.policy import AppSpec, Layer, NetworkSpec, PolicySpec, compile_policy
from lapse.core.session import vouched
from lapse.enforce import Gate
from lapse.store.memory import MemoryStore
from lapse.store.sqlite import SqliteStore

from .helpers import Clock, ListSink

END_EVENTS = {"session.expired", "session.revoked"}

idle_values = st.one_of(st.none(), st.sampled_from([2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 400.0]))


@st.composite
def policies(draw):
    n_apps = draw(st.integers(1, 4))
    apps = []
    for i in range(n_apps):
        settings_ = {"idle": draw(idle_values), "absolute": draw(st.sampled_from([5.0, 60.0, 200.0, 1200.0]))}
        apps.append(AppSpec(f"app{i}", (f"app{i}.test",), Layer(settings_)))
    networks = (
        NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"),), draw(st.sampled_from([0.5, 1.0, 2.0])),
                    draw(st.sampled_from([1.0, 1.5]))),
    )
    max_idle = draw(st.one_of(st.none(), st.integers(2, 600).map(float)))
    max_absolute = draw(st.one_of(st.none(), st.integers(5, 2000).map(float)))
    return PolicySpec(
        defaults=Layer({"idle": draw(idle_values), "absolute": 600.0}),
        apps=tuple(apps),
        networks=networks,
        max_idle=max_idle,
        max_absolute=max_absolute,
    )


step = st.tuples(
    st.one_of(st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0, 4.0, 9.0, 20.0, 45.0, 100.0]), st.floats(0, 150)),  # clock advance
    st.sampled_from(["request", "request", "request", "request", "sweep", "revoke"]),
    st.integers(0, 4),  # app index (4: a host no app claims)
    st.booleans(),  # passive
    st.sampled_from(["10.1.2.3", "203.0.113.9"]),
)


class Model:
    """CONTRACT.md §3, written out plainly: what a session's deadlines are."""

    def __init__(self, auth: float, generous_idle: float, generous_absolute: float) -> None:
        self.auth = auth
        self.activity: list[tuple[float, float]] = []  # (idle limit, time) of allowed active requests
        self.gi, self.ga = generous_idle, generous_absolute
        self.ended = False

    def idle_deadline(self, limit: float | None) -> float:
        if limit is None:
            return math.inf
        times = [self.auth] + [t for lim, t in self.activity if lim <= limit]
        return max(times) + limit

    def over(self) -> float:
        last = max([self.auth] + [t for _, t in self.activity])
        return min(self.auth + self.ga, last + self.gi)


def run(coro):
    return asyncio.run(coro)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=policies(), history=st.lists(step, min_size=3, max_size=40), start=st.floats(1e9, 2e9))
def test_random_histories_keep_every_invariant(spec, history, start):
    run(_history(spec, history, start, MemoryStore))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=policies(), history=st.lists(step, min_size=3, max_size=40), start=st.floats(1e9, 2e9))
def test_random_histories_keep_every_invariant_on_sqlite(spec, history, start):
    """The same histories on the embedded default store."""
    with tempfile.TemporaryDirectory() as folder:
        run(_history(spec, history, start, lambda clock: SqliteStore(Path(folder) / "lapse.db", clock)))


async def _history(spec, history, start, make_store):
    clock = Clock(start)
    store = make_store(clock)
    sink = ListSink()
    policy = compile_policy(spec)
    gate = Gate(store, policy, AuditLog([sink]), b"k" * 32)
    sid, created = await gate.sign_in("alice", host="app0.test", ip="10.1.2.3")
    key = gate.key_of(sid)
    model = Model(clock.now, policy.generous_idle, policy.generous_absolute)
    limits_seen = sorted({(math.inf if c.idle is None else c.idle) for c in policy._limits.values()})

    async def stored():
        return (await store.read(key))[0]

    previous = await stored()
    for advance, op, app, passive, ip in history:
        clock.now += advance
        t = clock.now
        before = await stored()
        ends_before = sink.count(END_EVENTS)
        if op == "request":
            verdict = await gate.check(
                host=f"app{app}.test", path="/p", ip=ip, passive_header=passive, session_id=sid
            )
            d, lim = verdict.decision, verdict.effective.limits
            if d.allowed:
                # Invariant 1: never allowed at or after a deadline.
                assert not model.ended
                assert t < model.auth + lim.absolute
                assert t < model.idle_deadline(lim.idle)
                assert t < model.over()
                if verdict.effective.active:
                    model.activity.append((math.inf if lim.idle is None else lim.idle, t))
                else:
                    # Invariant 2: passive requests never move an idle clock.
                    assert (await stored()).activity == before.activity
            else:
                reason = d.reason.value
                if model.ended:
                    assert reason in {"idle", "absolute", "revoked"}
                elif reason == "absolute":
                    assert t >= min(model.auth + lim.absolute, model.auth + model.ga)
                elif reason == "idle":
                    # Invariant 8: early by at most the coalescing bound, never late.
                    early = min(model.idle_deadline(lim.idle) - coalesce_bound(lim.idle),
                                model.over() - coalesce_bound(model.gi))
                    assert t >= early - 1e-6, (t, early)
                else:
                    raise AssertionError(f"unexpected reason {reason}")
        elif op == "sweep":
            await gate.sweep_once()
        else:
            await gate.revoke(key, "admin")
        after = await stored()
        # Only the sign-in moves the absolute clock.
        assert after.auth_time == model.auth
        # Invariant 4: clocks only move forward.
        for lim in limits_seen:
            assert vouched(after.activity, lim) >= vouched(previous.activity, lim)
        # Invariant 5: an ended session never comes back.
        if previous.ended:
            assert after == previous
        if after.ended and not model.ended:
            model.ended = True
            if after.end_reason in {"idle", "absolute"}:
                assert t >= model.over() - coalesce_bound(model.gi) - 1e-6
            # Invariant 6: the end was announced exactly once, by whoever ended it.
            assert sink.count(END_EVENTS) == ends_before + 1
        else:
            assert sink.count(END_EVENTS) == ends_before
        previous = after

    # Nobody comes back: the sweeper still ends it, with exactly one event in all.
    clock.now += policy.generous_absolute + 1
    await gate.sweep_once()
    assert (await stored()).ended
    assert sink.count(END_EVENTS) == 1
    assert created.events[0].event == "session.created"
    await store.close()


class StallingStore(MemoryStore):
    """Yields to the event loop between a read and a write, so gathered requests interleave."""

    async def read(self, key):
        result = await super().read(key)
        await asyncio.sleep(0)
        return result

    async def write(self, before, after, events=()):
        await asyncio.sleep(0)
        return await super().write(before, after, events)


@settings(max_examples=100, deadline=None)
@given(
    plan=st.lists(st.tuples(st.floats(0, 40), st.lists(st.sampled_from(["a", "b", "sweep", "revoke"]), max_size=6)),
                  max_size=12),
)
def test_concurrent_replicas_end_each_session_once(plan):
    """Invariants 4-6 under interleaving: many callers at one instant, one end event."""
    run(_concurrent(plan))


async def _concurrent(plan):
    clock = Clock(1_700_000_000.0)
    store = StallingStore(clock)
    sink = ListSink()
    spec = PolicySpec(
        apps=(AppSpec("a", ("a.test",), Layer({"idle": 30.0, "absolute": 300.0})),
              AppSpec("b", ("b.test",), Layer({"idle": 60.0, "absolute": 200.0}))),
    )
    # With the store sink too: ends reach the store's audit with their write (issue 8), still once each.
    gates = [Gate(store, compile_policy(spec), AuditLog([StoreSink(store), sink]), b"k" * 32) for _ in range(3)]
    sid, _ = await gates[0].sign_in("bob", host="a.test")
    key = gates[0].key_of(sid)
    previous = (await store.read(key))[0]
    for advance, ops in plan:
        clock.now += advance
        calls = []
        for i, op in enumerate(ops):
            gate = gates[i % 3]
            if op == "sweep":
                calls.append(gate.sweep_once())
            elif op == "revoke":
                calls.append(gate.revoke(key, "admin"))
            else:
                calls.append(gate.check(host=f"{op}.test", path="/", session_id=sid))
        await asyncio.gather(*calls)
        now_rec = (await store.read(key))[0]
        for lim in (0.0, 30.0, 60.0, math.inf):
            assert vouched(now_rec.activity, lim) >= vouched(previous.activity, lim)
        if previous.ended:
            assert now_rec == previous
        assert sink.count(END_EVENTS) == (1 if now_rec.ended else 0)
        assert [e.event for e in await store.tail_audit(100)] == [e.event for e in sink.events]
        previous = now_rec
    clock.now += gates[1].policy.generous_absolute + 1
    await gates[1].sweep_once()
    assert sink.count(END_EVENTS) == 1
