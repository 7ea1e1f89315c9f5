"""Activity statistics (issue 8): folded into the write ``decide()`` already makes, never anywhere else."""

from __future__ import annotations

import random
import statistics

from lapse.core import events as ev
from lapse.core.activity import Activity, evidence, observe, pack, unpack
from lapse.core.decide import revoke, sweep

from .test_decide import T0, ask, start


def feed(gaps: list[float], path: str = "/api/ping", t: float = T0) -> Activity:
    stats = None
    for gap in gaps:
        t += gap
        stats = observe(stats, gap, t, path)
    assert stats is not None
    return stats


def test_running_statistics_match_the_textbook():
    rng = random.Random(8)
    gaps = [rng.expovariate(1 / 90) + 1 for _ in range(500)]
    s = feed(gaps)
    assert s.n == 500
    assert abs(s.mean - statistics.fmean(gaps)) / statistics.fmean(gaps) < 1e-4
    assert abs(s.cv - statistics.stdev(gaps) / statistics.fmean(gaps)) < 1e-3
    assert s.cv > 0.5  # a person: bursty
    assert feed([60.0 + rng.uniform(-0.2, 0.2) for _ in range(100)]).cv < 0.01  # a script on a timer


def test_hours_and_majority_path():
    s = feed([3600.0] * 30)  # one request an hour for 30 hours: every hour of the day
    assert s.hours_active == 24
    mixed = None
    for i in range(100):
        mixed = observe(mixed, 10.0, T0 + 10 * i, "/ping" if i % 10 else f"/page/{i}")
    assert mixed.path == "/ping" and 0.8 <= mixed.path_share <= 0.9  # a lower bound of the true 0.9
    assert observe(None, 1.0, T0, "/" + "x" * 200).path == "/" + "x" * 63


def test_pack_round_trips_exactly():
    s = feed([59.7, 60.1, 60.4], path="/api/é")
    assert unpack(pack(s)) == s
    assert pack(None) is None and unpack(None) is None
    assert len(pack(s)) == 28 + len("/api/é".encode())


def test_decide_folds_statistics_into_active_writes_only():
    s = start()
    d = ask(s, "billing.test", "/a", t=T0 + 30)
    assert d.changed and d.session.stats.n == 1 and d.session.stats.mean == 30.0 and d.session.stats.path == "/a"
    passive = ask(d.session, "billing.test", "/a", t=T0 + 60, passive=True)
    assert passive.session.stats == d.session.stats  # passive requests are served, never counted
    again = ask(d.session, "billing.test", "/a", t=T0 + 30.5)  # within the coalescing bound: no write, no sample
    assert not again.changed and again.session.stats.n == 1


def test_end_events_carry_the_evidence():
    s = start()
    for i in range(1, 4):
        s = ask(s, "billing.test", "/ping", t=T0 + 60 * i).session
    [event] = revoke(s, "admin", T0 + 200).events
    assert event.event == ev.REVOKED
    a = event.to_dict()["activity"]
    assert a["samples"] == 3 and a["gap_mean_s"] == 60.0 and a["gap_cv"] == 0.0 and a["top_path"] == "/ping"
    assert a["idle_s"] == 20.0 and a["age_s"] == 200.0
    expired = sweep(s, 900.0, 43200.0, T0 + 180 + 900).events[0]
    assert expired.event == ev.EXPIRED and expired.activity["idle_s"] == 900.0
    assert ev.AuditEvent.from_dict(expired.to_dict()).activity == expired.activity
    fresh = evidence(None, created_at=T0, last_active_at=T0, now=T0 + 5)
    assert fresh == {"idle_s": 5.0, "age_s": 5.0, "samples": 0}
