"""A store outage is one clear log line (issue 5: "one clear log line"), not one per refused request:
the first refusal, and the first of another cause, at once; then at most one summing line every
``EVERY`` seconds; a pause starts a new outage that reports what the previous one left unsaid."""

from __future__ import annotations

import logging

from lapse.outage import EVERY, OutageLog

REFUSED, WRONGPASS = OSError("connection refused"), OSError("WRONGPASS invalid password")


def _outage(now: list[float]) -> OutageLog:
    return OutageLog(logging.getLogger("lapse.test"), "store unavailable", lambda: now[0])


def test_one_line_per_window_with_the_count_of_the_rest(caplog):
    now = [100.0]
    outage = _outage(now)
    with caplog.at_level(logging.ERROR, logger="lapse.test"):
        for _ in range(1000):
            outage.refused(REFUSED)
            now[0] += 0.001  # 1,000 refusals in one second
        assert [r.getMessage() for r in caplog.records] == ["store unavailable: connection refused"]
        now[0] += EVERY - 1
        outage.refused(REFUSED)
        assert caplog.records[-1].getMessage() == (
            "store unavailable: connection refused (999 more refused since the last line)")
        assert len(caplog.records) == 2


def test_another_cause_is_said_at_once_and_only_once(caplog):
    now = [0.0]
    outage = _outage(now)
    with caplog.at_level(logging.ERROR, logger="lapse.test"):
        for i in range(100):  # flapping between two causes within one window
            outage.refused(REFUSED if i % 2 else WRONGPASS)
            now[0] += 0.01
    assert [r.getMessage() for r in caplog.records] == [
        "store unavailable: WRONGPASS invalid password", "store unavailable: connection refused"]


def test_a_pause_starts_a_new_outage_that_says_what_the_last_one_left(caplog):
    now = [0.0]
    outage = _outage(now)
    with caplog.at_level(logging.ERROR, logger="lapse.test"):
        for _ in range(5):
            outage.refused(REFUSED)
        now[0] += 3600  # the store answered for an hour
        outage.refused(WRONGPASS)
    assert [r.getMessage() for r in caplog.records] == [
        "store unavailable: connection refused",
        "store unavailable: WRONGPASS invalid password (4 more refused in the previous outage)"]
