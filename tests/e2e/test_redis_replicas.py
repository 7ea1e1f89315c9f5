"""Two ``lapse serve`` replicas on one real Redis: one set of sessions, users, revocations and events.

Each test starts its own ``redis-server`` and two gateway processes that share
the config folder (so the secret file) and the Redis URL, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lapse.store.redis import RedisStore

from ..redis_server import RedisServer
from ..support import free_port

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
secret_file = "shared/secret"

[store]
url = "{url}"
sweep_interval = "1s"

[defaults]
idle = "{idle}"
"""
PASSWORD = "correct horse battery"


class Replica:
    def __init__(self, folder: Path, name: str, url: str, idle: str) -> None:
        self.port = free_port()
        self.config = folder / f"{name}.toml"
        self.config.write_text(CONFIG.format(port=self.port, url=url, idle=idle))
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "lapse", "--config", str(self.config), "serve"],
                                     stderr=subprocess.PIPE, text=True, cwd=folder)

    def wait_up(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lapse serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.base}/_lapse/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("lapse serve did not come up")

    def auth(self, sid: str | None) -> httpx.Response:
        cookie = {"cookie": f"__Host-lapse={sid}"} if sid else {}
        return httpx.get(f"{self.base}/_lapse/auth", headers={"x-original-uri": "/", **cookie}, timeout=5)

    def login(self, user: str = "alice") -> str:
        with httpx.Client(base_url=self.base) as client:
            page = client.get("/_lapse/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            nonce = page.headers["set-cookie"].split(";", 1)[0]
            r = client.post("/_lapse/login", headers={"cookie": nonce},
                            data={"username": user, "password": PASSWORD, "csrf_token": token})
            assert r.status_code == 303, r.text
            return r.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def _replicas(tmp_path: Path, redis: RedisServer, idle: str = "5m") -> tuple[Replica, Replica]:
    url = redis.url + "?timeout=0.5"
    conf = tmp_path / "setup.toml"
    conf.write_text(CONFIG.format(port=free_port(), url=url, idle=idle))
    subprocess.run([sys.executable, "-m", "lapse", "--config", str(conf), "users", "add", "alice", "--password-stdin"],
                   input=PASSWORD + "\n", text=True, check=True, cwd=tmp_path, capture_output=True)
    a, b = Replica(tmp_path, "a", url, idle), Replica(tmp_path, "b", url, idle)
    a.wait_up()
    b.wait_up()
    return a, b


@pytest.fixture
def pair(tmp_path: Path, redis: RedisServer) -> Iterator[tuple[Replica, Replica]]:
    a, b = _replicas(tmp_path, redis)
    yield a, b
    a.stop()
    b.stop()


def _audit(redis: RedisServer, n: int = 100_000) -> list:
    async def tail() -> list:
        store = RedisStore(redis.url)
        try:
            return await store.tail_audit(n)
        finally:
            await store.close()

    return asyncio.run(tail())


def _sign_in(config: Path, n: int) -> list[str]:
    """n sessions at once through the runtime (password hashing would make them trickle in)."""
    script = (
        "import asyncio\nfrom lapse.config import load_config\nfrom lapse.runtime import open_runtime\n"
        "async def main():\n"
        f"    async with open_runtime(load_config({str(config)!r})) as rt:\n"
        f"        for _ in range({n}):\n"
        "            print((await rt.gate.sign_in('alice'))[0])\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=config.parent).stdout
    return out.split()


def test_a_session_from_a_works_on_b_and_a_logout_on_a_is_refused_on_b_at_once(pair) -> None:
    a, b = pair
    sid = a.login()  # the user lives in Redis: created by the CLI, checked by replica A
    r = b.auth(sid)
    assert r.status_code == 200 and r.headers["remote-user"] == "alice"
    with httpx.Client(base_url=a.base, headers={"cookie": f"__Host-lapse={sid}"}) as client:
        token = client.get("/_lapse/session").json()["csrf_token"]
        assert client.post("/_lapse/logout", headers={"x-csrf-token": token}).status_code in (200, 303)
    r = b.auth(sid)  # no wait: B has no cache to go stale
    assert r.status_code == 401 and r.headers["x-lapse-reason"] == "revoked"


def test_redis_stopped_means_503_on_both_and_they_recover_without_a_restart(pair, redis: RedisServer) -> None:
    a, b = pair
    sid = a.login()
    redis.proc.send_signal(signal.SIGSTOP)  # hung first: every call times out
    try:
        for replica in (a, b):
            started = time.monotonic()
            assert replica.auth(sid).status_code == 503
            assert time.monotonic() - started < 3
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    assert b.auth(sid).status_code == 200
    redis.stop()  # then gone
    for replica in (a, b):
        assert all(replica.auth(sid).status_code == 503 for _ in range(20))
        assert httpx.get(f"{replica.base}/_lapse/healthz").status_code == 503
    redis.start()  # back, empty (tests run Redis without persistence): the old session is unknown, not served
    for replica in (a, b):
        assert httpx.get(f"{replica.base}/_lapse/healthz").status_code == 200
        r = replica.auth(sid)
        assert r.status_code == 401 and r.headers["x-lapse-reason"] == "unknown"
    a.stop()
    b.stop()
    for replica in (a, b):
        logged = [json.loads(line)["msg"] for line in replica.proc.stderr.read().splitlines() if line.startswith("{")]
        store_lines = [m for m in logged if m.startswith("redis store")]
        assert any("failing closed" in m for m in store_lines) and any("answers again" in m for m in store_lines)
        # 22+ refused requests over two outages: the gateway says so once a cause (timeout, refused, ...),
        # not once a request.
        said = [m for m in logged if m.startswith("store unavailable, failing closed")]
        assert 1 <= len(said) <= 4, said


def test_one_replica_killed_under_load_loses_no_session_and_duplicates_no_event(tmp_path: Path, redis) -> None:
    """Load on both; A is killed mid-way; B serves every session, and every one ends with exactly one event."""
    a, b = _replicas(tmp_path, redis, idle="3s")
    c: Replica | None = None
    try:
        sids = _sign_in(a.config, 20)
        refused: list[tuple[str, int, str | None]] = []
        stop = threading.Event()

        def load(replica: Replica, mine: list[str]) -> None:
            with httpx.Client(timeout=5) as client:
                while not stop.is_set():
                    for sid in mine:
                        try:
                            r = client.get(f"{replica.base}/_lapse/auth",
                                           headers={"x-original-uri": "/", "cookie": f"__Host-lapse={sid}"})
                        except httpx.HTTPError:
                            if replica is a:
                                continue  # A is gone: its clients would go to B
                            raise
                        if r.status_code != 200:
                            refused.append((sid, r.status_code, r.headers.get("x-lapse-reason")))

        threads = [threading.Thread(target=load, args=(a, sids)), threading.Thread(target=load, args=(b, sids))]
        for t in threads:
            t.start()
        time.sleep(1.0)
        a.proc.kill()  # mid-load, mid-sweep: no goodbye
        a.proc.wait()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        assert refused == []  # no session was lost: B judged every one of them alive throughout
        # A replacement comes up, so two sweepers race; nobody comes back: each session gets exactly one event.
        c = Replica(tmp_path, "c", redis.url + "?timeout=0.5", "3s")
        c.wait_up()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ended = Counter(e.session for e in _audit(redis) if e.event in ("session.expired", "session.revoked"))
            if len(ended) >= 20:
                break
            time.sleep(0.2)
        created = {e.session for e in _audit(redis) if e.event == "session.created"}
        assert len(created) == 20 and set(ended) == created
        assert set(ended.values()) == {1}
        assert all(r.status_code == 401 for r in (b.auth(sid) for sid in sids))
        time.sleep(0.5)  # a few more sweeps: still one event each
        again = Counter(e.session for e in _audit(redis) if e.event in ("session.expired", "session.revoked"))
        assert again == ended
    finally:
        for replica in (a, b, c):
            if replica is not None:
                replica.stop()
