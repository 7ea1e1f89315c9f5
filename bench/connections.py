"""Connections (issue 9): what lapse's per-connection monitor costs, in one run.

- WebSocket echo round trips, one client, sequential: direct to the upstream vs through lapse in
  proxy mode (every client message is an active ``Gate.check``);
- N idle WebSockets held open through lapse: memory per connection (the lapse process's RSS
  growth; lapse runs in a child process) and whether every one is cut at its deadline;
- PostgreSQL ``select 1`` round trips, direct vs through the ``[[postgres]]`` gateway (needs
  Debian's postgresql; skipped without it).

Usage: .venv/bin/python bench/connections.py [--messages 2000] [--idle 1000]
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

from tests.connections.harness import UPSTREAM, serve  # noqa: E402
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


async def idle_many(url: str, cookie: str, n: int, pid: int) -> dict:
    before = rss_kib(pid)
    conns = []
    for i in range(0, n, 100):
        conns += await asyncio.gather(*(connect(url, additional_headers={"Cookie": cookie}, compression=None,
                                                ping_interval=None) for _ in range(min(100, n - i))))
    opened = time.monotonic()
    held = rss_kib(pid)
    closed = await asyncio.gather(*(c.wait_closed() for c in conns))
    del closed
    cut_after = time.monotonic() - opened
    codes = {c.close_code for c in conns}
    return {"connections": n, "rss_before_kib": before, "rss_held_kib": held,
            "kib_per_connection": round((held - before) / n, 1), "all_cut_within_s": round(cut_after, 2),
            "close_codes": sorted(c for c in codes if c is not None)}


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
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    results: dict = {}
    with serve(UPSTREAM) as upstream, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        proc, port = start_lapse(folder, upstream, "5s")
        try:
            cookie = sign_in(folder)
            results["ws_direct"] = summary(asyncio.run(round_trips(f"ws://{upstream}/ws", None, args.messages)))
            results["ws_through_lapse"] = summary(
                asyncio.run(round_trips(f"ws://127.0.0.1:{port}/ws", cookie, args.messages)))
            # a fresh session, idle 5 s: every connection must be cut at its deadline
            results["ws_idle"] = asyncio.run(idle_many(f"ws://127.0.0.1:{port}/ws", sign_in(folder), args.idle,
                                                       proc.pid))
        finally:
            proc.terminate()
            proc.wait(10)
    results["postgres"] = postgres_latency(args.messages)
    results["cpus"] = os.cpu_count()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
