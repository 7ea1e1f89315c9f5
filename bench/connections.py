"""Connections (issue 9): what lapse's per-connection monitor costs, in one run.

- WebSocket echo round trips, one client, sequential: direct to the upstream vs through lapse in
  proxy mode (every client message is an active ``Gate.check``);
- N idle WebSockets (default 10,000) held open through lapse, one worker: memory per connection (the
  lapse process's RSS growth; lapse runs in a child process), the timer cost (the lapse process's CPU
  time over an idle interval with N armed monitors, against the same interval with none: CPU time,
  not wall time, as the machine is shared), and the close-time spread at their common deadline (the
  close frame's arrival at each client, and lapse's own ``connection.terminated`` audit times);
- PostgreSQL ``select 1`` round trips, direct vs through the ``[[postgres]]`` gateway (needs
  Debian's postgresql; skipped without it).

Usage: .venv/bin/python bench/connections.py [--messages 2000] [--idle 10000] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.client import connect  # noqa: E402

from tests.connections.harness import UPSTREAM, open_files_at_least, serve  # noqa: E402
from tests.connections.test_soak import _Timed  # noqa: E402
from tests.support import free_port, port_open  # noqa: E402

LAPSE_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
mode = "proxy"
upstream = "http://{upstream}"
{extra_server}
[store]
url = "sqlite:///state/lapse.db"
[audit]
sinks = ["store"]
[defaults]
idle = "{idle}"
absolute = "1h"
{postgres}
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, window: float) -> float:
    """CPU seconds the process used over ``window`` wall seconds of doing nothing asked of it."""
    before = cpu_s(pid)
    time.sleep(window)
    return cpu_s(pid) - before


def start_lapse(folder: Path, upstream: str, idle: str, postgres: str = "") -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = folder / "lapse.toml"
    config.write_text(LAPSE_CONFIG.format(port=port, upstream=upstream, idle=idle, extra_server="", postgres=postgres))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lapse")), "--config", str(config), "serve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        if port_open(port):
            break
        time.sleep(0.02)
    return proc, port


def sign_in(folder: Path) -> str:
    """A fresh session's cookie header value."""
    from lapse.config import load_config
    from lapse.runtime import open_runtime

    loaded = load_config(folder / "lapse.toml")

    async def go() -> str:
        async with open_runtime(loaded) as rt:
            sid, _ = await rt.gate.sign_in("bench", host="127.0.0.1", path="/")
            return sid

    return f"{loaded.config.server.effective_cookie_name}={asyncio.run(go())}"


async def round_trips(url: str, cookie: str | None, n: int) -> list[float]:
    headers = {"Cookie": cookie} if cookie else {}
    async with connect(url, additional_headers=headers, compression=None) as ws:
        await ws.recv()  # the greeting
        out = []
        for i in range(n):
            started = time.perf_counter()
            await ws.send(f"m{i}")
            await ws.recv()
            out.append(time.perf_counter() - started)
        return out


def session_deadline(folder: Path, cookie: str) -> float:
    """The session's deadline as the store has it now (a passive check: it moves nothing)."""
    from lapse.config import load_config
    from lapse.runtime import open_runtime

    loaded = load_config(folder / "lapse.toml")

    async def go() -> float:
        async with open_runtime(loaded) as rt:
            verdict = await rt.gate.check(host="127.0.0.1", path="/ws", passive_header=True,
                                          session_id=cookie.split("=", 1)[1])
            assert verdict.decision.deadline is not None, verdict.decision
            return verdict.decision.deadline

    return asyncio.run(go())


def terminated_at(folder: Path, n: int) -> list[float]:
    """lapse's own ``connection.terminated`` audit times (store clock)."""
    from lapse.config import load_config
    from lapse.runtime import open_runtime

    async def go() -> list[float]:
        async with open_runtime(load_config(folder / "lapse.toml")) as rt:
            give_up = time.monotonic() + 120  # lapse audits after the close frame and the upstream's close
            while True:
                found = [e.ts for e in await rt.store.tail_audit(n + 100) if e.event == "connection.terminated"]
                if len(found) >= n or time.monotonic() > give_up:
                    return found
                await asyncio.sleep(0.5)

    return asyncio.run(go())


def spread(offsets: list[float]) -> dict:
    offsets = sorted(offsets)
    at = lambda q: round(offsets[min(len(offsets) - 1, int(q * len(offsets)))], 3)  # noqa: E731
    return {"n": len(offsets), "min_s": at(0), "median_s": at(0.5), "p99_s": at(0.99), "max_s": at(1)}


async def open_idle(url: str, cookie: str, n: int) -> list[_Timed]:
    conns: list[_Timed] = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(connect(url, additional_headers={"Cookie": cookie}, compression=None,
                                                ping_interval=None, proxy=None, open_timeout=60,
                                                create_connection=_Timed)
                                        for _ in range(min(100, n - i))))
    return conns


async def all_closed(conns: list[_Timed], timeout: float) -> None:
    await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), timeout)


def idle_many(folder: Path, url: str, n: int, pid: int, window: float) -> dict:
    """Open n idle WebSockets on one session, measure, and let them all reach the session's deadline."""
    cookie = sign_in(folder)
    time.sleep(1)
    before = rss_kib(pid)
    cpu_none = idle_cpu(pid, window)
    loop = asyncio.new_event_loop()
    try:
        started = time.monotonic()
        conns = loop.run_until_complete(open_idle(url, cookie, n))
        opening_s = time.monotonic() - started
        held = rss_kib(pid)
        # the loop must run while we wait, or the clients would not answer lapse's pings
        cpu_armed = loop.run_until_complete(asyncio.to_thread(idle_cpu, pid, window))
        deadline = session_deadline(folder, cookie)
        loop.run_until_complete(all_closed(conns, max(60.0, deadline - time.time() + 60)))
    finally:
        loop.close()
    codes = sorted({c.close_code for c in conns if c.close_code is not None})
    cut = [c.cut_at - deadline for c in conns if c.cut_at is not None]
    audited = [t - deadline for t in terminated_at(folder, n)]
    return {
        "connections": n, "opening_s": round(opening_s, 1), "rss_before_kib": before, "rss_held_kib": held,
        "kib_per_connection": round((held - before) / n, 1),
        "idle_window_s": window, "cpu_s_no_connections": round(cpu_none, 2), "cpu_s_armed": round(cpu_armed, 2),
        "timer_cost_cpu_ms_per_s": round((cpu_armed - cpu_none) / window * 1000, 1),
        "timer_cost_cpu_us_per_connection_per_s": round((cpu_armed - cpu_none) / window / n * 1e6, 2),
        "close_codes": codes, "cut_after_deadline_client": spread(cut), "terminated_audit_after_deadline": spread(audited),
    }


def summary(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {"n": len(samples), "median_us": round(statistics.median(samples) * 1e6, 1),
            "p99_us": round(samples[int(len(samples) * 0.99) - 1] * 1e6, 1),
            "per_s": round(len(samples) / sum(samples))}


def postgres_latency(n: int) -> dict | None:
    try:
        import psycopg

        from tests.connections.test_postgres import PASSWORD, postgres_cluster
    except ImportError:
        return None
    import pytest

    try:
        with postgres_cluster() as pg, tempfile.TemporaryDirectory() as tmp, serve(UPSTREAM) as upstream:
            gw = free_port()
            block = f'[[postgres]]\nname = "db"\nlisten = "127.0.0.1:{gw}"\nupstream = "127.0.0.1:{pg}"\nidle = "1h"\n'
            proc, _ = start_lapse(Path(tmp), upstream, "1h", block)
            try:
                out = {}
                for name, port in (("direct", pg), ("through_lapse", gw)):
                    with psycopg.connect(host="127.0.0.1", port=port, user="alice", password=PASSWORD,
                                         dbname="postgres", autocommit=True) as conn:
                        for _ in range(100):
                            conn.execute("select 1")
                        samples = []
                        for _ in range(n):
                            started = time.perf_counter()
                            conn.execute("select 1").fetchone()
                            samples.append(time.perf_counter() - started)
                    out[name] = summary(samples)
                out["added_median_us"] = round(out["through_lapse"]["median_us"] - out["direct"]["median_us"], 1)
                return out
            finally:
                proc.terminate()
                proc.wait(10)
    except pytest.skip.Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=10_000)
    results: dict = {}
    parser.add_argument("--window", type=float, default=30.0, help="idle interval for the CPU reading, s")
    args = parser.parse_args()
    # Two sockets per proxied WebSocket, in this process (client, upstream) and in lapse (which inherits
    # the limit). Without CAP_SYS_RESOURCE the hard limit caps how many fit.
    limit = open_files_at_least(2 * args.idle + 500)
    if 2 * args.idle + 500 > limit:
        args.idle = (limit - 500) // 2
        print(f"RLIMIT_NOFILE is {limit} (hard): {args.idle} idle connections", file=sys.stderr)
    results["rlimit_nofile"] = limit
    results: dict = {}
    with serve(UPSTREAM) as upstream, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # idle limit: past the CPU window, counted from the last upgrade (every upgrade moves it)
        proc, port = start_lapse(folder, upstream, f"{int(args.window) + 15}s")
        try:
            cookie = sign_in(folder)
            results["ws_direct"] = summary(asyncio.run(round_trips(f"ws://{upstream}/ws", None, args.messages)))
            results["ws_through_lapse"] = summary(
                asyncio.run(round_trips(f"ws://127.0.0.1:{port}/ws", cookie, args.messages)))
            results["ws_idle"] = idle_many(folder, f"ws://127.0.0.1:{port}/ws", args.idle, proc.pid, args.window)
        finally:
            proc.terminate()
            proc.wait(10)
    results["postgres"] = postgres_latency(args.messages)
    results["cpus"] = os.cpu_count()
    results["python"] = sys.version.split()[0]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
