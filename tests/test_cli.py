"""The ``lapse`` command as a user runs it (CONTRACT.md §1): real processes, real SQLite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lapse.toml"


def lapse(*args: str, stdin: str | None = None, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "lapse", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "lapse.toml"
    path.write_text(
        """
[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store", "jsonl:state/audit.jsonl"]

[defaults]
idle = "15m"

[[apps]]
name = "wiki"
hosts = ["wiki.test"]
idle = "1h"
"""
    )
    return path


def test_version():
    r = lapse("--version")
    assert r.returncode == 0 and r.stdout.startswith("lapse ")


def test_policy_check_valid_and_invalid(tmp_path: Path):
    ok = lapse("policy", "check", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[apps]]\nname = "a"\nhosts = ["a.test"]\n\n[[apps]]\nname = "b"\nhosts = ["b.test"]\nidel = "5m"\n')
    r = lapse("policy", "check", str(bad))
    assert r.returncode == 2
    assert "apps[1].idel" in r.stderr and ":8:" in r.stderr
    assert "Traceback" not in r.stderr


def test_policy_explain_json_matches_contract():
    r = lapse("--config", str(EXAMPLE), "policy", "explain", "--host", "billing.example.test",
              "--path", "/billing/invoices?page=2", "--ip", "10.1.2.3", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("app", "network", "idle_timeout_s", "absolute_timeout_s", "warn_before_s", "activity", "step_up", "rules"):
        assert key in data
    assert data["app"] == "billing" and data["network"] == "office"
    assert data["activity"] == "active" and data["step_up"] is None
    assert data["rules"][0] == "app:billing" and any(r.startswith("network:office") for r in data["rules"])


def test_policy_explain_config_after_subcommand_and_headers():
    r = lapse("policy", "explain", "--host", "billing.example.test", "--path", "/billing/admin/refunds",
              "--method", "POST", "--header", "X-Lapse-Activity: passive", "--json", "--config", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["activity"] == "passive" and "passive:header" in data["rules"]
    assert data["step_up"] == {"max_auth_age_s": 300.0, "mfa": True}


def test_policy_explain_bad_input_is_a_message():
    r = lapse("--config", str(EXAMPLE), "policy", "explain", "--host", "x", "--path", "/", "--ip", "300.1.1.1")
    assert r.returncode != 0 and "--ip" in r.stderr and "Traceback" not in r.stderr


def test_users_lifecycle_and_password_never_in_output(conf: Path):
    secret = "correct horse battery"
    r = lapse("--config", str(conf), "users", "add", "alice", "--password-stdin", "--admin", stdin=secret + "\n")
    assert r.returncode == 0, r.stderr
    assert (conf.parent / "state" / "lapse.db").exists()
    assert oct((conf.parent / ".lapse" / "secret").stat().st_mode & 0o777) == "0o600"
    dup = lapse("--config", str(conf), "users", "add", "alice", "--password-stdin", stdin=secret + "\n")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    listed = json.loads(lapse("--config", str(conf), "users", "list", "--json").stdout)
    assert [(u["name"], u["admin"], u["disabled"]) for u in listed] == [("alice", True, False)]
    for cmd in (["disable", "alice"], ["enable", "alice"]):
        assert lapse("--config", str(conf), "users", *cmd).returncode == 0
    assert lapse("--config", str(conf), "users", "passwd", "alice", "--password-stdin", stdin="another pass 1\n").returncode == 0
    assert lapse("--config", str(conf), "users", "delete", "alice").returncode == 0
    assert lapse("--config", str(conf), "users", "delete", "alice").returncode == 1
    # The password is in no file lapse wrote and no output.
    for path in (conf.parent / "state").iterdir():
        assert secret.encode() not in path.read_bytes()
    events = [json.loads(line)["event"] for line in (conf.parent / "state" / "audit.jsonl").read_text().splitlines()]
    assert events == ["user.created", "user.disabled", "user.enabled", "user.password_changed", "user.deleted"]


def test_users_totp_prints_uri_qr_and_recovery_codes_once(conf: Path):
    assert lapse("--config", str(conf), "users", "add", "bob", "--password-stdin", stdin="hunter2hunter2\n").returncode == 0
    r = lapse("--config", str(conf), "users", "totp", "bob")
    assert r.returncode == 0, r.stderr
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    assert "secret=" in uri and "issuer=lapse" in uri and "\u2588" in r.stdout  # the QR code's blocks
    codes = [line.strip() for line in r.stdout.splitlines() if re.fullmatch(r"\s+[a-z0-9]{5}-[a-z0-9]{5}", line)]
    assert len(codes) == 10
    again = lapse("--config", str(conf), "users", "totp", "bob")
    assert again.returncode == 1 and "--reset" in again.stderr
    assert lapse("--config", str(conf), "users", "totp", "bob", "--remove").returncode == 0
    assert lapse("--config", str(conf), "users", "totp", "bob").returncode == 0


def test_passwords_only_from_stdin(conf: Path):
    r = lapse("--config", str(conf), "users", "add", "bob")
    assert r.returncode == 1 and "--password-stdin" in r.stderr
    short = lapse("--config", str(conf), "users", "add", "bob", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "too short" in short.stderr


def test_sessions_list_revoke_and_audit_tail(conf: Path):
    """Sessions made through the real gate show in the CLI; revoking ends them with one event each."""
    script = f"""
import asyncio
from lapse.config import load_config
from lapse.runtime import open_runtime

async def main():
    async with open_runtime(load_config({str(conf)!r})) as rt:
        for user in ("carol", "carol", "dave"):
            await rt.gate.sign_in(user, host="wiki.test", ip="192.0.2.7",
                                  device="Firefox on Android" if user == "dave" else None)

asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=conf.parent, timeout=60)
    rows = json.loads(lapse("--config", str(conf), "sessions", "list", "--json").stdout)
    assert sorted(r["user"] for r in rows) == ["carol", "carol", "dave"]
    row = rows[0]
    for key in ("handle", "user", "device", "ip", "created_at", "last_active_at", "idle_expires_in",
                "absolute_expires_in"):
        assert key in row
    assert sorted((r["user"], r["device"]) for r in rows) == [("carol", None), ("carol", None),
                                                             ("dave", "Firefox on Android")]
    table = lapse("--config", str(conf), "sessions", "list").stdout.splitlines()
    assert table[0].split()[:4] == ["HANDLE", "USER", "DEVICE", "IP"]
    assert any(" dave " in line and "Firefox on Android" in line for line in table)
    assert 3500 < row["idle_expires_in"] <= 3600  # the most generous idle limit: the wiki's hour
    assert row["ip"] == "192.0.2.7" and row["created_at"].endswith("Z")

    carol = json.loads(lapse("--config", str(conf), "sessions", "list", "--user", "carol", "--json").stdout)
    assert len(carol) == 2
    one = lapse("--config", str(conf), "sessions", "revoke", carol[0]["handle"])
    assert one.returncode == 0 and "ended 1" in one.stdout
    assert lapse("--config", str(conf), "sessions", "revoke", carol[0]["handle"]).returncode == 1
    assert "ended 1" in lapse("--config", str(conf), "sessions", "revoke", "--user", "carol").stdout
    assert "ended 1" in lapse("--config", str(conf), "sessions", "revoke", "--all").stdout
    both = lapse("--config", str(conf), "sessions", "revoke", "abcdef", "--all")
    assert both.returncode == 1 and "exactly one" in both.stderr

    tail = lapse("--config", str(conf), "audit", "tail", "-n", "3", "--json")
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert [e["event"] for e in events] == ["session.revoked"] * 3
    assert all(e["reason"] == "admin" and e["outcome"] == "success" for e in events)
    assert all(len(e["session"]) == 32 and e["ts"].endswith("Z") for e in events)
    human = lapse("--config", str(conf), "audit", "tail", "-n", "1")
    assert "session.revoked" in human.stdout and "reason=admin" in human.stdout


def test_config_from_environment_and_cwd(conf: Path, tmp_path: Path):
    via_env = lapse("users", "list", env={"LAPSE_CONFIG": str(conf)}, cwd=tmp_path.parent)
    assert via_env.returncode == 0 and (conf.parent / "state" / "lapse.db").exists()
    via_cwd = lapse("users", "list", "--json", cwd=conf.parent)
    assert via_cwd.returncode == 0 and json.loads(via_cwd.stdout) == []


def test_store_unavailable_is_a_message(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    conf = tmp_path / "c.toml"
    conf.write_text(f'[store]\nurl = "sqlite:///{blocker}/db.sqlite"\n')
    r = lapse("--config", str(conf), "users", "list")
    assert r.returncode == 1 and "store unavailable" in r.stderr and "Traceback" not in r.stderr


def test_users_unbind_frees_a_name_bound_to_an_idp_account(conf: Path):
    """A name given to someone new at the IdP: ``users unbind`` drops its binding (audited), once."""
    import asyncio

    from lapse.config import load_config
    from lapse.runtime import open_runtime
    from lapse.sso import name_claim

    async def claim(value: str) -> str:
        async with open_runtime(load_config(str(conf))) as rt:
            return await rt.store.claim(name_claim("Bob"), value)

    assert asyncio.run(claim("old-account")) == "old-account"
    r = lapse("--config", str(conf), "users", "unbind", "bob")
    assert r.returncode == 0 and "bob is free" in r.stdout, r.stderr
    assert asyncio.run(claim("new-account")) == "new-account"
    again = lapse("--config", str(conf), "users", "unbind", "nobody")
    assert again.returncode == 1 and "no IdP account holds the name 'nobody'" in again.stderr
    audit = [json.loads(line) for line in (conf.parent / "state" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["user"]) for e in audit] == [("user.unbound", "bob")]


def test_audit_tail_huge_count_is_a_usage_error(conf: Path):
    r = lapse("--config", str(conf), "audit", "tail", "-n", "100000000000000000000")
    assert r.returncode == 2 and "-n" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("setting", ["secret", "sink"])
def test_a_file_that_cannot_be_created_is_named_not_a_traceback(tmp_path: Path, setting: str):
    """A parent that is a file: the message names the setting, exit 1."""
    (tmp_path / "blk").write_text("a file, not a folder")
    conf = tmp_path / "c.toml"
    body = '[server]\nsecret_file = "blk/secret"\n' if setting == "secret" else '[audit]\nsinks = ["jsonl:blk/a.jsonl"]\n'
    conf.write_text(body + '[store]\nurl = "memory://"\n')
    r = lapse("--config", str(conf), "users", "list")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    named = "secret_file" if setting == "secret" else "audit sink jsonl:blk/a.jsonl"
    assert r.stderr.startswith(f"error: {named}: ") and "blk" in r.stderr


def test_a_failing_audit_sink_is_a_message(tmp_path: Path):
    conf = tmp_path / "c.toml"
    conf.write_text('[store]\nurl = "memory://"\n[audit]\nsinks = ["jsonl:/dev/full"]\n')
    r = lapse("--config", str(conf), "users", "add", "bob", "--password-stdin", stdin="hunter2hunter2\n")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: audit sink jsonl:/dev/full: ")


def test_a_name_that_differs_only_by_case_is_refused(conf: Path):
    assert lapse("--config", str(conf), "users", "add", "alice", "--password-stdin", stdin="hunter2hunter2\n").returncode == 0
    for name in ("ALICE", "Alice"):
        r = lapse("--config", str(conf), "users", "add", name, "--password-stdin", stdin="hunter2hunter2\n")
        assert r.returncode == 1 and "'alice' already exists" in r.stderr and "case" in r.stderr
    listed = json.loads(lapse("--config", str(conf), "users", "list", "--json").stdout)
    assert [u["name"] for u in listed] == ["alice"]


FORGED = "eve\n2026-11-27T10:05:00.000Z  session.revoked  success  user=alice  reason=admin\x1b[2K"


def test_audit_tail_escapes_fields_so_a_name_cannot_forge_a_line(conf: Path):
    """A failed login's user name is whatever was typed: it shows escaped, on its event's own line."""
    import asyncio

    from lapse.config import load_config
    from lapse.core.events import AuditEvent
    from lapse.runtime import open_runtime

    async def failed_login() -> None:
        async with open_runtime(load_config(str(conf))) as rt:
            await rt.audit.emit([AuditEvent(await rt.store.now(), "auth.login", "failure", user=FORGED,
                                            resource="POST /login\u2028x")])

    asyncio.run(failed_login())
    human = lapse("--config", str(conf), "audit", "tail")
    assert human.returncode == 0, human.stderr
    [line] = human.stdout.splitlines()
    assert "auth.login  failure  user=eve\\x0a2026-11-27T10:05:00.000Z  session.revoked" in line
    assert line.endswith("reason=admin\\x1b[2K  resource=POST /login\\u2028x")
    assert "\x1b" not in human.stdout and "\u2028" not in human.stdout
    as_json = lapse("--config", str(conf), "audit", "tail", "--json")
    assert json.loads(as_json.stdout)["user"] == FORGED  # --json is unchanged: JSON escapes it itself
