"""A store outage is one clear log line (issue 5: "one clear log line"), not one per refused request:
the first refusal at once, then at most one summing line every ``EVERY`` seconds."""

from __future__ import annotations

import logging

from lapse.outage import EVERY, OutageLog


def test_one_line_per_outage_window_with_the_count_of_the_rest(caplog):
    now = [100.0]
    outage = OutageLog(logging.getLogger("lapse.test"), "store unavailable, failing closed", lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="lapse.test"):
        for _ in range(1000):
            outage.refused(OSError("connection refused"))
            now[0] += 0.001  # 1,000 refusals in one second
        assert [r.getMessage() for r in caplog.records] == ["store unavailable, failing closed: connection refused"]
        now[0] += EVERY
        outage.refused(OSError("connection refused"))
        assert caplog.records[-1].getMessage() == (
            "store unavailable, failing closed: connection refused (999 more refused since the last line)")
        assert len(caplog.records) == 2
