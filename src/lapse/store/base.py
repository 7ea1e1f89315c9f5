"""The store port: what every adapter (memory, SQLite, Redis) promises.

It is small on purpose. Reading returns the record together with the store's
clock, so every replica judges by one clock (invariant 7). Writing back what
``decide()`` returned is atomic and forward-only: clocks never move back
(invariant 4) and an ended record is never touched again (invariant 5).
Adapters differ in how they make that atomic, never in what it means; one
contract test suite (tests/store/) holds them all to it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..core.events import AuditEvent
from ..core.session import Session, merge


class WriteResult(enum.Enum):
    APPLIED = "applied"  # written (clock updates merged forward, or the end recorded)
    ENDED = "ended"  # the stored record had already ended: nothing written
    CONFLICT = "conflict"  # an end was proposed but the clocks moved since the read: re-read, re-decide


class SessionExists(ValueError):
    """``create`` was given a key the store already holds (never an upsert)."""


class StoreUnavailable(Exception):
    """The store cannot answer: callers fail closed (503) and say so."""


@dataclass(frozen=True, slots=True)
class User:
    """A local user, the embedded identity source."""

    name: str
    password_hash: str
    admin: bool = False
    disabled: bool = False
    groups: tuple[str, ...] = ()
    created_at: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)  # room for later factors (TOTP, recovery codes)


@dataclass(frozen=True, slots=True)
class SsoLink:
    """What lapse keeps about an OIDC sign-in, beside (never inside) its session record.

    Keyed by the session key. ``issuer``+``sid`` and ``issuer``+``subject`` find
    the sessions a back-channel logout names; ``id_token`` is the
    ``id_token_hint`` for RP-initiated logout; ``refresh_token`` and
    ``checked_at`` serve ``[oidc] revalidate_every``. The link may be forgotten
    after ``keep_until`` (no later than the session could live).
    """

    session: str
    issuer: str
    subject: str
    sid: str | None
    id_token: str | None
    refresh_token: str | None
    admin: bool
    checked_at: float
    keep_until: float


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """What ``search_audit`` matches: every field that is given must match (None / empty: any)."""

    events: tuple[str, ...] = ()  # event names, any of them
    user: str | None = None
    app: str | None = None
    session: str | None = None  # a keyed hash, or a prefix of one (a handle)
    reason: str | None = None
    since: float | None = None  # ts >= since
    until: float | None = None  # ts < until

    def matches(self, e: AuditEvent) -> bool:
        """The rule every adapter carries out (memory uses it directly)."""
        return (
            (not self.events or e.event in self.events)
            and (self.user is None or e.user == self.user)
            and (self.app is None or e.app == self.app)
            and (self.session is None or (e.session or "").startswith(self.session))
            and (self.reason is None or e.reason == self.reason)
            and (self.since is None or e.ts >= self.since)
            and (self.until is None or e.ts < self.until)
        )


class SessionStore(Protocol):
    """Every method may raise ``StoreUnavailable``.

    OIDC additions (small, for ``lapse.sso``): ``put_link``/``get_link``/
    ``find_links`` keep one ``SsoLink`` per session and find them by the IdP's
    ``sid`` or ``sub``; ``first_use`` is an atomic once-only marker with an
    expiry (logout-token ``jti`` replay, across replicas), ``forget`` drops
    one; ``claim`` is an atomic, permanent set-once value (the OIDC user-name
    binding); ``purge_links``
    forgets links and markers past their time (a store with native expiry,
    such as Redis, may make it a no-op).

    Issue 8 added, for ``audit report`` and the admin page: ``search_audit``
    (filtered audit events, newest first) and the session field ``stats``
    (``core.activity.Activity``: store it with the record; ``core.activity.pack``
    / ``unpack`` give a compact bytes form; a forward-only write carries the
    writer's ``stats`` exactly when it carries its activity, see ``merge``).

    Audit with the state change (issue 8, the ``store`` sink): ``create`` and
    ``write`` take the change's audit ``events`` (default: none) and append
    them to this store's audit exactly when the change is stored (``write``:
    when it returns APPLIED), in the same atomic step, so a crash cannot keep
    an end and lose its event. The one exception is a Redis Cluster, where the
    stream and the session live in different slots: there the events follow
    the write (docs/audit.md). Writes without events cost what they did.
    """

    async def now(self) -> float:
        """The store's clock, in Unix seconds."""

    async def read(self, key: str) -> tuple[Session | None, float]:
        """The record stored under ``key`` (ended ones included) and the store's clock, in one round trip."""

    async def create(self, session: Session, events: Sequence[AuditEvent] = ()) -> None:
        """Store a new session (a fresh key: never an upsert over an existing one), and its ``events``."""

    async def write(self, before: Session, after: Session, events: Sequence[AuditEvent] = ()) -> WriteResult:
        """Write back ``decide()``'s answer atomically, with its ``events`` when it is APPLIED.

        If ``after`` ends the session, the end is recorded only if the stored
        record has not ended and its clocks are still those of ``before``
        (else ENDED or CONFLICT): so each ended session yields exactly one end
        event, and no session is ended on stale clocks. Any other write merges
        ``after`` into the stored record forward-only (``core.session.merge``).
        """

    async def due(self, now: float, limit: int) -> list[Session]:
        """Live sessions whose ``expires_at`` has passed, oldest deadline first (for the sweeper)."""

    async def sessions(self, user: str | None = None) -> list[Session]:
        """Live sessions, all or one user's, oldest first."""

    async def count_live(self) -> int:
        """How many sessions have not ended (for the live-sessions gauge)."""

    async def purge(self, ended_before: float) -> int:
        """Forget records that ended before this instant; returns how many."""

    async def get_user(self, name: str) -> User | None: ...

    async def put_user(self, user: User) -> None:
        """Create or replace a user."""

    async def delete_user(self, name: str) -> bool: ...

    async def users(self) -> list[User]: ...

    async def append_audit(self, events: Sequence[AuditEvent]) -> None: ...

    async def tail_audit(self, n: int) -> list[AuditEvent]:
        """The newest ``n`` audit events, oldest first."""

    async def search_audit(self, query: AuditQuery, limit: int | None = None) -> list[AuditEvent]:
        """Audit events matching ``query`` (``AuditQuery.matches``), newest first, at most ``limit`` (None: all)."""

    async def purge_audit(self, before: float) -> int:
        """Forget audit events older than this instant (``[audit] retention``); returns how many."""

    async def failures(self, key: str, now: float, window: float, *, add: int = 0) -> int:
        """Attempts under ``key`` (a user, a network, a user's codes) in the current window, after adding ``add``.

        A window starts at its first attempt and lasts ``window`` seconds (login throttling). Adding is
        atomic (concurrent callers each see their own count), so a caller can reserve an attempt before
        checking it; ``add=-1`` gives one back, never below 0 and never opening a window.
        """

    async def clear_failures(self, key: str) -> None: ...

    async def put_link(self, link: SsoLink) -> None:
        """Create or replace the link of ``link.session``."""

    async def get_link(self, session: str) -> SsoLink | None: ...

    async def find_links(self, issuer: str, *, sid: str | None = None, subject: str | None = None) -> list[SsoLink]:
        """Links of this issuer with this ``sid`` if given, else with this ``subject`` (ended sessions included)."""

    async def first_use(self, key: str, until: float) -> bool:
        """True the first time ``key`` is offered (it is then remembered until ``until``, by the store's
        clock); False while it is remembered. Atomic: of two concurrent offers exactly one gets True."""

    async def forget(self, key: str) -> None:
        """Drop the ``first_use`` marker ``key`` (if any): an action that marked itself and then failed may be
        tried again (a back-channel logout the store could not finish, retried by the OP)."""

    async def claim(self, key: str, value: str) -> str:
        """Hold ``key`` for ``value`` unless something already holds it; the value that holds it now.

        Atomic and permanent (``purge_links`` never forgets a claim): of two concurrent claims exactly one
        value wins, and every later call sees it. The OIDC user-name binding (a name to one ``iss``+``sub``).
        """

    async def release(self, key: str) -> bool:
        """Drop the claim ``key`` (an administrator's act: a name given to someone new); False if none held it."""

    async def purge_links(self, before: float) -> int:
        """Forget links whose ``keep_until`` and markers whose ``until`` is before this instant; how many."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    async def close(self) -> None: ...


def apply_write(stored: Session | None, before: Session, after: Session) -> tuple[WriteResult, Session | None]:
    """The write rule every adapter carries out, as a pure function of what is stored.

    Adapters that can run Python inside their atomic section (memory, SQLite)
    call it directly; others (Redis) implement the same rule natively and are
    tested against it.
    """
    if stored is None or stored.ended:
        return WriteResult.ENDED, None
    if after.ended:
        if stored.activity != before.activity or stored.auth_time != before.auth_time:
            return WriteResult.CONFLICT, None
        return WriteResult.APPLIED, stored.with_(ended_at=after.ended_at, end_reason=after.end_reason)
    merged = merge(stored, after)
    if after.expires_at == before.expires_at:
        merged = merged.with_(expires_at=stored.expires_at)  # the writer left the sweeper's bound alone
    elif stored.activity == before.activity and stored.auth_time == before.auth_time:
        # The judge saw the clocks as they are: its bound holds, an earlier one included
        # (a policy reload may have made limits stricter).
        merged = merged.with_(expires_at=after.expires_at)
    return WriteResult.APPLIED, merged
