"""``decide()`` case by case: the edges the random histories only find by luck."""

from __future__ import annotations

import ipaddress
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse.core.decide import Reason, Request, coalesce_bound, decide, revoke, sign_in, sweep
from lapse.core.policy import AppSpec, Layer, NetworkSpec, PolicySpec, PrivilegedSpec, compile_policy
from lapse.core.session import merge_activity, record_activity, vouched

T0 = 1_800_000_000.0
KEY = "ab" * 16

POLICY = compile_policy(
    PolicySpec(
        defaults=Layer({"idle": 1800.0, "absolute": 43200.0}),
        apps=(
            AppSpec("billing", ("billing.test",), Layer({"idle": 900.0, "absolute": 3600.0}),
                    privileged=(PrivilegedSpec(("/admin/*",), 300.0, True, frozenset({"POST"})),),
                    allow=("group:finance", "user:carol")),
            AppSpec("wiki", ("wiki.test",), Layer({"idle": 3600.0, "absolute": 7200.0}, on_ip_change="revoke")),
            AppSpec("ops", ("ops.test",), Layer({"idle": 3600.0}, on_ip_change="step_up")),
        ),
        networks=(NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"),), 2.0),),
    )
)


def start(groups=("finance",), mfa=True, ip="192.0.2.1", user="alice"):
    return sign_in(KEY, user, T0, POLICY.resolve("billing.test", "/").limits, ip=ip, mfa=mfa, groups=groups).session


def ask(session, host, path="/", t=T0, method="GET", ip="192.0.2.1", passive=False):
    eff = POLICY.resolve(host, path, method, ip, passive)
    return decide(session, Request(method, path, ip, KEY), eff, t)


def test_no_cookie_is_missing_and_silent():
    eff = POLICY.resolve("billing.test", "/")
    d = decide(None, Request("GET", "/", None, None), eff, T0)
    assert (d.allowed, d.reason, d.status, d.events) == (False, Reason.MISSING, 401, ())


def test_unknown_cookie_is_denied_and_audited():
    """standards-checklist A.4: a session ID never issued is refused and recorded."""
    d = decide(None, Request("GET", "/", "192.0.2.1", KEY), POLICY.resolve("wiki.test", "/"), T0)
    assert d.reason is Reason.UNKNOWN
    assert [(e.event, e.reason, e.session) for e in d.events] == [("session.denied", "unknown", KEY)]


@pytest.mark.parametrize("host,idle", [("billing.test", 900.0), ("wiki.test", 3600.0)])
def test_idle_deadline_is_exact(host, idle):
    """Invariant 1 / standards-checklist C.25: at T-ε allowed, at T refused."""
    s = start()
    assert ask(s, host, t=T0 + idle - 0.001).allowed
    d = ask(s, host, t=T0 + idle)
    assert d.reason is Reason.IDLE and [e.event for e in d.events] == ["session.denied"]


def test_absolute_deadline_ignores_activity():
    """standards-checklist D.35: re-authentication at least every absolute period, whatever the activity."""
    s = start()
    t = T0
    while t + 800 < T0 + 3600:
        t += 800
        d = ask(s, "billing.test", t=t)
        assert d.allowed
        s = d.session
    assert ask(s, "billing.test", t=T0 + 3599.9).allowed
    assert ask(s, "billing.test", t=T0 + 3600).reason is Reason.ABSOLUTE


def test_lax_app_cannot_revive_strict_app():
    """CONTRACT §3: activity in a 60-minute wiki never keeps a 15-minute billing app alive."""
    s = start()
    for t in (T0 + 600, T0 + 1200):
        d = ask(s, "wiki.test", t=t)
        assert d.allowed
        s = d.session
    assert ask(s, "wiki.test", t=T0 + 1300).allowed
    d = ask(s, "billing.test", t=T0 + 900)
    assert d.reason is Reason.IDLE
    # ...while strict activity vouches for the lax app.
    s2 = ask(start(), "billing.test", t=T0 + 800).session
    assert ask(s2, "wiki.test", t=T0 + 800 + 3599).allowed


def test_passive_requests_never_extend():
    """Invariant 2 / standards-checklist E.45: status polls are served, never extend."""
    s = start()
    d = ask(s, "billing.test", t=T0 + 500, passive=True)
    assert d.allowed and d.session.activity == s.activity
    assert ask(d.session, "billing.test", t=T0 + 900).reason is Reason.IDLE
    status = decide(s, Request("GET", "/_lapse/session", None, KEY), POLICY.resolve("x", "/_lapse/session"), T0 + 5)
    assert status.session.activity == s.activity


def test_coalesced_writes_judge_early_never_late():
    """Invariant 8: a skipped write costs at most min(1 s, 1% of the limit)."""
    s = start()
    first = ask(s, "billing.test", t=T0 + 100)
    assert first.changed
    s = first.session
    skipped = ask(s, "billing.test", t=T0 + 100.5)
    assert skipped.allowed and not skipped.changed  # 0.5 s < min(1 s, 9 s)
    assert ask(s, "billing.test", t=T0 + 1000).reason is Reason.IDLE  # early by 0.5 s
    later = ask(s, "billing.test", t=T0 + 101)
    assert later.changed and vouched(later.session.activity, 900.0) == T0 + 101
    assert coalesce_bound(10.0) == pytest.approx(0.1) and coalesce_bound(None) == 1.0


def test_no_idle_limit_app_still_has_absolute():
    kiosk = compile_policy(PolicySpec(apps=(AppSpec("kiosk", ("k.test",), Layer({"idle": None, "absolute": 600.0})),)))
    assert kiosk.generous_idle == math.inf
    eff = kiosk.resolve("k.test", "/")
    s = sign_in(KEY, "alice", T0, eff.limits).session
    assert decide(s, Request("GET", "/", None, KEY), eff, T0 + 599).allowed
    assert decide(s, Request("GET", "/", None, KEY), eff, T0 + 600).reason is Reason.ABSOLUTE


def test_session_ends_once_past_the_most_generous_limits():
    """Invariant 6: the discovering request ends it with one session.expired."""
    s = start()
    d = ask(s, "wiki.test", t=T0 + POLICY.generous_idle)
    assert d.reason is Reason.IDLE and d.changed and d.session.ended
    assert [e.event for e in d.events] == ["session.expired", "session.denied"]
    again = ask(d.session, "wiki.test", t=T0 + POLICY.generous_idle + 1)
    assert again.reason is Reason.IDLE and not again.changed
    assert [e.event for e in again.events] == ["session.denied"]


def test_revoked_session_stays_revoked():
    """Invariant 5: an ended session never comes back."""
    s = start()
    r = revoke(s, "logout", T0 + 1)
    assert [e.event for e in r.events] == ["session.revoked"] and r.events[0].reason == "logout"
    assert ask(r.session, "billing.test", t=T0 + 2).reason is Reason.REVOKED
    assert not revoke(r.session, "admin", T0 + 3).changed
    assert sweep(r.session, POLICY.generous_idle, POLICY.generous_absolute, T0 + 1e6).changed is False


def test_sweep_ends_unattended_sessions_and_follows_policy_changes():
    s = start()
    assert not sweep(s, POLICY.generous_idle, POLICY.generous_absolute, T0 + 10).changed
    grown = sweep(s, POLICY.generous_idle * 2, POLICY.generous_absolute, T0 + 10)
    assert grown.changed and grown.session.expires_at > s.expires_at and not grown.events
    over = sweep(s, POLICY.generous_idle, POLICY.generous_absolute, s.expires_at)
    assert over.session.end_reason == "idle" and [e.event for e in over.events] == ["session.expired"]


def test_allow_rules_forbid_others():
    assert ask(start(groups=("finance",)), "billing.test").allowed
    assert ask(start(groups=(), user="carol"), "billing.test").allowed
    d = ask(start(groups=("sales",), user="dave"), "billing.test")
    assert (d.reason, d.status) == (Reason.FORBIDDEN, 403)


def test_step_up_for_privileged_routes():
    """standards-checklist I.64: stale authentication or missing MFA on a privileged route → step-up."""
    s = start()
    assert ask(s, "billing.test", "/admin/x", t=T0 + 299, method="POST").allowed
    assert ask(s, "billing.test", "/admin/x", t=T0 + 300, method="GET").allowed  # POST only
    d = ask(s, "billing.test", "/admin/x", t=T0 + 300, method="POST")
    assert d.reason is Reason.STEP_UP
    assert [e.event for e in d.events] == ["session.step_up_required", "session.denied"]
    no_mfa = ask(start(mfa=False), "billing.test", "/admin/x", method="POST")
    assert no_mfa.reason is Reason.STEP_UP and no_mfa.events[0].reason == "mfa"


def test_ip_change_policies():
    s = start(ip="192.0.2.1")
    moved = ask(s, "billing.test", ip="198.51.100.7", t=T0 + 1)
    assert moved.allowed and moved.session.ip == "198.51.100.7"  # default: allow
    assert ask(s, "ops.test", ip="198.51.100.7", t=T0 + 1).reason is Reason.STEP_UP
    d = ask(s, "wiki.test", ip="198.51.100.7", t=T0 + 1)
    assert d.reason is Reason.NETWORK and d.session.end_reason == "network"
    assert [e.event for e in d.events] == ["session.revoked", "session.denied"]
    assert ask(d.session, "billing.test", t=T0 + 2).reason is Reason.NETWORK


staircases = st.lists(
    st.tuples(st.sampled_from([0.0, 10.0, 60.0, 900.0, math.inf]), st.floats(0, 1000)), max_size=6
).map(lambda steps: merge_activity((), tuple(steps)))


@given(staircases, staircases, st.sampled_from([0.0, 5.0, 10.0, 60.0, 900.0, 1e9, math.inf]))
def test_merge_is_forward_only_and_order_free(a, b, limit):
    """Invariant 4 at the data level: merging never loses the newer clock, in any order."""
    if not a or not b:
        return
    m = merge_activity(a, b)
    assert m == merge_activity(b, a)
    assert vouched(m, limit) == max(vouched(a, limit), vouched(b, limit))
    assert list(m) == sorted(m) and all(x[1] < y[1] for x, y in zip(m, m[1:]))


@given(staircases, st.sampled_from([0.0, 10.0, 60.0, 900.0, math.inf]), st.floats(0, 2000))
def test_recording_activity_vouches_at_its_limit_and_above_only(a, limit, now):
    if not a:
        return
    r = record_activity(a, limit, now)
    for probe in (0.0, 5.0, 10.0, 60.0, 900.0, math.inf):
        if probe >= limit:
            assert vouched(r, probe) == max(now, vouched(a, probe))
        else:
            assert vouched(r, probe) == vouched(a, probe)


HOSTS = ["billing.test", "wiki.test", "ops.test", "other.test"]
PATHS = ["/", "/admin/x", "/_lapse/session"]


@given(
    st.data(),
    st.lists(st.tuples(st.sampled_from(HOSTS), st.sampled_from(PATHS), st.floats(0, 4000), st.booleans()),
             max_size=8),
)
def test_an_answer_that_writes_nothing_holds_until_it_says(data, history):
    """``holds_until`` is exact: before it, the same record, policy and IP get the very same answer
    (what lets Gate reuse it); at it, something may change. Random histories over every app."""
    s = start()
    t = T0
    for host, path, gap, passive in history:  # a random, plausible record: activity on several apps
        t += gap
        d = ask(s, host, path, t=t, passive=passive)
        s = d.session if d.session is not None else s
    host, path = data.draw(st.sampled_from(HOSTS)), data.draw(st.sampled_from(PATHS))
    method, passive = data.draw(st.sampled_from(["GET", "POST"])), data.draw(st.booleans())
    now = t + data.draw(st.floats(0, 5000))
    first = ask(s, host, path, t=now, method=method, passive=passive)
    if not first.allowed or first.changed:
        assert first.holds_until == -math.inf  # nothing to reuse
        return
    assert first.holds_until > now
    later = data.draw(st.floats(now, first.holds_until, exclude_max=True))
    again = ask(s, host, path, t=later, method=method, passive=passive)
    assert again == first
    if math.isfinite(first.holds_until):
        at = ask(s, host, path, t=first.holds_until, method=method, passive=passive)
        assert at != first  # the instant it names is one where the answer moves


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans())
def test_an_ipv6_address_that_rotates_within_its_64_is_the_same_network(prefix, host_a, host_b, move_prefix):
    """[checklist 104] on_ip_change judges a change of network: privacy extensions (RFC 8981) rotate the low
    64 bits of a device's IPv6 address, which must not end a session under ``revoke``; another /64 does."""
    net = (0x2001_0db8 << 96) | (prefix << 64)
    other = net ^ (1 << 64) if move_prefix else net
    before, after = str(ipaddress.IPv6Address(net | host_a)), str(ipaddress.IPv6Address(other | host_b))
    s = start(ip=before)
    d = ask(s, "wiki.test", t=T0 + 1, ip=after)
    if move_prefix:
        assert (d.allowed, d.reason) == (False, Reason.NETWORK)
    else:
        assert d.allowed and d.session.ip == after


def test_any_other_ipv4_address_is_another_network():
    """IPv4 addresses compare exactly: one address over, the session under ``revoke`` ends."""
    s = start(ip="198.51.100.20")
    assert ask(s, "wiki.test", t=T0 + 1, ip="198.51.100.20").allowed
    d = ask(s, "wiki.test", t=T0 + 1, ip="198.51.100.21")
    assert (d.allowed, d.reason, [e.reason for e in d.events]) == (False, Reason.NETWORK, ["network", "network"])
