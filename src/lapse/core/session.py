"""The session record and its idle clocks.

A session serves several apps, each with its own idle limit, and activity
vouches for presence at its own limit and laxer ones, never stricter ones
(CONTRACT.md §3). The record keeps that as a *staircase*: pairs
``(limit, last activity made under that limit)``, sorted by limit, where every
step is newer than the one before it. A request judged under limit ``L`` looks
at the newest step with ``limit <= L``. Activity under ``L`` at ``now``
replaces every step at ``L`` and above (it is newer than all of them), so the
staircase never holds more steps than there are distinct idle limits. Sign-in
is the step at limit 0: it vouches for every app.

The record is stored under a keyed hash of the opaque session ID; the ID itself
never reaches the store, the audit log or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import NamedTuple

from .activity import Activity

Staircase = tuple[tuple[float, float], ...]
"""((idle limit in seconds, last activity at that limit), ...); limit 0 = sign-in, inf = no idle limit."""

SIGN_IN = 0.0
HANDLE_LEN = 12


def session_key(secret: bytes, session_id: str) -> str:
    """The keyed hash the store, audit and handles know a session by (128 bits, hex)."""
    return hmac.digest(secret, session_id.encode(), "sha256")[:16].hex()


class SessionKeys:
    """``session_key`` for one secret, a few times cheaper per call: HMAC-SHA256 (RFC 2104) with the
    secret's inner and outer pads hashed once. Why: it runs on every request, and a one-shot
    ``hmac.digest`` sets up OpenSSL's HMAC afresh each time (several microseconds on a cold cache).
    Recent answers are remembered (in this process's memory only, forgotten at once when full): a
    session's requests present the same ID again and again."""

    def __init__(self, secret: bytes) -> None:
        block = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        block = block.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self._known: dict[str, str] = {}

    def __call__(self, session_id: str) -> str:
        key = self._known.get(session_id)
        if key is None:
            inner = self._inner.copy()
            inner.update(session_id.encode())
            outer = self._outer.copy()
            outer.update(inner.digest())
            key = outer.digest()[:16].hex()
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[session_id] = key
        return key


_BLOCK = 64  # SHA-256's block size in bytes
_KNOWN_MAX = 65_536  # session IDs whose keys SessionKeys remembers


class Session(NamedTuple):
    """One sign-in. A named tuple: copies with a changed field are the hot path's main cost."""

    key: str
    user: str
    auth_time: float  # last (re-)authentication: the absolute clock runs from here
    created_at: float
    activity: Staircase
    last_seen_at: float  # any request, passive ones included (reporting only)
    expires_at: float  # never later than the end of the session: the sweeper's index (see decide.sweep)
    ip: str | None = None
    mfa: bool = False
    groups: tuple[str, ...] = ()
    ended_at: float | None = None
    end_reason: str | None = None
    stats: Activity | None = None  # gaps, hours and path of activity writes (core.activity); None: none yet
    device: str | None = None  # a short label set at sign-in (core.device), never the raw User-Agent

    @property
    def handle(self) -> str:
        """The short public name ``sessions list`` prints (a prefix of the keyed hash)."""
        return self.key[:HANDLE_LEN]

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def last_active_at(self) -> float:
        """The newest activity anywhere (the top step of the staircase)."""
        return self.activity[-1][1]

    def with_(self, **changes: object) -> Session:
        return self._replace(**changes)


def vouched(activity: Staircase, limit: float | None) -> float:
    """The newest activity that vouches for presence under ``limit`` (None = no limit)."""
    bound = math.inf if limit is None else limit
    last = -math.inf  # nothing vouches (a real record always has its sign-in step at 0)
    for lim, ts in activity:
        if lim > bound:
            break
        last = ts
    return last


def record_activity(activity: Staircase, limit: float | None, now: float) -> Staircase:
    """Activity under ``limit`` at ``now``: it becomes the step at ``limit`` and above."""
    lim = math.inf if limit is None else limit
    if vouched(activity, lim) >= now:
        return activity  # already vouched for at least as late: clocks never move back
    below = tuple(step for step in activity if step[0] < lim)
    above = tuple(step for step in activity if step[0] > lim and step[1] > now)
    return below + ((lim, now),) + above


def merge_activity(a: Staircase, b: Staircase) -> Staircase:
    """Both staircases' knowledge at once; clocks only move forward (invariant 4)."""
    out: list[tuple[float, float]] = []
    for lim, ts in sorted(a + b, key=lambda s: (s[0], -s[1])):
        if out and ts <= out[-1][1]:
            continue  # dominated: a stricter (or equal) limit already has newer activity
        if out and lim == out[-1][0]:
            continue
        out.append((lim, ts))
    return tuple(out)


def merge(current: Session, proposed: Session) -> Session:
    """What a store writes when ``proposed`` meets a newer ``current``: forward only.

    Clocks take the later value; an ended record stays ended with its first
    reason (invariant 5). ``expires_at`` is a lower bound of the end either
    writer saw, and the merged clocks end no earlier than either: the later
    bound is still a bound.
    """
    if current.ended:
        return current
    return current._replace(
        activity=merge_activity(current.activity, proposed.activity),
        last_seen_at=max(current.last_seen_at, proposed.last_seen_at),
        expires_at=max(current.expires_at, proposed.expires_at),
        ip=proposed.ip if proposed.last_seen_at >= current.last_seen_at else current.ip,
        ended_at=proposed.ended_at,
        end_reason=proposed.end_reason,
        stats=proposed.stats if proposed.last_active_at > current.last_active_at else current.stats,
    )
