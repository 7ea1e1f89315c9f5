"""Decision metrics counted in plain Python expose exactly what prometheus_client's own labelled
Counter and Histogram would for the same observations (names, labels, buckets, count, sum)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from lapse.web.metrics import BUCKETS, Metrics

observations = st.lists(
    st.tuples(st.booleans(), st.sampled_from([None, "idle", "absolute", "unknown", "missing"]),
              st.one_of(st.sampled_from(BUCKETS), st.floats(min_value=0, max_value=3, allow_nan=False))),
    max_size=40,
)


def samples(text: str, prefix: str) -> dict[str, float]:
    """Exposition lines of one family (no _created samples: those are not part of the contract)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix) and "_created" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@settings(max_examples=100)
@given(observations)
def test_the_same_exposition_as_prometheus_client(seen):
    ours = Metrics()
    registry = CollectorRegistry()
    counter = Counter("lapse_decisions", "x", ["verdict", "reason"], registry=registry)
    histogram = Histogram("lapse_decision_seconds", "x", buckets=BUCKETS, registry=registry)
    for allowed, reason, seconds in seen:
        ours.decided(allowed, reason, seconds)
        counter.labels("allow" if allowed else "deny", reason or "").inc()
        histogram.observe(seconds)
    mine, theirs = generate_latest(ours.registry).decode(), generate_latest(registry).decode()
    for family in ("lapse_decisions_total", "lapse_decision_seconds_bucket", "lapse_decision_seconds_count"):
        assert samples(mine, family) == samples(theirs, family)
    total = samples(mine, "lapse_decision_seconds_sum")["lapse_decision_seconds_sum"]
    assert math.isclose(total, samples(theirs, "lapse_decision_seconds_sum")["lapse_decision_seconds_sum"],
                        abs_tol=1e-9)
