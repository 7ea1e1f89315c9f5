"""The policy model: presets against their sources, resolution order, the matcher."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse.core.policy import AppSpec, Layer, NetworkSpec, PolicySpec, PrivilegedSpec, compile_policy, glob_regex
from lapse.core.presets import PRESETS

M, H, D = 60.0, 3600.0, 86400.0

# (idle, absolute) as shared/research/standards-checklist.md §O gives them, with the clause.
SOURCES = {
    "pci-dss-4": (15 * M, 12 * H),  # PCI DSS v4.0.1 Req. 8.2.8; absolute from NIST rev 3 (PCI sets none)
    "nist-63b4-aal1": (None, 30 * D),  # NIST SP 800-63B-4 §2.1.3
    "nist-63b4-aal2": (1 * H, 24 * H),  # NIST SP 800-63B-4 §2.2.3
    "nist-63b4-aal3": (15 * M, 12 * H),  # NIST SP 800-63B-4 §2.3.3
    "nist-63b3-aal2": (30 * M, 12 * H),  # NIST SP 800-63B rev 3 §4.2.3
    "nist-63b3-aal3": (15 * M, 12 * H),  # NIST SP 800-63B rev 3 §4.3.3
    "hipaa": (15 * M, 12 * H),  # 45 CFR §164.312(a)(2)(iii): no number; common practice
    "disa-stig-user": (15 * M, 12 * H),  # DISA ASD STIG APSC-DV-000070 (V-222389)
    "disa-stig-admin": (10 * M, 12 * H),  # DISA ASD STIG APSC-DV-000080 (V-222390)
    "owasp-high-value": (5 * M, 4 * H),  # OWASP Session Management Cheat Sheet, Session Expiration
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_preset_matches_its_source(name):
    preset = PRESETS[name]
    assert (preset.idle, preset.absolute) == SOURCES[name]
    assert preset.idle_source and preset.absolute_source
    effective = compile_policy(PolicySpec(defaults=Layer(preset=name))).resolve("any.test", "/")
    assert (effective.limits.idle, effective.limits.absolute) == SOURCES[name]
    assert f"preset:{name}" in effective.rules


def test_every_contract_preset_exists():
    assert set(SOURCES) <= set(PRESETS)


SPEC = PolicySpec(
    defaults=Layer({"idle": 20 * M, "warn_before": 90.0}, preset="nist-63b4-aal2", passive_paths=("/healthz",)),
    apps=(
        AppSpec("billing", ("Billing.Example.TEST",), Layer({"idle": 10 * M}, preset="pci-dss-4",
                passive_paths=("/api/notifications*",)), paths=("/billing/*",),
                privileged=(PrivilegedSpec(("/billing/admin/*",), 5 * M, True, frozenset({"POST", "DELETE"})),)),
        AppSpec("portal", ("*.example.test",), Layer({"absolute": 8 * H})),
        AppSpec("billing-other", ("billing.example.test",), Layer({"idle": 2 * M})),
    ),
    networks=(
        NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")), 2.0),
        NetworkSpec("elsewhere", (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")), 0.5, 0.5),
    ),
    max_idle=1 * H,
    max_absolute=24 * H,
)
POLICY = compile_policy(SPEC)


def test_resolution_order_app_key_app_preset_defaults_builtin():
    e = POLICY.resolve("billing.example.test", "/billing/x")
    assert e.limits.app == "billing" and e.limits.network is None
    assert (e.limits.idle, e.limits.absolute, e.limits.warn_before) == (10 * M, 12 * H, 90.0)
    assert dict(e.limits.sources) == {"idle": "app:billing", "absolute": "preset:pci-dss-4", "warn_before": "defaults"}
    assert e.rules == ("app:billing", "preset:pci-dss-4", "defaults")
    d = POLICY.resolve("nowhere.test", "/")
    assert d.limits.app is None
    assert (d.limits.idle, d.limits.absolute) == (20 * M, 24 * H)
    assert d.rules == ("defaults", "preset:nist-63b4-aal2")


def test_network_factor_then_org_ceiling_last():
    office = POLICY.resolve("billing.example.test", "/billing/x", ip="10.9.8.7")
    assert office.limits.idle == 20 * M and "network:office x2" in office.rules
    portal = POLICY.resolve("www.example.test", "/", ip="10.0.0.1")
    assert (portal.limits.idle, portal.limits.absolute) == (40 * M, 8 * H)  # defaults' 20m, x2
    assert portal.rules == ("app:portal", "defaults", "network:office x2")
    away = POLICY.resolve("www.example.test", "/", ip="192.0.2.1")
    assert (away.limits.idle, away.limits.absolute) == (10 * M, 4 * H)
    assert away.rules[-1] == "network:elsewhere x0.5, absolute x0.5"


def test_org_ceiling_caps_after_the_factor():
    spec = PolicySpec(defaults=Layer({"idle": 45 * M, "absolute": 20 * H}),
                      networks=(NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"),), 2.0, 2.0),),
                      max_idle=1 * H, max_absolute=24 * H)
    e = compile_policy(spec).resolve("x", "/", ip="10.0.0.1")
    assert (e.limits.idle, e.limits.absolute) == (1 * H, 24 * H)
    assert e.rules[-3:] == ("network:office x2, absolute x2", "org.max_idle", "org.max_absolute")


def test_first_network_wins_ipv4_ipv6_and_mapped():
    assert POLICY.resolve("x", "/", ip="10.1.1.1").limits.network == "office"
    assert POLICY.resolve("x", "/", ip="fd12::1").limits.network == "office"
    assert POLICY.resolve("x", "/", ip="::ffff:10.1.1.1").limits.network == "office"
    assert POLICY.resolve("x", "/", ip="203.0.113.5").limits.network == "elsewhere"
    assert POLICY.resolve("x", "/", ip="not-an-ip").limits.network is None


def test_hosts_case_port_wildcard_and_file_order():
    assert POLICY.resolve("BILLING.example.test:8443", "/billing/a").limits.app == "billing"
    # billing only claims /billing/*: the next app in file order matching the host takes the rest.
    assert POLICY.resolve("billing.example.test", "/other").limits.app == "portal"
    assert POLICY.resolve("deep.sub.example.test", "/").limits.app == "portal"
    assert POLICY.resolve("example.test", "/").limits.app is None
    assert POLICY.resolve("[::1]:8080", "/").limits.app is None


def test_activity_classification():
    """standards-checklist E.41-45: header, passive_paths and lapse's own status endpoints."""
    r = POLICY.resolve
    assert r("billing.example.test", "/billing/x").active
    assert r("billing.example.test", "/billing/x", passive_header=True).activity_rule == "passive:header"
    assert r("billing.example.test", "/api/notifications/7").active  # outside billing's paths: portal's rules
    assert r("billing.example.test", "/billing/api/notifications").active  # globs anchor at the start
    billing_passive = PolicySpec(apps=(AppSpec("b", ("b.test",), Layer(passive_paths=("/billing/poll*",))),))
    assert compile_policy(billing_passive).resolve("b.test", "/billing/poll?x").activity_rule == "passive:/billing/poll*"
    assert r("nowhere", "/healthz").activity_rule == "passive:/healthz"
    assert r("nowhere", "/_lapse/session").activity_rule == "passive:lapse-status"
    assert r("nowhere", "/_lapse/session/activity", "POST").active


def test_privileged_routes_by_method():
    e = POLICY.resolve("billing.example.test", "/billing/admin/users", "DELETE")
    assert e.step_up is not None and (e.step_up.max_auth_age, e.step_up.mfa) == (5 * M, True)
    assert e.rules[-1].startswith("step-up:/billing/admin/*")
    assert POLICY.resolve("billing.example.test", "/billing/admin/users", "GET").step_up is None


def test_glob_star_crosses_slashes_and_nothing_else_is_special():
    rx = glob_regex(["/a/*/c", "/x?[y]"])
    assert rx.match("/a/b/b/c") and rx.match("/a//c")
    assert rx.match("/x?[y]") and not rx.match("/xa")
    assert not rx.match("/a/b/c/d")


durations = st.one_of(st.none(), st.sampled_from([60.0, 600.0, 3600.0, 7200.0, 86400.0]))


@given(
    app_idle=durations, app_abs=st.sampled_from([600.0, 3600.0, 90000.0]), factor=st.sampled_from([0.5, 1.0, 3.0]),
    max_idle=durations, max_abs=st.one_of(st.none(), st.sampled_from([3600.0, 86400.0])),
    ip=st.sampled_from(["10.0.0.1", "192.0.2.1", None]), host=st.sampled_from(["a.test", "b.test"]),
)
def test_nothing_exceeds_the_org_ceiling(app_idle, app_abs, factor, max_idle, max_abs, ip, host):
    spec = PolicySpec(
        apps=(AppSpec("a", ("a.test",), Layer({"idle": app_idle, "absolute": app_abs})),),
        networks=(NetworkSpec("n", (ipaddress.ip_network("10.0.0.0/8"),), factor, factor),),
        max_idle=max_idle, max_absolute=max_abs,
    )
    policy = compile_policy(spec)
    lim = policy.resolve(host, "/", ip=ip).limits
    if max_idle is not None:
        assert lim.idle is not None and lim.idle <= max_idle
        assert policy.generous_idle <= max_idle
    if max_abs is not None:
        assert lim.absolute <= max_abs and policy.generous_absolute <= max_abs
    assert lim.idle is None or lim.idle <= policy.generous_idle
    assert lim.absolute <= policy.generous_absolute
