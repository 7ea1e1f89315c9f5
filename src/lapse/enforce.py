"""Read, decide, write, audit: the one loop every adapter runs around the core.

Forward-auth, the proxy, the middleware, the sweeper and the CLI all come
through here, so they cannot disagree: they gather facts, and this module
reads the session with the store's clock, asks ``core.decide`` (or one of its
sibling transitions), writes back what it returned, and hands its events to
the audit log. When a write finds that someone else moved the session first,
the loop reads again and decides again, so the events that reach the audit log
are always those of the write that happened.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from .audit import AuditLog
from .core.decide import Decision, Reason, Request, decide, revoke, sign_in, sweep
from .core.policy import Effective, Policy
from .core.session import Session, SessionKeys
from .store.base import SessionStore, StoreUnavailable, WriteResult

log = logging.getLogger("lapse.sweeper")

ATTEMPTS = 5
SWEEP_BATCH = 1000
PURGE_EVERY = 60.0  # seconds between purges of ended records and old audit events
ANSWERS_MAX = 100_000  # reusable answers kept (forgotten at once when full)
SESSION_ID_BYTES = 32  # 256 bits from the OS CSPRNG; the cookie carries nothing else


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


class Verdict(NamedTuple):
    """A named tuple: one is made for every request, and a tuple is cheaper to make than a dataclass."""

    decision: Decision
    effective: Effective
    now: float


@dataclass(frozen=True, slots=True)
class _Answer:
    """An answer ``decide()`` said holds for a while, and what it was asked about."""

    session: Session
    effective: Effective
    ip: str | None
    decision: Decision


class Gate:
    def __init__(self, store: SessionStore, policy: Policy, audit: AuditLog, hash_key: bytes) -> None:
        self.store = store
        self.audit = audit
        self._keys = SessionKeys(hash_key)
        # By (session key, identity of the resolved policy: ``resolve`` hands back one object per
        # request shape): reused while it holds. An entry keeps its Effective alive, so its id is not reused.
        self._answers: dict[tuple[str, int], _Answer] = {}
        self.policy = policy
        # Told of each session whose end this process wrote (once: see ``_settle``); must not block or raise.
        # The OIDC adapter revokes the ended session's refresh token at the IdP (web/oidc.py).
        self.on_end: Callable[[Session], None] | None = None

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """Replaced whole on reload (never mutated); answers judged by the old one are forgotten."""
        self._policy = policy
        self._answers = {}

    def key_of(self, session_id: str) -> str:
        return self._keys(session_id)

    async def check(
        self,
        *,
        host: str,
        path: str,
        method: str = "GET",
        ip: str | None = None,
        passive_header: bool = False,
        session_id: str | None = None,
        quiet_unknown: bool = False,
    ) -> Verdict:
        """Judge one request (the path without its query string). ``quiet_unknown``: a cookie the store
        does not know is refused without its ``session.denied`` (a throttled flood: one event said it)."""
        effective = self.policy.resolve(host, path, method, ip, passive_header)
        if not session_id:
            now = await self.store.now()
            return Verdict(decide(None, Request(method, path, ip), effective, now), effective, now)
        key = self._keys(session_id)
        session, now = await self.store.read(key)
        if session is None and quiet_unknown:
            return Verdict(Decision(False, Reason.UNKNOWN, None, False), effective, now)
        # The steady state: the same record (stores hand back the object they hold until it
        # changes), policy and IP as last time, before the instant decide() said it holds to.
        reuse = self._answers.get((key, id(effective)))
        if (
            reuse is not None
            and reuse.session is session
            and reuse.effective is effective
            and reuse.ip == ip
            and now < reuse.decision.holds_until
        ):
            return Verdict(reuse.decision, effective, now)
        request = Request(method, path, ip, key)
        decision, now = await self._settle(key, lambda s, now: decide(s, request, effective, now), (session, now))
        if decision.holds_until > now and decision.session is not None:
            if len(self._answers) >= ANSWERS_MAX:
                self._answers.clear()
            self._answers[(key, id(effective))] = _Answer(decision.session, effective, ip, decision)
        return Verdict(decision, effective, now)

    async def sign_in(
        self,
        user: str,
        *,
        host: str = "",
        path: str = "/",
        ip: str | None = None,
        mfa: bool = False,
        groups: tuple[str, ...] = (),
        auth_time: float | None = None,
        replaces: str | None = None,
        login: str | None = None,
        device: str | None = None,
        factor: str | None = None,
    ) -> tuple[str, Decision]:
        """A new session with a new ID; the one it replaces (if any) ends with reason ``reauth``.

        Replacing a live session of the same user is a step-up (``session.step_up``).
        Past ``max_sessions``, the user's oldest sessions end (reason ``max_sessions``).
        ``device``: a ``core.device`` label, shown to the user and admins (never the raw header).
        """
        step_up = False
        if replaces:
            old, _ = await self._settle(
                self.key_of(replaces), lambda s, now: revoke(s, "reauth", now, ip=ip, resource=login) if s else NOTHING
            )
            step_up = bool(old.events) and old.session is not None and old.session.user == user
        session_id = new_session_id()
        limits = self.policy.resolve(host, path, "GET", ip).limits
        now = await self.store.now()
        decision = sign_in(
            self.key_of(session_id), user, now, limits, auth_time=auth_time, ip=ip, mfa=mfa, groups=groups,
            login=login, step_up=step_up, device=device, factor=factor,
        )
        assert decision.session is not None
        stored = self.audit.writes_to(self.store)
        await self.store.create(decision.session, decision.events if stored else ())
        await self.audit.emit(decision.events, stored_in=self.store if stored else None)
        limit = self.policy.spec.max_sessions
        if limit:
            others = [s for s in await self.store.sessions(user) if s.key != decision.session.key]
            for oldest in others[: max(0, len(others) + 1 - limit)]:  # sessions() is oldest first
                await self.revoke(oldest.key, "max_sessions", ip=ip, resource=login)
        return session_id, decision

    async def revoke(self, key: str, reason: str, *, ip: str | None = None, resource: str | None = None) -> bool:
        """End one session now; False if it had already ended (or never existed). ``ip`` and ``resource``:
        the request that ended it, if one did (its event says so)."""
        decision, _ = await self._settle(
            key, lambda s, now: revoke(s, reason, now, ip=ip, resource=resource) if s else NOTHING
        )
        return bool(decision.events)

    async def revoke_user(self, user: str, reason: str, *, ip: str | None = None, resource: str | None = None) -> int:
        return sum([await self.revoke(s.key, reason, ip=ip, resource=resource) for s in await self.store.sessions(user)])

    async def revoke_all(self, reason: str) -> int:
        return sum([await self.revoke(s.key, reason) for s in await self.store.sessions()])

    async def sweep_once(self, limit: int = SWEEP_BATCH) -> int:
        """End every session past its most generous deadline: one ``session.expired`` each.

        Safe with any number of replicas: each end is a guarded write, so only
        the one that lands announces it. Returns how many this call ended.
        """
        ended = 0
        while True:
            now = await self.store.now()
            due = await self.store.due(now, limit)
            for session in due:
                decision, _ = await self._settle(
                    session.key,
                    lambda s, now: sweep(s, self.policy.generous_idle, self.policy.generous_absolute, now)
                    if s
                    else NOTHING,
                )
                ended += bool(decision.events)
            if len(due) < limit:
                return ended

    async def _settle(
        self,
        key: str,
        judge: Callable[[Session | None, float], Decision],
        first: tuple[Session | None, float] | None = None,
    ) -> tuple[Decision, float]:
        """Read (or take ``first``, a read just made), judge, write until the write holds; then audit.

        Every end of a session (request-time expiry, revocation, sweep, reauth,
        max_sessions) is such a write, guarded on the record read: of all
        replicas, only the one whose write applied calls ``on_end``, once.

        A write's events go to the store's audit with the write itself (the ``store`` sink then skips
        them): an end and its event are stored together or not at all. Other sinks get them after.
        """
        for _ in range(ATTEMPTS):
            session, now = first if first is not None else await self.store.read(key)
            first = None
            decision = judge(session, now)
            stored_in = None
            ended = None
            if decision.changed and session is not None and decision.session is not None:
                events = decision.events if decision.events and self.audit.writes_to(self.store) else ()
                if await self.store.write(session, decision.session, events) is not WriteResult.APPLIED:
                    continue  # someone moved first: judge again what is there now
                stored_in = self.store if events else None
                if decision.session.ended and not session.ended:
                    ended = decision.session  # this write, and no other (a guarded write), ended it
            await self.audit.emit(decision.events, stored_in=stored_in)
            if ended is not None and self.on_end is not None:
                self.on_end(ended)
            return decision, now
        raise StoreUnavailable(f"session kept changing under {ATTEMPTS} attempts to write it")


NOTHING = Decision(False, Reason.UNKNOWN, None, False)
"""The answer for a revocation or sweep of a session the store does not know."""


async def run_sweeper(gate: Gate, interval: float, retention: float, stop: asyncio.Event) -> None:
    """Until ``stop``: end abandoned sessions every ``interval``; now and then forget what is past keeping.

    Ended records are kept as long as any cookie for them could still be
    presented (the most generous absolute limit), so a late request learns
    why it was refused; audit events for ``retention``. A store outage, or any
    other failure of a pass (an audit sink that cannot write), is logged once
    and retried; it never stops the loop.
    """
    last_purge = -math.inf
    failing = False
    while not stop.is_set():
        try:
            await gate.sweep_once()
            now = await gate.store.now()
            if now - last_purge >= PURGE_EVERY:
                await gate.store.purge(now - gate.policy.generous_absolute)
                await gate.store.purge_audit(now - retention)
                await gate.store.purge_links(now)  # OIDC links and jti markers past their time
                last_purge = now
            if failing:
                log.warning("sweeper: passes succeed again")
                failing = False
        except StoreUnavailable as exc:
            if not failing:
                log.error("sweeper: store unavailable, will retry: %s", exc)
                failing = True
        except Exception:  # noqa: BLE001 - whatever broke this pass (a sink, a bug), the next one runs
            if not failing:
                log.exception("sweeper: a pass failed, will retry")
                failing = True
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
