"""``lapse audit report``: what the audit log says (CONTRACT.md §5, issue 8).

Read-only and pure over its inputs: the end events (``session.expired``,
``session.revoked``, each with the session's ``activity`` evidence, see
``core.activity``), the ``session.created`` events (which app a session signed
in to), and the live sessions with their running statistics. The same
function serves the CLI (``--json``, ``--png``) and the admin page.

Sources. ``store``: the ``store`` sink, filtered in the store
(``SessionStore.search_audit``); ``jsonl``: a ``jsonl:`` sink's file, read
line by line, where only lines that name one of the three events are parsed.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..core import events as ev
from ..core.activity import evidence
from ..core.events import AuditEvent, rfc3339
from ..core.session import HANDLE_LEN, Session
from ..store.base import AuditQuery, SessionStore

READ = (ev.EXPIRED, ev.REVOKED, ev.CREATED)
NO_APP = "(none)"
IDLE_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
"""Upper edges (seconds) of the idle-before-expiry histogram; one more bucket holds the rest."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """``[report]``: when a session's activity is too regular to be a person."""

    min_samples: int = 20
    max_gap_cv: float = 0.1
    min_hours: int = 20
    one_path_share: float = 0.95
    top: int = 10

    @classmethod
    def from_config(cls, report: Any) -> Thresholds:
        return cls(report.min_samples, report.max_gap_cv, report.min_hours, report.one_path_share, report.top)


def suspicion(activity: dict[str, Any] | None, t: Thresholds) -> list[str]:
    """Why this evidence looks automated (empty: it does not, or there is too little of it)."""
    if not activity or activity.get("samples", 0) < t.min_samples:
        return []
    why = []
    cv = activity.get("gap_cv")
    if cv is not None and cv <= t.max_gap_cv:
        why.append("regular")
    if len(activity.get("hours") or ()) >= t.min_hours:
        why.append("around_the_clock")
    if activity.get("top_path_share", 0.0) >= t.one_path_share:
        why.append("one_path")
    return why


async def from_store(store: SessionStore, since: float, until: float) -> list[AuditEvent]:
    return await store.search_audit(AuditQuery(events=READ, since=since, until=until))


def from_jsonl(path: Path, since: float, until: float, bad: list[int] | None = None) -> Iterator[AuditEvent]:
    """The events ``build`` reads, from a ``jsonl:`` sink file (others are skipped unparsed).

    A line that names one of them but is not a sound event (torn by a killed writer, edited, hostile)
    is skipped, and its number appended to ``bad``: the file is input, not trusted.
    """
    needles = tuple(f'"event":"{name}"' for name in READ)
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not any(n in line for n in needles):
                continue
            event = _parse(line)
            if event is None:
                if bad is not None:
                    bad.append(number)
                continue
            if event.event in READ and since <= event.ts < until:
                yield event


def _parse(line: str) -> AuditEvent | None:
    """One jsonl line as an event, or None: not JSON (NaN and overflowing numbers included), or unsound."""
    try:
        data = json.loads(line, parse_constant=_not_json, parse_float=_finite)
        if not isinstance(data, dict) or not isinstance(data.get("ts"), str):
            return None
        event = AuditEvent.from_dict(data)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None
    return event if sound(event) else None


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows")
    return value


_TEXT = ("user", "session", "app", "ip", "resource", "reason")
_NUMBERS = ("idle_s", "age_s", "samples", "gap_mean_s", "gap_cv", "top_path_share")  # where present; gap_cv may be null (too few gaps)


def sound(e: AuditEvent) -> bool:
    """Whether ``build`` can read this event: the types it relies on, finite numbers in the evidence."""
    if not isinstance(e.event, str) or not _number(e.ts):
        return False
    if not all(getattr(e, k) is None or isinstance(getattr(e, k), str) for k in _TEXT):
        return False
    a = e.activity
    if a is None:
        return True
    if not isinstance(a, dict) or not all(_number(a[k]) for k in _NUMBERS if k in a and (k, a[k]) != ("gap_cv", None)):
        return False
    hours, path = a.get("hours"), a.get("top_path")
    return (hours is None or isinstance(hours, list) and all(_number(h) for h in hours)) and (
        path is None or isinstance(path, str)
    )


def _number(v: Any) -> bool:
    try:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def build(
    events: Iterable[AuditEvent],
    live: Iterable[Session],
    t: Thresholds,
    *,
    since: float,
    until: float,
    source: str,
    started: float | None = None,
    skipped: int = 0,
) -> dict[str, Any]:
    """The report as one JSON-ready object (CONTRACT §5: ``automation_suspects``, expiries by reason and
    by app, the distribution of idle time before expiry; also by hour and day, revocations, top users).

    ``skipped``: events the source could not read; unsound events (see ``sound``) are skipped and
    counted here too, so the report never fails and its JSON holds no NaN."""
    started = time.perf_counter() if started is None else started
    signed_in_to: dict[str, str | None] = {}
    ends: list[AuditEvent] = []
    read = 0
    for e in events:
        if not sound(e):
            skipped += 1
            continue
        read += 1
        if e.event == ev.CREATED:
            if e.session:
                signed_in_to[e.session] = e.app
        else:
            ends.append(e)

    by_reason: Counter[str] = Counter()
    by_app: Counter[str] = Counter()
    by_hour = [0] * 24
    by_day: dict[str, Counter[str]] = defaultdict(Counter)
    revoked: Counter[str] = Counter()
    per_user: dict[str, Counter[str]] = defaultdict(Counter)
    idle_times: list[float] = []
    suspects: list[dict[str, Any]] = []
    for e in ends:
        reason = e.reason or "unknown"
        if e.event == ev.EXPIRED:
            by_reason[reason] += 1
            by_app[e.app or signed_in_to.get(e.session or "") or NO_APP] += 1
            when = datetime.fromtimestamp(e.ts, UTC)
            by_hour[when.hour] += 1
            by_day[when.date().isoformat()][reason] += 1
            per_user[e.user or "?"][reason] += 1
            if e.activity and "idle_s" in e.activity:
                idle_times.append(float(e.activity["idle_s"]))
        else:
            revoked[reason] += 1
        why = suspicion(e.activity, t)
        if why:
            suspects.append(_suspect(e.user, e.session, "expired" if e.event == ev.EXPIRED else "revoked",
                                     why, e.activity, ended_at=e.ts, end_reason=reason))
    now = until
    for s in live:
        if s.stats is None or s.stats.n < t.min_samples:
            continue
        activity = evidence(s.stats, created_at=s.created_at, last_active_at=s.last_active_at, now=now)
        why = suspicion(activity, t)
        if why:
            suspects.append(_suspect(s.user, s.key, "live", why, activity))
    suspects.sort(key=lambda x: (-len(x["reasons"]), x["evidence"].get("gap_cv") or 0.0, -x["evidence"]["samples"]))

    top = sorted(per_user.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[: t.top]
    return {
        "generated_at": rfc3339(time.time()),
        "source": source,
        "window": {"since": rfc3339(since), "until": rfc3339(until)},
        "events_read": read,
        "skipped": skipped,
        "expiries": {
            "total": sum(by_reason.values()),
            "by_reason": dict(sorted(by_reason.items())),
            "by_app": dict(sorted(by_app.items(), key=lambda kv: (-kv[1], kv[0]))),
            "by_hour": by_hour,
            "by_day": {day: dict(sorted(c.items())) for day, c in sorted(by_day.items())},
        },
        "revocations": {"total": sum(revoked.values()), "by_reason": dict(sorted(revoked.items()))},
        "idle_before_expiry": _distribution(idle_times),
        "top_users": [{"user": u, "expiries": sum(c.values()), **dict(sorted(c.items()))} for u, c in top],
        "automation_suspects": suspects,
        "thresholds": {
            "min_samples": t.min_samples, "max_gap_cv": t.max_gap_cv, "min_hours": t.min_hours,
            "one_path_share": t.one_path_share,
        },
        "took_s": round(time.perf_counter() - started, 3),
    }


def _suspect(user: str | None, session: str | None, state: str, why: list[str], activity: dict[str, Any],
             *, ended_at: float | None = None, end_reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "user": user,
        "session": session,
        "handle": (session or "")[:HANDLE_LEN],
        "state": state,
        "reasons": why,
        "evidence": activity,
    }
    if ended_at is not None:
        out["ended_at"] = rfc3339(ended_at)
        out["end_reason"] = end_reason
    return out


def _distribution(values: list[float]) -> dict[str, Any]:
    values.sort()
    counts = [0] * (len(IDLE_BUCKETS) + 1)
    for v in values:
        counts[bisect.bisect_left(IDLE_BUCKETS, v)] += 1
    buckets = [{"le_s": edge, "count": c} for edge, c in zip(IDLE_BUCKETS, counts)]
    buckets.append({"le_s": None, "count": counts[-1]})

    def pct(p: float) -> float | None:
        return None if not values else round(values[min(len(values) - 1, int(p * len(values)))], 3)

    return {
        "count": len(values),
        "p50_s": pct(0.5),
        "p90_s": pct(0.9),
        "p99_s": pct(0.99),
        "max_s": round(values[-1], 3) if values else None,
        "buckets": buckets,
    }


def summary(report: dict[str, Any]) -> str:
    """The human reading of a report (``lapse audit report`` without ``--json``); every string from the log
    goes through ``printable``."""
    p = printable
    x, idle = report["expiries"], report["idle_before_expiry"]
    lines = [f"audit report: {report['window']['since']} .. {report['window']['until']} ({p(report['source'])})",
             f"expiries: {x['total']}  " + "  ".join(f"{p(k)}={v}" for k, v in x["by_reason"].items())]
    if x["by_app"]:
        lines.append("by app:   " + "  ".join(f"{p(k)}={v}" for k, v in x["by_app"].items()))
    r = report["revocations"]
    lines.append(f"revocations: {r['total']}  " + "  ".join(f"{p(k)}={v}" for k, v in r["by_reason"].items()))
    if idle["count"]:
        lines.append(f"idle before expiry: p50 {_dur(idle['p50_s'])}  p90 {_dur(idle['p90_s'])}  "
                     f"p99 {_dur(idle['p99_s'])}  max {_dur(idle['max_s'])}")
    if report["top_users"]:
        lines.append("time out most: " + ", ".join(f"{p(u['user'])} ({u['expiries']})" for u in report["top_users"]))
    if report["skipped"]:
        lines.append(f"skipped: {report['skipped']} malformed event(s)")
    suspects = report["automation_suspects"]
    lines.append(f"automation suspects: {len(suspects)}")
    for s in suspects:
        e = s["evidence"]
        lines.append(
            f"  {p(s['user'])}  session={p(s['handle'])}  {s['state']}  {','.join(s['reasons'])}  "
            f"samples={e['samples']} gap_mean={_dur(e.get('gap_mean_s'))} cv={e.get('gap_cv')} "
            f"hours={len(e.get('hours') or ())} path={p(e.get('top_path'))} share>={e.get('top_path_share')}"
        )
    return "\n".join(lines)


def printable(value: Any) -> str:
    """``value`` as text for one line of a terminal: backslashes and non-printable characters (controls,
    bidi and other format characters, line separators) escaped, so a field cannot forge another line or
    send ANSI escapes."""
    return "".join(c if c.isprintable() and c != "\\" else _escaped(c) for c in str(value))


def _escaped(c: str) -> str:
    n = ord(c)
    if c == "\\":
        return "\\\\"
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


__all__ = ["Thresholds", "build", "from_jsonl", "from_store", "printable", "sound", "summary", "suspicion"]
