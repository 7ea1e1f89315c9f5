"""``memory://``: everything in one process's dicts. For tests and single-process demos."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from ..core.events import AuditEvent
from ..core.session import Session
from .base import AuditQuery, SessionExists, SsoLink, User, WriteResult, apply_write
from .watch import Callback, Watchers

AUDIT_KEEP = 100_000


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._users: dict[str, User] = {}
        self._audit: deque[AuditEvent] = deque(maxlen=AUDIT_KEEP)
        self._failures: dict[str, tuple[float, int]] = {}
        self._links: dict[str, SsoLink] = {}
        self._once: dict[str, float] = {}
        self._claims: dict[str, str] = {}
        self._watchers = Watchers()

    async def now(self) -> float:
        return self._clock()

    async def read(self, key: str) -> tuple[Session | None, float]:
        return self._sessions.get(key), self._clock()

    async def create(self, session: Session, events: Sequence[AuditEvent] = ()) -> None:
        if session.key in self._sessions:
            raise SessionExists("session key already exists")
        self._sessions[session.key] = session
        self._audit.extend(events)  # no await in between: one atomic step on the event loop

    async def write(self, before: Session, after: Session, events: Sequence[AuditEvent] = ()) -> WriteResult:
        result, record = apply_write(self._sessions.get(before.key), before, after)
        if record is not None:
            self._sessions[before.key] = record
            self._audit.extend(events)
            if record.ended:
                self._watchers.notify((before.key,))
        return result

    def watch(self, callback: Callback) -> Callable[[], None]:
        """Ends are told at once (in-process: see ``store.watch``)."""
        return self._watchers.add(callback)

    async def due(self, now: float, limit: int) -> list[Session]:
        found = sorted((s for s in self._sessions.values() if not s.ended and s.expires_at <= now),
                       key=lambda s: s.expires_at)
        return found[:limit]

    async def sessions(self, user: str | None = None) -> list[Session]:
        live = (s for s in self._sessions.values() if not s.ended and (user is None or s.user == user))
        return sorted(live, key=lambda s: s.created_at)

    async def count_live(self) -> int:
        return sum(not s.ended for s in self._sessions.values())

    async def purge(self, ended_before: float) -> int:
        gone = [k for k, s in self._sessions.items() if s.ended_at is not None and s.ended_at < ended_before]
        for k in gone:
            del self._sessions[k]
        return len(gone)

    async def get_user(self, name: str) -> User | None:
        return self._users.get(name)

    async def put_user(self, user: User) -> None:
        self._users[user.name] = user

    async def delete_user(self, name: str) -> bool:
        return self._users.pop(name, None) is not None

    async def users(self) -> list[User]:
        return sorted(self._users.values(), key=lambda u: u.name)

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        self._audit.extend(events)

    async def tail_audit(self, n: int) -> list[AuditEvent]:
        return list(self._audit)[-n:] if n > 0 else []

    async def search_audit(self, query: AuditQuery, limit: int | None = None) -> list[AuditEvent]:
        found: list[AuditEvent] = []
        for e in reversed(self._audit):
            if query.matches(e):
                found.append(e)
                if limit is not None and len(found) >= limit:
                    break
        return found

    async def purge_audit(self, before: float) -> int:
        kept = [e for e in self._audit if e.ts >= before]
        gone = len(self._audit) - len(kept)
        self._audit = deque(kept, maxlen=AUDIT_KEEP)
        return gone

    async def failures(self, key: str, now: float, window: float, *, add: int = 0) -> int:
        start, count = self._failures.get(key, (now, 0))
        if now - start >= window:
            start, count = now, 0
        if add > 0 or (add < 0 and count > 0):
            count = max(0, count + add)
            self._failures[key] = (start, count)
        return count

    async def clear_failures(self, key: str) -> None:
        self._failures.pop(key, None)

    async def put_link(self, link: SsoLink) -> None:
        self._links[link.session] = link

    async def get_link(self, session: str) -> SsoLink | None:
        return self._links.get(session)

    async def find_links(self, issuer: str, *, sid: str | None = None, subject: str | None = None) -> list[SsoLink]:
        if sid is not None:
            return [x for x in self._links.values() if x.issuer == issuer and x.sid == sid]
        if subject is not None:
            return [x for x in self._links.values() if x.issuer == issuer and x.subject == subject]
        return []

    async def first_use(self, key: str, until: float) -> bool:
        if self._once.get(key, -1.0) > self._clock():
            return False
        self._once[key] = until
        return True

    async def forget(self, key: str) -> None:
        self._once.pop(key, None)

    async def claim(self, key: str, value: str) -> str:
        return self._claims.setdefault(key, value)

    async def release(self, key: str) -> bool:
        return self._claims.pop(key, None) is not None

    async def purge_links(self, before: float) -> int:
        links = [k for k, x in self._links.items() if x.keep_until < before]
        once = [k for k, t in self._once.items() if t < before]
        for k in links:
            del self._links[k]
        for k in once:
            del self._once[k]
        return len(links) + len(once)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
