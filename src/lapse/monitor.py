"""A monitor per long-lived connection: cut it at its session's deadline, to the second.

Theory of operation (Teleport's ``srv.ConnectionMonitor``, without hoop's bug):

- A connection is judged when it opens, like any request (``Gate.check``).
- Its monitor then sleeps until "effective deadline - now" -- the deadline
  ``decide()`` gave, never a fresh full duration -- and asks the gate again
  (a passive check) when it wakes. Still allowed: it re-arms to the deadline
  it is given now. Refused: the connection is cut with the refusal's reason.
- Activity on the connection (a client's WebSocket message, a SQL query) is an
  active ``Gate.check``; when it moves the deadline, the monitor re-arms.
- Revocation is pushed: the store calls back (``store.watch``) with the keys of
  sessions that ended, their monitors wake and re-check at once, so a logout
  or ``lapse sessions revoke`` elsewhere cuts the connection within a second.
- A monitor also looks every ``MAX_SLEEP`` seconds whatever happens (a policy
  reload made limits stricter, a store without push).

No deadline is computed here: the monitor only asks the gate and waits.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .audit import AuditLog
from .core import events as ev
from .core.events import AuditEvent
from .enforce import Gate, Verdict
from .store.base import StoreUnavailable
from .store.watch import Watchable

log = logging.getLogger("lapse.monitor")

MAX_SLEEP = 30.0  # seconds a monitor sleeps at most, with or without push
LATE = 0.01  # wake this long after a deadline: a request at the deadline is refused, so the check cuts
SHARE = 0.05  # seconds a passive check's answer serves the other monitors of the same connection shape
RECENT_MAX = 100_000  # connection shapes whose last answer is kept (forgotten at once when full)
UNAVAILABLE = "unavailable"  # the reason a connection is cut with when the store cannot answer (fail closed)

Warn = Callable[[str, float], Awaitable[None]]
"""``warn(kind, seconds_left)``: told once per deadline, ``warn_before`` ahead of it (kind: idle/absolute)."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What a connection is judged by: the request that opened it."""

    host: str
    path: str
    method: str
    ip: str | None
    session_id: str
    resource: str  # for audit: "GET /ws", "postgres billing"


@dataclass(eq=False)
class Monitor:
    hub: Connections
    facts: Facts
    key: str
    user: str
    app: str | None
    warn: Warn | None = None
    deadline: float | None = None  # the instant it is armed for
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _warned: set[tuple[str, float]] = field(default_factory=set)

    def wake(self) -> None:
        self._wake.set()

    async def check(self, *, active: bool) -> Verdict:
        f = self.facts
        return await self.hub.gate().check(
            host=f.host, path=f.path, method=f.method, ip=f.ip, passive_header=not active, session_id=f.session_id
        )

    async def activity(self) -> str | None:
        """The connection was used: an active check. The refusal's reason, or None (re-armed if it moved)."""
        try:
            verdict = await self.check(active=True)
        except StoreUnavailable as exc:
            log.error("connection activity: store unavailable, cutting: %s", exc)
            return UNAVAILABLE
        d = verdict.decision
        if not d.allowed:
            return d.reason.value if d.reason else "missing"
        if d.deadline != self.deadline:
            self._wake.set()
        return None

    async def watch(self) -> str:
        """Sleep until the deadline, re-check, re-arm; return the reason when the connection must end."""
        while True:
            self._wake.clear()  # before the check: a push during it is not lost
            try:
                verdict = await self.hub.recheck(self)
            except StoreUnavailable as exc:
                log.error("connection monitor: store unavailable, cutting: %s", exc)
                return UNAVAILABLE
            d = verdict.decision
            if not d.allowed:
                return d.reason.value if d.reason else "missing"
            now = verdict.now
            self.deadline = d.deadline
            wait = MAX_SLEEP if d.deadline is None else min(MAX_SLEEP, d.deadline - now + LATE)
            if self.warn is not None:
                before = verdict.effective.limits.warn_before
                for kind, deadline in (("idle", d.idle_deadline), ("absolute", d.absolute_deadline)):
                    if deadline is None or (kind, deadline) in self._warned:
                        continue
                    if deadline - now <= before:
                        self._warned.add((kind, deadline))
                        await self.warn(kind, deadline - now)
                    else:
                        wait = min(wait, deadline - before - now)
            # A timer that sets the same event a push sets: one timer handle while armed. (``wait_for``
            # would wrap the wait in a task per arming, and cancel it on every timeout.)
            timer = asyncio.get_running_loop().call_later(max(0.0, wait), self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    def close(self) -> None:
        self.hub._forget(self)


class Connections:
    """This process's live monitors, by session key, and the store's push that wakes them."""

    def __init__(self, gate: Callable[[], Gate], audit: AuditLog, store: object) -> None:
        self.gate = gate
        self.audit = audit
        self.store = store
        self._by_key: dict[str, set[Monitor]] = {}
        self._unsubscribe: Callable[[], None] | None = None
        self._recent: dict[Facts, tuple[float, Verdict]] = {}  # the last passive check of each connection shape
        self._cut: list[tuple[Monitor, str, float]] = []  # connection.terminated waiting to be written (loop time)
        self._writing: asyncio.Task[None] | None = None

    async def recheck(self, monitor: Monitor) -> Verdict:
        """A monitor's passive check, shared by the monitors of one session that wake together.

        Many connections of one session (tabs, a client's pool) share its deadline, so their
        monitors wake in the same instant. The first asks the gate; the others, opened by the same
        request shape, take its answer if it is at most ``SHARE`` seconds old (loop clock), instead
        of each reading the store and auditing one more ``session.denied``: at 10,000 connections
        that is the difference between cutting them all at the deadline and seconds after it.
        """
        loop_now = asyncio.get_running_loop().time()
        seen = self._recent.get(monitor.facts)
        if seen is not None and loop_now - seen[0] <= SHARE:
            return seen[1]
        verdict = await monitor.check(active=False)
        if len(self._recent) >= RECENT_MAX:
            self._recent.clear()
        self._recent[monitor.facts] = (asyncio.get_running_loop().time(), verdict)
        return verdict

    def __len__(self) -> int:
        return sum(len(m) for m in self._by_key.values())

    def open(self, facts: Facts, verdict: Verdict, *, warn: Warn | None = None) -> Monitor:
        """A monitor for a connection the gate just allowed (``verdict``)."""
        session = verdict.decision.session
        assert session is not None and verdict.decision.allowed
        monitor = Monitor(self, facts, session.key, session.user, verdict.effective.limits.app, warn,
                          verdict.decision.deadline)
        self._by_key.setdefault(session.key, set()).add(monitor)
        if self._unsubscribe is None and isinstance(self.store, Watchable):
            self._unsubscribe = self.store.watch(self._woken)
        return monitor

    def _forget(self, monitor: Monitor) -> None:
        found = self._by_key.get(monitor.key)
        if found is not None:
            found.discard(monitor)
            if not found:
                del self._by_key[monitor.key]
                self._recent.pop(monitor.facts, None)
        if not self._by_key and self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _woken(self, keys: frozenset[str] | None) -> None:
        """The store says these sessions ended (None: maybe any): their monitors re-check now, afresh."""
        if keys is None:
            self._recent.clear()
            for monitors in self._by_key.values():
                for m in monitors:
                    m.wake()
            return
        for key in keys:
            for m in self._by_key.get(key, ()):
                self._recent.pop(m.facts, None)
                m.wake()

    def wake_all(self) -> None:
        """After a policy reload: limits may be stricter now."""
        self._woken(None)

    def terminated(self, monitor: Monitor, reason: str) -> None:
        """Audit ``connection.terminated`` for a connection lapse cut: queued, and written with the others
        cut in the same moment in one go (10,000 connections of one session end in one instant)."""
        self._cut.append((monitor, reason, asyncio.get_running_loop().time()))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.get_running_loop().create_task(self._write_cuts())

    async def _write_cuts(self) -> None:
        await asyncio.sleep(0)  # let the other cuts of this instant join
        while self._cut:
            batch, self._cut = self._cut, []
            try:
                now = await self.gate().store.now()
                written = asyncio.get_running_loop().time()
                await self.audit.emit([  # each stamped with when it was cut, by the store's clock
                    AuditEvent(now - (written - cut_at), ev.CONNECTION_TERMINATED, ev.SUCCESS, m.user, m.key, m.app,
                               m.facts.ip, m.facts.resource, reason)
                    for m, reason, cut_at in batch
                ])
            except StoreUnavailable as exc:
                log.error("%d connection.terminated event(s) not audited (store unavailable): %s", len(batch), exc)

    async def drain(self) -> None:
        """Wait until every queued ``connection.terminated`` is written (shutdown, tests)."""
        while self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)


def activity_pattern(text: str | None) -> re.Pattern[str] | None:
    """The ``websocket_activity`` regex of an app (None: every client message is activity)."""
    return None if text is None else re.compile(text)


__all__ = ["MAX_SLEEP", "Connections", "Facts", "Monitor", "activity_pattern"]
