"""Where lapse falls short of checklist items 86-112: each test here FAILS today, on purpose.

pytest does not collect this file (its name does not start with ``test_``); run it by hand:

    /work/main/.venv/bin/python -m pytest tests/standards/gaps_k_to_o.py -q -p no:cacheprovider

Each docstring says what the standard asks, what lapse does instead (observed), and a proposed fix.
When a fix lands, move its test into test_k_to_o*.py and update docs/standards/k_to_o.md.
"""

from __future__ import annotations

from pathlib import Path

from ._k_to_o_harness import (
    CONFIG,
    harness,
    run,
    sid_of,
)


def _with_defaults(extra: str) -> str:
    return CONFIG.replace('passive_paths = ["/poll*"]', 'passive_paths = ["/poll*"]\n' + extra)


# ------------------------------------------------------------------ L / 104 binding to user properties


def test_104_a_user_agent_change_mid_session_is_detected(tmp_path: Path) -> None:
    """[checklist 104 · OWASP Session Mgmt CS, Binding the Session ID to Other User Properties]
    a mid-session User-Agent change should be detected: an audit event and the configured action.

    Observed: the cookie signed in with "Firefox/130" is accepted from "curl/8.5" (200) and nothing
    is audited; lapse keeps only a device label for display (docs/audit.md) and never compares it.
    Fix: record the UA's label (core.device) with the session (it is: ``Session.device``) and compare
    it in src/lapse/core/decide.py ``decide()`` beside ``ip_changed``, under a new
    ``on_device_change = "allow" | "audit" | "step_up" | "revoke"`` (config.py, core/policy.py), with a
    ``session.anomaly`` event (reason ``device_change``) for "audit"."""

    async def main() -> None:
        async with harness(tmp_path) as h:
            sid = await sid_of(h, user_agent="Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0")
            r = await h.auth(sid, "/docs", user_agent="curl/8.5.0")
            anomalies = [e for e in await h.events() if e["event"] not in ("auth.login", "session.created")]
            assert r.status_code != 200 or anomalies, (r.status_code, anomalies)

    run(main())


# ------------------------------------------------------------------ L / 105 ISO 27001 preset


def test_105_an_iso27001_preset_demands_a_defined_idle(tmp_path: Path) -> None:
    """[checklist 105 · ISO/IEC 27002:2022 8.5, checklist §O/§P] an ``iso27001`` preset that makes the
    administrator define the inactivity period (and optionally restrict connection times).

    Observed: ``preset = "iso27001-2022"`` (with an explicit idle) is refused by ``lapse policy check``
    (exit 2, unknown preset); there is no allowed-hours rule either (no ``connection_time_restricted``).
    The stricter-outside-network idle part works (test_k_to_o.py::test_101_105_...).
    Fix: src/lapse/core/presets.py: add ``iso27001-2022`` with ``idle=None`` marked "must be set", and
    in src/lapse/config.py refuse an app/defaults naming it (or ``hipaa``, whose source has no number
    either, §P) without an explicit ``idle``."""
    from click.testing import CliRunner

    from lapse.cli import cli

    conf = tmp_path / "lapse.toml"
    conf.write_text('[defaults]\npreset = "iso27001-2022"\nidle = "15m"\n')
    assert CliRunner().invoke(cli, ["policy", "check", str(conf)]).exit_code == 0
    conf.write_text('[defaults]\npreset = "iso27001-2022"\n')
    assert CliRunner().invoke(cli, ["policy", "check", str(conf)]).exit_code == 2


# ------------------------------------------------------------------ M / 107 renewal


# ------------------------------------------------------------------ M / 108 use after expiry


def test_108_use_of_an_ended_session_is_its_own_critical_event(tmp_path: Path) -> None:
    """[checklist 108 · OWASP Logging Vocabulary ``session_use_after_expire`` (CRITICAL)] replaying a
    cookie whose session has ENDED must be told apart from an ordinary idle refusal.

    Observed: the replay gives ``session.denied`` reason ``idle`` outcome failure, exactly what a LIVE
    session gets when a stricter app's idle limit passed (test_k_to_o.py::test_101_105_...), and the
    syslog severity is notice (5) for both (src/lapse/audit/remote.py: 6 success / 5 failure).
    Fix: src/lapse/core/decide.py ``decide()``, ``if session.ended:`` branch: emit
    ``session.use_after_end`` (reason = the end reason) instead of / beside ``session.denied``, and map
    it to severity crit (2) in src/lapse/audit/remote.py and sinks.py; CONTRACT §5 allows new names."""

    async def main() -> None:
        async with harness(tmp_path) as h:
            sid = await sid_of(h)
            h.clock.now += 601
            await h.auth(sid, "/docs")  # discovers the lapse: session.expired
            before = len(await h.events())
            await h.auth(sid, "/docs")  # the replay
            replay = (await h.events())[before:]
            assert [e["event"] for e in replay] != ["session.denied"], replay

    run(main())


# ------------------------------------------------------------------ M / 110 fields of revocations


# ------------------------------------------------------------------ M / 111 factor of a login

