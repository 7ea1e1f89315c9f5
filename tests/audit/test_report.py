"""``lapse audit report`` (issue 8; CONTRACT.md §1, §5): the gateway records, the report reads.

A script that keeps a session alive on a timer through one path is named with
its evidence; a person with bursty gaps is not. Also the CLI: --json, --png,
--jsonl, the timing line, and the thresholds from ``[report]``.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.audit import report as rep
from lapse.config import load_config, parse_config
from lapse.core import events as ev
from lapse.runtime import open_runtime
from lapse.store.base import AuditQuery

from ..test_cli import lapse
from ..web.test_gateway import T0, harness

run = asyncio.run


async def _bot_and_person(h) -> tuple[str, str]:
    """A script pings every 60 s (+-0.2 s) through one path; a person clicks around at random."""
    bot = await h.sid(user="bob")
    person = await h.sid(user="alice")
    rng = random.Random(8)
    t_bot = t_person = h.clock.now
    for _ in range(30):
        t_bot += 60 + rng.uniform(-0.2, 0.2)
        h.clock.now = t_bot
        assert (await h.auth(bot, "/api/ping")).status_code == 200
    h.clock.now = t_person
    for _ in range(30):
        t_person += rng.expovariate(1 / 40) + 2
        h.clock.now = max(h.clock.now, t_person)
        assert (await h.auth(person, rng.choice(["/", "/docs", "/a/b", "/search"]))).status_code == 200
    h.clock.now = max(t_bot, t_person) + 1
    return bot, person


def test_a_script_on_a_timer_is_a_suspect_with_its_evidence_a_person_is_not(tmp_path: Path):
    async def main():
        async with harness(tmp_path) as h:
            bot, person = await _bot_and_person(h)
            th = rep.Thresholds()
            now = h.clock.now
            live = rep.build([], await h.rt.store.sessions(), th, since=T0 - 1, until=now, source="store")
            [suspect] = live["automation_suspects"]
            assert suspect["user"] == "bob" and suspect["state"] == "live"
            assert suspect["session"] == h.rt.gate.key_of(bot)  # the keyed hash, never the ID
            assert set(suspect["reasons"]) == {"regular", "one_path"}
            e = suspect["evidence"]
            assert e["samples"] == 30 and 59.5 < e["gap_mean_s"] < 60.5 and e["gap_cv"] < 0.01
            assert e["top_path"] == "/api/ping" and e["top_path_share"] == 1.0

            # Both sessions end: the end events carry the evidence, the report reads it from the store sink.
            await h.rt.gate.revoke(h.rt.gate.key_of(bot), "admin")
            h.clock.now += 700  # past the 10m idle limit: the sweeper expires the person's session
            await h.rt.gate.sweep_once()
            events = await rep.from_store(h.rt.store, T0 - 1, h.clock.now + 1)
            report = rep.build(events, await h.rt.store.sessions(), th, since=T0 - 1, until=h.clock.now + 1,
                               source="store")
            [ended] = report["automation_suspects"]
            assert ended["user"] == "bob" and ended["state"] == "revoked" and ended["end_reason"] == "admin"
            assert report["expiries"]["by_reason"] == {"idle": 1}
            assert report["expiries"]["by_app"] == {"main": 1}  # the sweeper's event has no app: the sign-in's
            assert report["revocations"]["by_reason"] == {"admin": 1}
            idle = report["idle_before_expiry"]
            assert idle["count"] == 1 and idle["max_s"] >= 600  # at least the idle limit
            assert report["top_users"][0]["user"] == "alice"
            [expired] = await h.rt.store.search_audit(AuditQuery(events=(ev.EXPIRED,)))
            assert expired.activity["samples"] == 30 and expired.activity["gap_cv"] > 0.5

    run(main())


def test_thresholds_come_from_the_config(tmp_path: Path):
    loaded = parse_config('[report]\nmin_samples = 5\nmax_gap_cv = 0.3\nmin_hours = 24\none_path_share = 0.5\n',
                          "lapse.toml", tmp_path)
    th = rep.Thresholds.from_config(loaded.config.report)
    assert (th.min_samples, th.max_gap_cv, th.min_hours, th.one_path_share) == (5, 0.3, 24, 0.5)
    few = {"samples": 4, "gap_cv": 0.0, "hours": list(range(24)), "top_path_share": 1.0}
    assert rep.suspicion(few, th) == []  # too little evidence to judge
    assert rep.suspicion({**few, "samples": 5}, th) == ["regular", "around_the_clock", "one_path"]
    assert rep.suspicion({**few, "samples": 5, "gap_cv": 0.9, "hours": [1], "top_path_share": 0.2}, th) == []


def test_bad_report_keys_are_named_with_their_line(tmp_path: Path):
    conf = tmp_path / "lapse.toml"
    conf.write_text('[store]\nurl = "memory://"\n\n[report]\nmax_gap_cv = -1\nmin_hourz = 3\n')
    r = lapse("policy", "check", str(conf))
    assert r.returncode == 2
    assert "lapse.toml:5: report.max_gap_cv" in r.stderr and "lapse.toml:6: report.min_hourz" in r.stderr


@pytest.fixture
def populated(tmp_path: Path) -> Path:
    """A config whose store and jsonl sink hold a bot's and a person's ended sessions (now-ish timestamps)."""
    conf = tmp_path / "lapse.toml"
    conf.write_text('[store]\nurl = "sqlite:///state/lapse.db"\n\n[audit]\nsinks = ["store", "jsonl:state/a.jsonl"]\n'
                    '\n[report]\nmin_samples = 10\n\n[defaults]\nidle = "10m"\n')

    async def fill():
        clock_now = [time.time() - 7200]
        async with open_runtime(load_config(conf), clock=lambda: clock_now[0]) as rt:
            gate = rt.gate
            sid, _ = await gate.sign_in("bot", host="x.test")
            for _ in range(15):
                clock_now[0] += 30
                assert (await gate.check(host="x.test", path="/ping", session_id=sid)).decision.allowed
            clock_now[0] += 1200
            await gate.sweep_once()

    run(fill())
    return conf


def test_cli_report_json_png_and_timing(populated: Path, tmp_path: Path):
    png = tmp_path / "charts.png"
    r = lapse("--config", str(populated), "audit", "report", "--json", "--png", str(png))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["source"] == "store" and report["expiries"]["by_reason"] == {"idle": 1}
    [s] = report["automation_suspects"]
    assert s["user"] == "bot" and s["evidence"]["samples"] == 15 and "regular" in s["reasons"]
    assert "idle_before_expiry" in report and "by_app" in report["expiries"]
    assert "events read in" in r.stderr and " s, charts in " in r.stderr  # says how long it took
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    text = lapse("--config", str(populated), "audit", "report", "--jsonl", str(tmp_path / "state" / "a.jsonl"))
    assert text.returncode == 0, text.stderr
    assert "automation suspects: 1" in text.stdout and "bot" in text.stdout and "jsonl:" in text.stdout

    bad = lapse("--config", str(populated), "audit", "report", "--since", "soon")
    assert bad.returncode != 0 and "--since" in bad.stderr and "Traceback" not in bad.stderr


def test_summary_escapes_strings_from_the_log():
    """The text report prints names and paths from the log: one line each, no terminal escapes."""
    forged = "eve\n2026-11-27T10:05:00.000Z  session.revoked\x1b[2K"
    activity = {"samples": 30, "gap_cv": 0.0, "gap_mean_s": 60.0, "hours": [], "top_path": forged,
                "top_path_share": 1.0, "idle_s": 700.0}
    end = ev.AuditEvent(T0, ev.EXPIRED, "success", user=forged, session="s" * 32, app=forged, reason=forged,
                        activity=activity)
    report = rep.build([end], [], rep.Thresholds(), since=T0 - 1, until=T0 + 1, source="jsonl:a\nb")
    text = rep.summary(report)
    assert "\x1b" not in text and "\n2026" not in text
    assert len(text.splitlines()) == 8
    assert "path=eve\\x0a2026-11-27T10:05:00.000Z  session.revoked\\x1b[2K " in text
    assert "(jsonl:a\\x0ab)" in text


HOSTILE = [
    {"activity": "x"}, {"activity": {"samples": "99"}}, {"activity": {"idle_s": "abc"}}, {"ts": 12},
    {"user": ["a"]}, {"activity": {"samples": 50, "gap_cv": "0"}}, {"activity": {"idle_s": float("nan")}},
    {"activity": {"idle_s": 10**400}}, {"activity": {"samples": 50, "hours": 7}},
]


def _end(when: str, **fields: object) -> dict:
    return {"ts": when, "event": "session.expired", "outcome": "success", "user": "u", "reason": "idle",
            "activity": {"idle_s": 5.0, "samples": 1}, **fields}


def test_cli_report_skips_and_counts_malformed_jsonl_lines(populated: Path, tmp_path: Path):
    """Each hostile line is skipped and counted (JSON and stderr); the good one is read; the JSON parses."""
    ts = ev.rfc3339(time.time() - 60)
    lines = [json.dumps(_end(ts, **bad), separators=(",", ":")) for bad in HOSTILE]
    lines.append(json.dumps(_end(ts), separators=(",", ":")))
    lines.append('{"ts":"' + ts + '","event":"session.expired","outcome":"success","activity":{"idle_s":1e999}}')
    log = tmp_path / "hostile.jsonl"
    log.write_text("\n".join(lines) + "\n" + "[" * 100_000 + '"event":"session.revoked"\n')
    r = lapse("--config", str(populated), "audit", "report", "--json", "--jsonl", str(log))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    report = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert report["skipped"] == len(HOSTILE) + 2 and report["expiries"]["total"] == 1
    assert f"skipped {len(HOSTILE) + 2} malformed line(s), the first at line 1" in r.stderr
    text = lapse("--config", str(populated), "audit", "report", "--jsonl", str(log))
    assert text.returncode == 0 and f"skipped: {len(HOSTILE) + 2} malformed" in text.stdout


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_activity_keys = st.sampled_from(["idle_s", "age_s", "samples", "gap_mean_s", "gap_cv", "hours", "top_path",
                                  "top_path_share", "other"])
_events = st.fixed_dictionaries(
    {"ts": st.just(ev.rfc3339(T0)) | _json_values, "event": st.sampled_from(rep.READ) | _json_values},
    optional={
        "outcome": st.just("success") | _json_values,
        **{k: st.text(max_size=8) | _json_values for k in ("user", "session", "app", "ip", "resource", "reason")},
        "activity": st.dictionaries(_activity_keys, _json_values | st.integers(0, 50), max_size=8) | _json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events | st.dictionaries(st.text(max_size=6), _json_values, max_size=4), max_size=8))
def test_arbitrary_jsonl_objects_never_break_the_report(objects: list[dict]):
    """Whatever objects the file holds: no exception, and the JSON output always parses (no NaN)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.jsonl"
        path.write_text("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objects), encoding="utf-8")
        bad: list[int] = []
        events = list(rep.from_jsonl(path, T0 - 3600, T0 + 3600, bad))
    report = rep.build(events, [], rep.Thresholds(min_samples=1), since=T0 - 3600, until=T0 + 3600,
                       source="jsonl", skipped=len(bad))
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["events_read"] + report["skipped"] <= len(objects)
    rep.summary(report)
