"""Throttled checks of what a user knows and has: the password and the one-time code.

The sign-in form and the account pages ask for the same secrets, so they count
attempts in one way, within ``[login] window``:

- per network (``ip:``, an IPv4 address or an IPv6 /64: one host usually holds a whole /64)
  for passwords, locked at ``max_attempts``: guessing any account from one place;
- per user across all networks (``user:NAME``) for passwords, locked at ``USER_WIDE`` times
  ``max_attempts``: distributed guessing is bounded, but strangers elsewhere cannot lock
  the user out with a handful of wrong passwords;
- per user for one-time codes (``totp:NAME``), locked at ``max_attempts``.

An attempt is counted (reserved) atomically in the store *before* the secret is
checked, so concurrent requests (on any store, on any number of replicas) can never
check more than the limit; a right answer gives its attempt back. Every lock-out is
audited (``auth.throttled``, reason the counter's kind), and so is every wrong code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from ..audit import AuditLog
from ..core import events as ev
from ..core.addresses import block
from ..core.events import AuditEvent
from ..sealed import Sealer, SealError
from ..store.base import SessionStore, User
from ..totp import CLAIM_KEEP, Factor, spent_what
from ..totp import verify as verify_code

log = logging.getLogger("lapse.web")

USER_WIDE = 10
"""A user's password counter across all networks locks at this many times ``max_attempts``."""


def network(ip: str) -> str:
    """What a client's attempts count under: an IPv4 address as it is, an IPv6 address by its /64
    (counting full IPv6 addresses would give an attacker endless fresh counters)."""
    address = block(ip)
    return address.removesuffix("/32")


def password_keys(user: str | None, ip: str | None) -> list[str]:
    """The counters a password attempt takes, the network's first: an attempt refused there never
    reaches the user's counter, so one network adds at most ``max_attempts`` to it per window."""
    return ([f"ip:{network(ip)}"] if ip else []) + ([f"user:{user.lower()}"] if user else [])


class Attempts:
    def __init__(self, store: SessionStore, audit: AuditLog, sealer: Sealer, window: float, limit: int) -> None:
        self.store, self.audit, self.sealer, self.window, self.limit = store, audit, sealer, window, limit

    def limit_of(self, key: str) -> int:
        """A counter's lock: ``USER_WIDE`` times ``max_attempts`` for a user's password, else ``max_attempts``."""
        return self.limit * USER_WIDE if key.startswith("user:") else self.limit

    async def locked(self, keys: Sequence[str], now: float, *, user: str | None, ip: str | None,
                     resource: str) -> bool:
        """Is any of these counters at its limit? Then audited, with the kind of counter as the reason.

        A look only: whatever checks a secret afterwards must still ``reserve``.
        """
        for key in keys:
            if await self.store.failures(key, now, self.window) >= self.limit_of(key):
                await self._throttled(key, now, user, ip, resource)
                return True
        return False

    async def reserve(self, keys: Sequence[str], now: float, *, user: str | None, ip: str | None,
                      resource: str) -> bool:
        """Count one attempt on each counter, in order, before the secret is checked; False (audited) if one
        passes its limit, and then the counters taken before it get their attempt back (it was not checked).

        Each count is one atomic store operation, so of any number of concurrent attempts at most the
        limit are ever checked, whatever the store and the number of replicas.
        """
        taken: list[str] = []
        for key in keys:
            if await self.store.failures(key, now, self.window, add=1) > self.limit_of(key):
                for earlier in taken:
                    await self.store.failures(earlier, now, self.window, add=-1)
                await self._throttled(key, now, user, ip, resource)
                return False
            taken.append(key)
        return True

    async def password_right(self, keys: Sequence[str], now: float) -> None:
        """A right password: the user's counter starts again (only the password could do that), and the
        network's gives back this attempt but keeps its failures, or an attacker with an account of their
        own could wipe their network's count between guesses at someone else's."""
        for key in keys:
            if key.startswith("user:"):
                await self.store.clear_failures(key)
            else:
                await self.store.failures(key, now, self.window, add=-1)

    async def _throttled(self, key: str, now: float, user: str | None, ip: str | None, resource: str) -> None:
        await self.audit.emit([AuditEvent(now, ev.THROTTLED, ev.FAILURE, user, None, None, ip, resource,
                                          key.split(":", 1)[0])])

    async def try_code(self, name: str, code: str, now: float, ip: str | None, resource: str) -> bool | None:
        """Accept a one-time or recovery code of ``name`` and spend it (in the user record, and claimed
        in the store so two replicas cannot both accept it): True; a wrong one is audited: False; None
        (audited ``auth.throttled``) when the user's code counter is past its limit, and nothing is checked.

        The attempt is counted before the check (``reserve``), so concurrent guesses cannot outrun the
        limit; a right code clears the counter. The factor is read afresh right before the check and
        written right after: no other request of this process can slip the same code in between.
        """
        key = f"totp:{name.lower()}"
        if not await self.reserve([key], now, user=name, ip=ip, resource=resource):
            return None
        fresh = await self.store.get_user(name)
        factor = self._factor(fresh) if fresh is not None else None
        spent = verify_code(factor, code, now) if factor is not None else None
        if spent is not None and factor is not None:
            if not await self.store.first_use(f"{key}:{spent_what(factor, spent)}", now + CLAIM_KEEP):
                spent = None  # another replica accepted this very code a moment ago
        if spent is None or fresh is None:
            await self.audit.emit([AuditEvent(now, ev.LOGIN, ev.FAILURE, name, None, None, ip, resource, "bad_totp")])
            return False
        await self.store.put_user(replace(fresh, extra={**fresh.extra, "totp": spent.to_dict(self.sealer, fresh.name)}))
        await self.store.clear_failures(key)
        return True

    async def spend_code(self, name: str, code: str, now: float, ip: str | None, resource: str) -> bool:
        """``try_code`` where being throttled needs no page of its own: True only for an accepted code."""
        return await self.try_code(name, code, now, ip, resource) is True

    def _factor(self, user: User) -> Factor | None:
        """The user's factor; None (no code can be right) if its secret does not open, said in the log."""
        try:
            return Factor.from_extra(user.extra, self.sealer, user.name)
        except SealError as exc:
            log.error("one-time codes of user %r cannot be checked: %s; reset them with "
                      "`lapse users totp %s --reset`", user.name, exc, user.name)
            return None
