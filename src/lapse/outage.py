"""One log line per store outage, not one per refused request.

When the store stops answering, every request is refused (503, fail closed),
and each would say so in the log: thousands of identical lines a second that
bury everything else. The first refusal is logged at once; later ones are
counted and summed up in at most one line every ``EVERY`` seconds while the
refusals go on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

EVERY = 10.0  # seconds between lines about the same outage


class OutageLog:
    def __init__(self, log: logging.Logger, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._what, self._clock = log, what, clock
        self._next = -math.inf
        self._quiet = 0  # refusals not logged since the last line

    def refused(self, exc: BaseException) -> None:
        now = self._clock()
        if now < self._next:
            self._quiet += 1
            return
        since = f" ({self._quiet} more refused since the last line)" if self._quiet else ""
        self._log.error("%s: %s%s", self._what, exc, since)
        self._next, self._quiet = now + EVERY, 0
