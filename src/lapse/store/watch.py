"""Revocation push: how a store tells long-lived connections that sessions ended.

A connection monitor (``lapse.monitor``) sleeps until its session's deadline.
Deadlines only move later through activity, so the only news that cannot wait
for the timer is a session that *ended early*: logout, ``lapse sessions
revoke``, a back-channel logout, a user disabled, re-authentication. Stores
that can say so implement ``watch``:

    unsubscribe = store.watch(callback)   # callback(keys) on the event loop

``keys`` is a set of session keys that ended (their monitors re-check now),
or ``None`` for "something may have ended, every monitor re-checks" (cheap:
a re-check is one read). The promise is *within one second* of the end being
written, by any handle, process or replica sharing the store.

How each adapter keeps it:

- memory: in-process, at once, from ``write``.
- sqlite: at once for ends written by this handle; for other handles (other
  workers, the CLI) a poller reads the shared change counter (one mmap read)
  every ``POLL`` seconds and, when it moved, asks the ``ended_at`` index which
  sessions ended lately.
- redis: the script that ends a session publishes its key on a channel; each
  process subscribes once and calls back with ``{key}``. A lost subscription
  (reconnect) calls back with ``None``.

Stores without ``watch`` still work: monitors then also wake every
``lapse.monitor.MAX_SLEEP`` seconds and look.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

log = logging.getLogger("lapse.store")

Callback = Callable[[frozenset[str] | None], None]


@runtime_checkable
class Watchable(Protocol):
    def watch(self, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` when sessions end (see the module doc); returns the unsubscribe function."""


class Watchers:
    """The callbacks of one store handle."""

    def __init__(self) -> None:
        self._callbacks: list[Callback] = []

    def __bool__(self) -> bool:
        return bool(self._callbacks)

    def add(self, callback: Callback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def notify(self, keys: Iterable[str] | None) -> None:
        ended = None if keys is None else frozenset(keys)
        if ended is not None and not ended:
            return
        for callback in list(self._callbacks):
            try:
                callback(ended)
            except Exception:  # one bad subscriber must not stop the others
                log.exception("session watch callback failed")
