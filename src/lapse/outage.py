"""One log line per store outage, not one per refused request.

When the store stops answering, every request is refused (503, fail closed),
and each would say so in the log: thousands of identical lines a second that
bury everything else. The first refusal is logged at once, and so is the first
of any other cause; the rest are counted and summed up in at most one line
every ``EVERY`` seconds while the refusals go on. A pause longer than that
starts a new outage, whose first line says what the previous one left unsaid.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

EVERY = 10.0  # seconds between lines about the same outage and cause


class OutageLog:
    def __init__(self, log: logging.Logger, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._what, self._clock = log, what, clock
        self._next = self._last = -math.inf
        self._said: set[str] = set()  # causes logged since ``_next - EVERY``
        self._quiet = 0  # refusals not logged since the last line

    def refused(self, exc: BaseException) -> None:
        now, cause = self._clock(), str(exc)
        new_outage, self._last = now - self._last > EVERY, now
        if not new_outage and now < self._next and cause in self._said:
            self._quiet += 1
            return
        if now >= self._next or new_outage:
            self._next, self._said = now + EVERY, set()
        note = ""
        if self._quiet:
            note = f" ({self._quiet} more refused {'in the previous outage' if new_outage else 'since the last line'})"
        self._log.error("%s: %s%s", self._what, exc, note)
        self._said.add(cause)
        self._quiet = 0
