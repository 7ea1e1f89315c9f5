"""Throttled checks of what a user knows and has: the password and the one-time code.

The sign-in form and the account pages ask for the same secrets, so they count
wrong answers in one way: per user and per IP for passwords, per user for codes
(``totp:NAME``), within ``[login] window``, locked at ``max_attempts``; every
lock-out is audited (``auth.throttled``), and so is every wrong code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from ..audit import AuditLog
from ..core import events as ev
from ..core.events import AuditEvent
from ..sealed import Sealer, SealError
from ..store.base import SessionStore, User
from ..totp import CLAIM_KEEP, Factor, spent_what
from ..totp import verify as verify_code

log = logging.getLogger("lapse.web")


class Attempts:
    def __init__(self, store: SessionStore, audit: AuditLog, sealer: Sealer, window: float, limit: int) -> None:
        self.store, self.audit, self.sealer, self.window, self.limit = store, audit, sealer, window, limit

    async def locked(self, keys: Sequence[str], now: float, *, user: str | None, ip: str | None,
                     resource: str) -> bool:
        """Is any of these counters at its limit? Then audited, with the kind of counter as the reason."""
        for key in keys:
            if await self.store.failures(key, now, self.window) >= self.limit:
                await self.audit.emit([AuditEvent(now, ev.THROTTLED, ev.FAILURE, user, None, None, ip, resource,
                                                  key.split(":", 1)[0])])
                return True
        return False

    async def failed(self, keys: Sequence[str], now: float) -> None:
        for key in keys:
            await self.store.failures(key, now, self.window, add=True)

    async def spend_code(self, name: str, code: str, now: float, ip: str | None, resource: str) -> bool:
        """Accept a one-time or recovery code of ``name`` and spend it (in the user record, and claimed
        in the store so two replicas cannot both accept it); a wrong one is counted and audited.

        The factor is read afresh right before the check and written right after: no other request
        of this process can slip the same code in between (one event loop per store handle).
        """
        key = f"totp:{name.lower()}"
        fresh = await self.store.get_user(name)
        factor = self._factor(fresh) if fresh is not None else None
        spent = verify_code(factor, code, now) if factor is not None else None
        if spent is not None and factor is not None:
            if not await self.store.first_use(f"{key}:{spent_what(factor, spent)}", now + CLAIM_KEEP):
                spent = None  # another replica accepted this very code a moment ago
        if spent is None or fresh is None:
            await self.failed([key], now)
            await self.audit.emit([AuditEvent(now, ev.LOGIN, ev.FAILURE, name, None, None, ip, resource, "bad_totp")])
            return False
        await self.store.put_user(replace(fresh, extra={**fresh.extra, "totp": spent.to_dict(self.sealer, fresh.name)}))
        await self.store.clear_failures(key)
        return True

    def _factor(self, user: User) -> Factor | None:
        """The user's factor; None (no code can be right) if its secret does not open, said in the log."""
        try:
            return Factor.from_extra(user.extra, self.sealer, user.name)
        except SealError as exc:
            log.error("one-time codes of user %r cannot be checked: %s; reset them with "
                      "`lapse users totp %s --reset`", user.name, exc, user.name)
            return None
