"""``lapse serve`` as a real process: JSON logs, SIGHUP reload, SIGTERM drain, fail closed at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ..support import free_port

CONFIG = """
[server]
listen = "127.0.0.1:{port}"

[store]
url = "sqlite:///state/lapse.db"

[defaults]
idle = "{idle}"
"""


def _wait_up(port: int, proc: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"lapse serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/_lapse/healthz", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("lapse serve did not come up")


@pytest.fixture
def server(tmp_path: Path):
    port = free_port()
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=port, idle="5m"))
    proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_up(port, proc)
    yield proc, port, conf
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _explain_idle(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/_lapse/auth", headers={"x-original-uri": "/"})
    return r.headers["x-lapse-reason"]


def test_sighup_reloads_a_good_file_and_refuses_a_bad_one(server):
    proc, port, conf = server
    conf.write_text(CONFIG.format(port=port, idle="7m") + "\n[login]\nmax_attempts = 1\n"
                    + "\n[[apps]]\nname = 'x'\nhosts = ['x.test']\n")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    conf.write_text(CONFIG.format(port=port, idle="0s"))  # invalid: refused, the old policy stays
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)
    assert _explain_idle(port) == "missing"  # still serving
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert any("policy replaced (1 apps" in m for m in messages)
    refused = [m for m in messages if m.startswith("reload refused")]
    assert len(refused) == 1 and "defaults.idle" in refused[0]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert messages[-1] == "lapse stopped" or "lapse stopped" in messages
    # [checklist 36 · NIST SP 800-63B-4 5.2] each reload is audited: what changed, or why it was refused.
    conf.write_text(CONFIG.format(port=port, idle="7m"))  # readable again, for the CLI
    tail = subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), "audit", "tail", "-n", "20", "--json"],
                          capture_output=True, text=True, timeout=30, cwd=conf.parent)
    changed = [json.loads(line) for line in tail.stdout.splitlines() if '"policy.changed"' in line]
    assert tail.returncode == 0, tail.stderr
    assert [(e["outcome"], e["reason"], e["resource"]) for e in changed] == [
        ("success", "reload", "SIGHUP"), ("failure", "invalid", "SIGHUP")]
    assert changed[0]["detail"]["changes"] == {
        "(defaults)": {"idle_s": [300.0, 420.0]},
        "x": {"idle_s": [None, 420.0], "absolute_s": [None, 43200.0], "warn_before_s": [None, 120.0]},
    }
    assert "defaults.idle" in changed[1]["detail"]["error"]
    # [login] is read once at start: the reload says so, in the log and in the event.
    assert changed[0]["detail"]["at_next_restart"] == ["login"]
    assert "reload: [login] changed; it takes effect at the next restart" in messages


def test_sigterm_lets_in_flight_requests_finish(server):
    proc, port, _ = server
    with httpx.Client(timeout=10) as client:
        # A slow client: the body arrives after SIGTERM; the request still gets its answer.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /_lapse/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
                         b"\r\nContent-Length: 13\r\n\r\nusername=ali")
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            sock.sendall(b"c")
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 403")  # no CSRF token: refused, but answered
        assert proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
        with pytest.raises(httpx.HTTPError):
            client.get(f"http://127.0.0.1:{port}/_lapse/healthz")


def test_a_store_that_cannot_open_stops_the_start_with_a_message(tmp_path: Path):
    (tmp_path / "state").write_text("a file where the store's folder should be")
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=free_port(), idle="5m"))
    r = subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode != 0
    assert "cannot start" in r.stderr and "Traceback" not in r.stderr


def test_metrics_on_their_own_listener(tmp_path: Path):
    port, metrics_port = free_port(), free_port()
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=port, idle="5m") + f'\n[telemetry]\nmetrics_listen = "127.0.0.1:{metrics_port}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _wait_up(port, proc)
        for _ in range(3):
            httpx.get(f"http://127.0.0.1:{port}/_lapse/auth", headers={"cookie": "__Host-lapse=" + "A" * 43, "x-original-uri": "/"})
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert 'lapse_decisions_total{reason="unknown",verdict="deny"} 3.0' in text
        assert "lapse_decision_seconds_bucket" in text and "lapse_live_sessions 0.0" in text
        assert "lapse_store_up 1.0" in text
        public = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert "lapse_decisions_total" not in public.text
    finally:
        proc.kill()
        proc.wait()


def test_audit_end_to_end_with_the_sweeper(tmp_path: Path):
    """Login failure and success, created, denied, and an expiry the sweeper writes when nobody returns."""
    import re

    port = free_port()
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=port, idle="1s") + '\n[audit]\nsinks = ["store", "jsonl:audit.jsonl"]\n')
    subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), "users", "add", "alice", "--password-stdin"],
                   input="correct horse battery\n", text=True, check=True, cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _wait_up(port, proc)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base) as client:
            page = client.get("/_lapse/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            nonce = page.headers["set-cookie"].split(";", 1)[0]
            for password in ("wrong password", "correct horse battery"):
                r = client.post("/_lapse/login", headers={"cookie": nonce},
                                data={"username": "alice", "password": password, "csrf_token": token})
            session = r.headers["set-cookie"].split(";", 1)[0]
            client.get("/_lapse/auth", headers={"cookie": "__Host-lapse=" + "B" * 43, "x-original-uri": "/"})
        deadline = time.monotonic() + 10
        events: list[dict] = []
        while time.monotonic() < deadline:
            events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
            if any(e["event"] == "session.expired" for e in events):
                break
            time.sleep(0.2)
        names = [(e["event"], e["outcome"]) for e in events]
        assert names == [("user.created", "success"), ("auth.login", "failure"), ("auth.login", "success"),
                         ("session.created", "success"), ("session.denied", "failure"),
                         ("session.expired", "success")]
        assert events[-1]["reason"] == "idle" and events[-1]["user"] == "alice"
        assert session.split("=", 1)[1] not in (tmp_path / "audit.jsonl").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_several_workers_share_the_store(tmp_path: Path):
    """workers = 2 on SQLite: sessions made through one worker are judged the same by the other."""
    port = free_port()
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=port, idle="5m").replace("[server]", "[server]\nworkers = 2"))
    proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(conf), "serve"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        _wait_up(port, proc)
        script = (
            "import asyncio\nfrom lapse.config import load_config\nfrom lapse.runtime import open_runtime\n"
            "async def main():\n"
            f"    async with open_runtime(load_config({str(conf)!r})) as rt:\n"
            "        sid, _ = await rt.gate.sign_in('carol')\n        print(sid)\n"
            "asyncio.run(main())\n"
        )
        sid = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=tmp_path).stdout.strip()
        pids = set()
        for _ in range(40):  # new connections: both workers answer some of them
            r = httpx.get(f"http://127.0.0.1:{port}/_lapse/auth", headers={"cookie": f"__Host-lapse={sid}",
                                                                         "x-original-uri": "/"})
            assert r.status_code == 200 and r.headers["remote-user"] == "carol", r.text
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        pids = {json.loads(line)["pid"] for line in proc.stderr.read().splitlines() if '"lapse serving' in line}
        assert len(pids) == 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_startup_freezes_what_it_made_so_full_collections_never_walk_it(tmp_path: Path, monkeypatch) -> None:
    """Each full collection walked every object startup made (modules, templates, the policy): a ~20 ms pause
    in the middle of requests, the p99 of bench/load.py at 100k sessions. The lifespan freezes them."""
    import asyncio
    import gc

    from lapse.config import load_config
    from lapse.web.serve import Service

    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "lapse.toml"
    conf.write_text(CONFIG.format(port=free_port(), idle="5m"))
    service = Service(load_config(str(conf)), str(conf))
    gc.unfreeze()

    async def lifespan() -> tuple[int, list[str]]:
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        sent: list[str] = []
        started = asyncio.Event()

        async def send(message: dict) -> None:
            sent.append(message["type"])
            started.set()

        await inbox.put({"type": "lifespan.startup"})
        task = asyncio.create_task(service({"type": "lifespan"}, inbox.get, send))
        await asyncio.wait_for(started.wait(), 10)
        frozen = gc.get_freeze_count()
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 10)
        return frozen, sent

    try:
        frozen, sent = asyncio.run(lifespan())
    finally:
        gc.unfreeze()
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert frozen > 10_000  # the modules and everything startup built
