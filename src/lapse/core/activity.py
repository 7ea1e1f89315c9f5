"""Activity statistics: what a session's active requests looked like, kept on its record.

Why on the record. The only cheap moment to learn about a request is the write
``decide()`` already makes when an active request moves an idle clock (at most
once per coalescing bound, about a second, per session). That write now also
folds the gap since the previous activity into a few running numbers, so the
hot path gains no write, no read and no event; a reused answer (nothing to
write) costs nothing at all. Passive requests are never counted.

What is kept (bounded: 28 bytes plus one path of at most 64 bytes):

- ``n``, ``mean``, ``m2``: Welford's running mean and sum of squared
  deviations of the gaps between activity writes, in seconds. Their
  coefficient of variation (std / mean) is near 0 for a script on a timer and
  well above 0.5 for a person.
- ``hours``: a 24-bit mask of the UTC hours of the day with activity.
- ``path``, ``votes``: the Boyer-Moore majority vote over the request paths
  of those writes. If one path made a share ``f`` of them, ``votes / n`` is a
  lower bound of ``f`` (exactly 1.0 when every write came from one path).

Gaps shorter than the coalescing bound are not seen (no write happens), so a
burst of clicks counts as one. With several replicas each write still lands
on the one record, so the numbers are whole.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

PATH_MAX = 64  # bytes of the majority path kept (UTF-8, cut at a character boundary)
_HEAD = struct.Struct("<IddII")  # n, mean, m2 (float64: records round-trip exactly), hours, votes


class Activity(NamedTuple):
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    hours: int = 0
    path: str = ""
    votes: int = 0

    @property
    def cv(self) -> float | None:
        """Coefficient of variation of the gaps (sample std / mean); None under two gaps."""
        if self.n < 2 or self.mean <= 0:
            return None
        return math.sqrt(max(self.m2, 0.0) / (self.n - 1)) / self.mean

    @property
    def hours_active(self) -> int:
        return self.hours.bit_count()

    @property
    def path_share(self) -> float:
        """A lower bound of the share of activity writes made by ``path``."""
        return self.votes / self.n if self.n else 0.0


def observe(stats: Activity | None, gap: float, now: float, path: str) -> Activity:
    """``stats`` after one more activity write, ``gap`` seconds after the previous one.

    On the write path of ``decide()``: kept to a handful of float operations (no encoding,
    no struct) in the common case of the same path as the majority candidate.
    """
    if stats is None:
        n, mean, m2, hours, kept, votes = 0, 0.0, 0.0, 0, "", 0
    else:
        n, mean, m2, hours, kept, votes = stats
    n += 1
    delta = gap - mean
    mean += delta / n
    m2 += delta * (gap - mean)
    hours |= 1 << int(now // 3600 % 24)
    if kept == path:
        votes += 1
    elif votes == 0:
        kept, votes = _cut(path), 1
    elif len(path) > PATH_MAX // 4 and kept == _cut(path):
        votes += 1
    else:
        votes -= 1
    return _new(Activity, (n, mean, m2, hours, kept, votes))


_new = tuple.__new__


def _cut(path: str) -> str:
    if len(path) <= PATH_MAX // 4:  # at most 4 bytes a character: short enough without encoding
        return path
    raw = path.encode("utf-8")
    return path if len(raw) <= PATH_MAX else raw[:PATH_MAX].decode("utf-8", "ignore")


def pack(stats: Activity | None) -> bytes | None:
    """The stored form (stores keep ``None`` as NULL / absent)."""
    if stats is None:
        return None
    return _HEAD.pack(stats.n, stats.mean, stats.m2, stats.hours, stats.votes) + stats.path.encode("utf-8")


def unpack(blob: bytes | None) -> Activity | None:
    if not blob:
        return None
    n, mean, m2, hours, votes = _HEAD.unpack_from(blob)
    return Activity(n, mean, m2, hours, bytes(blob[_HEAD.size :]).decode("utf-8", "replace"), votes)


def evidence(stats: Activity | None, *, created_at: float, last_active_at: float, now: float) -> dict[str, Any]:
    """The JSON object end events carry as ``activity`` (and the report's evidence)."""
    out: dict[str, Any] = {
        "idle_s": round(max(0.0, now - last_active_at), 3),
        "age_s": round(max(0.0, now - created_at), 3),
        "samples": 0,
    }
    if stats is not None and stats.n:
        cv = stats.cv
        out.update(
            samples=stats.n,
            gap_mean_s=round(stats.mean, 3),
            gap_cv=None if cv is None else round(cv, 4),
            hours=[h for h in range(24) if stats.hours >> h & 1],
            top_path=stats.path,
            top_path_share=round(stats.path_share, 4),
        )
    return out


__all__ = ["Activity", "evidence", "observe", "pack", "unpack"]
