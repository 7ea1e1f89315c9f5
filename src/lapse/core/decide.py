"""Everything that decides a session's fate lives here.

Theory of operation
-------------------
Two rules, as in h11's ``_state.py``:

1. These functions do not know who calls them. Forward-auth, the proxy, the
   sweeper, the CLI and the framework middleware all gather facts, call in, and
   carry out the answer. Nothing here reads a clock (``now`` is given: the
   store's clock), touches a socket or disk, or logs.
2. Every answer is a ``Decision``: the verdict, the record to write back (the
   very same object when nothing changed, so callers skip the write), and the
   audit events that happened. Nothing else changes a session.

A live session meets these checks in order; the first that fails decides:

    ended           the record has ended          -> deny, reason from END_AS
    session over    most generous limits passed   -> end (expired), deny
    ip revoke       new IP, on_ip_change=revoke   -> end (revoked: network), deny
    absolute        this app's absolute passed    -> deny absolute
    idle            this app's idle passed        -> deny idle
    ip step-up      new IP, on_ip_change=step_up  -> deny step_up
    allow rules     user/group not allowed        -> deny forbidden (403)
    step-up         privileged route, stale auth  -> deny step_up
    otherwise                                     -> allow; active requests move
                                                     the idle clock of their limit
                                                     (and fold into ``stats``)

Deadlines are instants: a request at or after one is refused (invariant 1).
Only allowed active requests move idle clocks (invariant 2); only sign-in
moves the absolute one. Activity under limit L vouches for L and laxer limits
only (invariant 3, see ``session.py``). A write may be skipped when it would
move an idle clock by less than ``coalesce_bound``: the session is then judged
early by at most that much, never late (invariant 8).

An allowed answer that writes nothing also says how long it holds
(``holds_until``): the first instant at which any check above could come out
otherwise. Until then the same record, effective policy and IP get the very
same answer, so a caller may reuse it instead of asking again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from . import events as ev
from .activity import evidence, observe
from .addresses import block
from .events import AuditEvent
from .policy import Effective, Limits
from .session import SIGN_IN, Session, record_activity, vouched


class Reason(StrEnum):
    """Why a request was refused (CONTRACT.md §4, ``X-Lapse-Reason``)."""

    MISSING = "missing"
    UNKNOWN = "unknown"
    IDLE = "idle"
    ABSOLUTE = "absolute"
    REVOKED = "revoked"
    STEP_UP = "step_up"
    NETWORK = "network"
    FORBIDDEN = "forbidden"


STATUS: dict[Reason | None, int] = {None: 200, Reason.FORBIDDEN: 403}
"""HTTP status per verdict; every other refusal is 401."""

END_AS: dict[str, Reason] = {"idle": Reason.IDLE, "absolute": Reason.ABSOLUTE, "network": Reason.NETWORK}
"""How a request on an ended session is refused, by the reason it ended; any other end is ``revoked``."""

EXPIRY_REASONS = frozenset({"idle", "absolute"})
"""End reasons that are expiries (``session.expired``); every other end is a revocation."""

LAST_SEEN_RESOLUTION = 1.0
"""``last_seen_at`` is informational: moving it by less than this is not worth a write."""


def coalesce_bound(limit: float | None) -> float:
    """How far an idle clock may lag (CONTRACT §3): min(1 s, 1% of the limit)."""
    return 1.0 if limit is None else min(1.0, 0.01 * limit)


@dataclass(frozen=True, slots=True)
class Request:
    """The facts of one request that ``decide`` needs beyond its effective policy."""

    method: str
    path: str
    ip: str | None = None
    session_key: str | None = None  # keyed hash of the presented cookie; None: no cookie

    @property
    def resource(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason | None
    session: Session | None  # the record to write back
    changed: bool  # ``session`` differs from the one read: write it
    events: tuple[AuditEvent, ...] = ()
    idle_deadline: float | None = None  # this app's deadlines, for allowed requests
    absolute_deadline: float | None = None
    holds_until: float = -math.inf  # the same inputs get this very answer before then (see ``decide``)

    @property
    def status(self) -> int:
        return STATUS.get(self.reason, 401)

    @property
    def deadline(self) -> float | None:
        """This app's earliest deadline (``X-Lapse-Expires-In`` counts down to it)."""
        found = [d for d in (self.idle_deadline, self.absolute_deadline) if d is not None]
        return min(found) if found else None


# ------------------------------------------------------------------ deadlines


def expires_at(auth_time: float, last_active: float, generous_idle: float, generous_absolute: float) -> float:
    """When the session as a whole is over: the most generous limits any app grants have passed."""
    return min(auth_time + generous_absolute, last_active + generous_idle)


def app_deadlines(session: Session, limits: Limits) -> tuple[float | None, float]:
    """(idle deadline, absolute deadline) of one app for this session."""
    return _deadlines(session, limits, vouched(session.activity, limits.idle))


def _deadlines(session: Session, limits: Limits, last_vouched: float) -> tuple[float | None, float]:
    """The one place an app's deadlines are computed, from the newest activity that vouches for it."""
    idle = None if limits.idle is None else last_vouched + limits.idle
    return idle, session.auth_time + limits.absolute


# ---------------------------------------------------------------- transitions


def sign_in(
    key: str,
    user: str,
    now: float,
    limits: Limits,
    *,
    auth_time: float | None = None,
    ip: str | None = None,
    mfa: bool = False,
    groups: tuple[str, ...] = (),
    login: str | None = None,
    step_up: bool = False,
    device: str | None = None,
    factor: str | None = None,
) -> Decision:
    """A new session. ``auth_time`` may be earlier than now (an IdP's), never later.

    ``login`` names the request that authenticated (``"POST /_lapse/login"``): the
    successful ``auth.login`` is then recorded with the new session's hash, before
    its ``session.created``. ``step_up``: this sign-in re-authenticated a live
    session of the same user (``session.step_up`` follows). ``device``: a label
    from ``core.device``, kept with the session for its user to recognise it.
    ``factor``: how the user authenticated, the ``auth.login`` event's reason (ASVS 5.0
    16.3.1); by default ``mfa`` (a password and a TOTP code) or ``password``.
    """
    auth = now if auth_time is None else min(auth_time, now)
    session = Session(
        key=key,
        user=user,
        auth_time=auth,
        created_at=now,
        activity=((SIGN_IN, now),),
        last_seen_at=now,
        expires_at=expires_at(auth, now, limits.generous_idle, limits.generous_absolute),
        ip=ip,
        mfa=mfa,
        groups=groups,
        device=device,
    )
    events = (AuditEvent(now, ev.CREATED, ev.SUCCESS, user, key, limits.app, ip),)
    if login is not None:
        how = factor or ("mfa" if mfa else "password")
        events = (AuditEvent(now, ev.LOGIN, ev.SUCCESS, user, key, limits.app, ip, login, how),) + events
    if step_up:
        why = "mfa" if mfa else "password"
        events += (AuditEvent(now, ev.STEP_UP, ev.SUCCESS, user, key, limits.app, ip, login, why),)
    idle, absolute = app_deadlines(session, limits)
    return Decision(True, None, session, True, events, idle, absolute)


def end(session: Session, reason: str, now: float) -> Session:
    """The ended record; the first end is final (invariant 5)."""
    if session.ended:
        return session
    return session.with_(ended_at=now, end_reason=reason)


def other_network(before: str, after: str) -> bool:
    """Whether an address change is a change of network for ``on_ip_change``: IPv4 addresses must be
    equal; IPv6 ones only share their /64, since privacy extensions (RFC 8981) rotate the rest of a
    device's address every few hours or per connection."""
    return block(before) != block(after)


def end_event(session: Session, reason: str, now: float, app: str | None, ip: str | None, resource: str | None) -> AuditEvent:
    """``session.expired`` / ``session.revoked``, with the session's activity evidence (``audit report``)."""
    name = ev.EXPIRED if reason in EXPIRY_REASONS else ev.REVOKED
    activity = evidence(session.stats, created_at=session.created_at, last_active_at=session.last_active_at, now=now)
    return AuditEvent(now, name, ev.SUCCESS, session.user, session.key, app, ip, resource, reason, activity)


def revoke(
    session: Session, reason: str, now: float, *, app: str | None = None, ip: str | None = None,
    resource: str | None = None,
) -> Decision:
    """End a session now (logout, admin, user disabled, re-authentication, ...). ``ip`` and ``resource``
    name the request that ended it, where one did (PCI DSS 10.2.2: the origination of the event)."""
    if session.ended:
        return Decision(False, END_AS.get(session.end_reason or "", Reason.REVOKED), session, False)
    ended = end(session, reason, now)
    return Decision(False, Reason.REVOKED, ended, True, (end_event(session, reason, now, app, ip, resource),))


def sweep(session: Session, generous_idle: float, generous_absolute: float, now: float) -> Decision:
    """The sweeper's question, asked when ``expires_at`` has passed: is this session over?

    Either it ends (one ``session.expired``), or it is not over after all (there
    was activity since, or the policy grew more generous) and the true deadline
    becomes the new bound. Requests never move ``expires_at``, so a busy session
    costs the sweeper one visit per generous idle period, and requests no index write.
    """
    if session.ended:
        return Decision(False, END_AS.get(session.end_reason or "", Reason.REVOKED), session, False)
    deadline = expires_at(session.auth_time, session.last_active_at, generous_idle, generous_absolute)
    if now >= deadline:
        reason = "absolute" if now >= session.auth_time + generous_absolute else "idle"
        ended = end(session, reason, now)
        return Decision(False, Reason(reason), ended, True, (end_event(session, reason, now, None, None, None),))
    if deadline != session.expires_at:
        return Decision(True, None, session.with_(expires_at=deadline), True)
    return Decision(True, None, session, False)


# --------------------------------------------------------------------- decide


def decide(session: Session | None, request: Request, effective: Effective, now: float) -> Decision:
    """May this request go on, and what happens to its session? (See the module docstring.)"""
    limits = effective.limits
    if session is None:
        if request.session_key is None:
            return Decision(False, Reason.MISSING, None, False)
        return _deny(None, Reason.UNKNOWN, request, limits, now, key=request.session_key)

    if session.ended:
        return _deny(session, END_AS.get(session.end_reason or "", Reason.REVOKED), request, limits, now)

    over = expires_at(session.auth_time, session.last_active_at, limits.generous_idle, limits.generous_absolute)
    if now >= over:
        reason = "absolute" if now >= session.auth_time + limits.generous_absolute else "idle"
        return _end_and_deny(session, reason, Reason(reason), request, limits, now)

    moved = request.ip is not None and session.ip is not None and request.ip != session.ip
    ip_changed = moved and other_network(session.ip, request.ip)  # type: ignore[arg-type]
    if ip_changed and limits.on_ip_change == "revoke":
        return _end_and_deny(session, "network", Reason.NETWORK, request, limits, now)

    last_vouched = vouched(session.activity, limits.idle)
    idle_deadline, absolute_deadline = _deadlines(session, limits, last_vouched)
    if now >= absolute_deadline:
        return _deny(session, Reason.ABSOLUTE, request, limits, now)
    if idle_deadline is not None and now >= idle_deadline:
        return _deny(session, Reason.IDLE, request, limits, now)
    if ip_changed and limits.on_ip_change == "step_up":
        return _deny(session, Reason.STEP_UP, request, limits, now, step_up="network")
    if not _allowed(session, limits):
        return _deny(session, Reason.FORBIDDEN, request, limits, now)
    step = effective.step_up
    step_at = math.inf
    if step is not None:
        step_at = session.auth_time + step.max_auth_age
        if now >= step_at:
            return _deny(session, Reason.STEP_UP, request, limits, now, step_up="max_auth_age")
        if step.mfa and not session.mfa:
            return _deny(session, Reason.STEP_UP, request, limits, now, step_up="mfa")

    # Allowed. Work out what, if anything, is worth writing back. ``expires_at`` stays:
    # activity only moves the end later, and the sweeper moves the bound when it gets there.
    write_at = last_vouched + coalesce_bound(limits.idle) if effective.active else math.inf
    seen_at = session.last_seen_at + LAST_SEEN_RESOLUTION
    updated = session
    if now >= write_at:
        updated = session.with_(
            activity=record_activity(session.activity, limits.idle, now),
            last_seen_at=max(now, session.last_seen_at),
            # Statistics ride on this write (there is no other): see core.activity.
            stats=observe(session.stats, now - session.last_active_at, now, request.path),
        )
        idle_deadline = _deadlines(updated, limits, now)[0]
    elif now >= seen_at:
        updated = session.with_(last_seen_at=now)
    if moved:
        updated = updated.with_(ip=request.ip)
    if updated is not session:
        return Decision(True, None, updated, True, (), idle_deadline, absolute_deadline)
    # Nothing to write: every threshold above is an instant, so until the first of them is
    # reached the same session, policy and IP get this same answer (callers may reuse it).
    holds = min(over, absolute_deadline, write_at, seen_at, step_at)
    if idle_deadline is not None:
        holds = min(holds, idle_deadline)
    return Decision(True, None, session, False, (), idle_deadline, absolute_deadline, holds)


# -------------------------------------------------------------------- helpers


def _allowed(session: Session, limits: Limits) -> bool:
    if limits.allow_users is None:
        return True
    return session.user in limits.allow_users or not limits.allow_groups.isdisjoint(session.groups)  # type: ignore[union-attr]


def _deny(
    session: Session | None,
    reason: Reason,
    request: Request,
    limits: Limits,
    now: float,
    *,
    key: str | None = None,
    step_up: str | None = None,
) -> Decision:
    """Refuse; ``step_up`` names why a fresh authentication is needed, when it is."""
    user = session.user if session else None
    key = session.key if session else key
    denied = AuditEvent(now, ev.DENIED, ev.FAILURE, user, key, limits.app, request.ip, request.resource, reason.value)
    if step_up:
        required = AuditEvent(
            now, ev.STEP_UP_REQUIRED, ev.SUCCESS, user, key, limits.app, request.ip, request.resource, step_up
        )
        return Decision(False, reason, session, False, (required, denied))
    return Decision(False, reason, session, False, (denied,))


def _end_and_deny(
    session: Session, end_reason: str, reason: Reason, request: Request, limits: Limits, now: float
) -> Decision:
    """The request that discovers the end ends the session, and is refused."""
    over = end_event(session, end_reason, now, limits.app, request.ip, request.resource)
    denied = _deny(session, reason, request, limits, now)
    return Decision(False, reason, end(session, end_reason, now), True, (over, *denied.events))


__all__ = [
    "Decision",
    "Reason",
    "Request",
    "app_deadlines",
    "coalesce_bound",
    "decide",
    "expires_at",
    "revoke",
    "sign_in",
    "sweep",
]
