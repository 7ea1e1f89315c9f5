"""``lapse audit report`` over a large audit log (issue 8): does 1M events take seconds?

Builds an audit log of N events (default 1,000,000) with a realistic mix, in a
SQLite store (through ``append_audit``, in batches) and the same events in a
jsonl file, then times the report exactly as ``lapse audit report`` builds it:
the store path (``search_audit`` filtered in SQL, then ``build``) and the
jsonl path (``from_jsonl``, then ``build``), each run 3 times (median), and
the PNG. Loading is not timed.

    python bench/report.py              # 1M events
    python bench/report.py --events 100000

The mix, per session: session.created, ~5 session.denied / session.warning /
auth.login events, and one session.expired or session.revoked carrying the
activity evidence; 1 in 50 sessions is a script (regular gaps, one path).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from machine import machine  # noqa: E402

from lapse.audit import report as rep  # noqa: E402
from lapse.audit.sinks import to_line  # noqa: E402
from lapse.core import events as ev  # noqa: E402
from lapse.core.activity import evidence, observe  # noqa: E402
from lapse.core.events import AuditEvent  # noqa: E402
from lapse.store.sqlite import SqliteStore  # noqa: E402

T0 = 1_800_000_000.0
APPS = ["billing", "wiki", "admin", None]


def make_events(n: int, rng: random.Random) -> list[AuditEvent]:
    out: list[AuditEvent] = []
    i = 0
    span = 30 * 86400.0
    while len(out) < n:
        i += 1
        key = f"{rng.getrandbits(128):032x}"
        user = f"user{rng.randrange(5000)}"
        app = rng.choice(APPS)
        start = T0 + rng.random() * span
        bot = i % 50 == 0
        stats, t = None, start
        for _ in range(rng.randrange(25, 60) if bot else rng.randrange(0, 40)):
            gap = 60.0 + rng.uniform(-0.3, 0.3) if bot else rng.expovariate(1 / 120) + 1
            t += gap
            stats = observe(stats, gap, t, "/api/keepalive" if bot else rng.choice(["/", "/a", "/b", "/c/d"]))
        out.append(AuditEvent(start, ev.LOGIN, ev.SUCCESS, user, key, app, "192.0.2.1", "POST /_lapse/login"))
        out.append(AuditEvent(start, ev.CREATED, ev.SUCCESS, user, key, app, "192.0.2.1"))
        for _ in range(rng.randrange(0, 7)):
            out.append(AuditEvent(t + rng.random() * 600, ev.DENIED, ev.FAILURE, user, key, app, "192.0.2.1",
                                  "GET /x", "idle"))
        idle = rng.expovariate(1 / 1800) + 60
        end = t + idle
        reason = rng.choice(["idle", "idle", "idle", "absolute", "logout"])
        name = ev.REVOKED if reason == "logout" else ev.EXPIRED
        act = evidence(stats, created_at=start, last_active_at=t, now=end)
        out.append(AuditEvent(end, name, ev.SUCCESS, user, key, None, None, None, reason, act))
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = random.Random(8)
    print(machine())
    t = time.perf_counter()
    events = make_events(args.events, rng)
    print(f"built {len(events):,} events in {time.perf_counter() - t:.1f} s (not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "lapse.db")
        jsonl = Path(tmp) / "audit.jsonl"
        t = time.perf_counter()

        async def load() -> None:
            for i in range(0, len(events), 10_000):
                await store.append_audit(events[i : i + 10_000])

        asyncio.run(load())
        jsonl.write_text("".join(to_line(e) + "\n" for e in events))
        size = (Path(tmp) / "lapse.db").stat().st_size + (Path(tmp) / "lapse.db-wal").stat().st_size
        print(f"loaded into SQLite ({size / 1e6:.0f} MB) and jsonl ({jsonl.stat().st_size / 1e6:.0f} MB) "
              f"in {time.perf_counter() - t:.1f} s (not timed)")
        th = rep.Thresholds()
        since, until = T0 - 1, T0 + 40 * 86400

        def timed(label: str, fn) -> dict:
            runs, out = [], None
            for _ in range(3):
                t0 = time.perf_counter()
                out = fn()
                runs.append(time.perf_counter() - t0)
            print(f"{label:<32} median {statistics.median(runs):6.2f} s   (runs: "
                  + ", ".join(f"{r:.2f}" for r in runs) + ")")
            return out

        def via_store() -> dict:
            return rep.build(asyncio.run(rep.from_store(store, since, until)), [], th, since=since, until=until,
                             source="store")

        def via_jsonl() -> dict:
            return rep.build(rep.from_jsonl(jsonl, since, until), [], th, since=since, until=until,
                             source="jsonl")

        report = timed("report from the store (SQLite)", via_store)
        timed("report from a jsonl file", via_jsonl)
        try:
            from lapse.audit.plots import render_png

            timed("PNG (4 panels)", lambda: render_png(report))
        except Exception as exc:  # noqa: BLE001
            print(f"PNG skipped: {exc}")
        print(f"expiries {report['expiries']['total']:,}, revocations {report['revocations']['total']:,}, "
              f"suspects {len(report['automation_suspects']):,} (scripts planted: 1 in 50 sessions)")
        asyncio.run(store.close())


if __name__ == "__main__":
    main()
