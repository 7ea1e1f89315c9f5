"""FastAPI with lapse's ASGI middleware off and on under a real uvicorn, loaded by wrk over loopback.

    python bench/middleware_http.py            # 3 rounds of 5 s per side, ~1 min here
    python bench/middleware_http.py --quick    # 1 round of 2 s (smoke)

The in-process figure (bench/middleware.py) leaves out what a server adds to every request
(HTTP parsing, the socket); this one includes it. uvicorn runs one worker pinned to one CPU, wrk
(``-t1 -c16``) the other; both sides get the very same requests (the same session cookie) to an
authenticated JSON endpoint, rounds interleaved off/on, median reported. The figure that matters
is the server's CPU time per request (its utime + stime over the requests served), which other
engineers' jobs on this shared machine disturb far less than req/s or latency; those are printed
beside it. Needs wrk (``apt-get install -y wrk``). Only loopback is used; every run is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load import free_port, tree_cpu_seconds  # bench/ is on sys.path
from machine import code_hash, loadavg, machine
from middleware import CONFIG, TARGET

CONNECTIONS = 16


def create():  # noqa: ANN201  (uvicorn --factory: the app for $LAPSE_BENCH_SIDE)
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/api/data")
    async def data() -> JSONResponse:
        return JSONResponse({"user": "bench"})

    if os.environ["LAPSE_BENCH_SIDE"] == "on":
        from lapse.middleware.asgi import LapseMiddleware

        app.add_middleware(LapseMiddleware, config=os.environ["LAPSE_BENCH_CONFIG"])
    return app


def session(config: Path) -> str:
    """A live session in the store both servers' lapse reads."""
    from lapse.config import load_config
    from lapse.runtime import open_runtime

    async def sign_in() -> str:
        async with open_runtime(load_config(config)) as rt:
            return (await rt.gate.sign_in("bench"))[0]

    return asyncio.run(sign_in())


def measure(side: str, config: Path, cookie: str, seconds: int) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, LAPSE_BENCH_SIDE=side, LAPSE_BENCH_CONFIG=str(config))
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "middleware_http:create", "--factory", "--app-dir", str(Path(__file__).parent),
         "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning", "--lifespan", "on"],
        env=env, preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )
    try:
        url = f"http://127.0.0.1:{port}/api/data"
        deadline = time.monotonic() + 20
        while not listening(port):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"uvicorn ({side}) did not start")
            time.sleep(0.2)
        wrk(url, cookie, 1)  # warm-up
        before = tree_cpu_seconds(server.pid)
        out = wrk(url, cookie, seconds)
        out["cpu_us"] = (tree_cpu_seconds(server.pid) - before) / out["requests"] * 1e6
        return out
    finally:
        server.terminate()
        server.wait(10)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wrk(url: str, cookie: str, seconds: int) -> dict[str, float]:
    proc = subprocess.run(
        [shutil.which("wrk") or "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--latency",
         "-H", f"Cookie: {cookie}", url],
        capture_output=True, text=True, timeout=seconds + 30, preexec_fn=lambda: os.sched_setaffinity(0, {1}),
    )
    done = re.search(r"(\d+) requests in", proc.stdout)
    if proc.returncode != 0 or not done or int(done.group(1)) == 0:
        raise RuntimeError(f"wrk failed:\n{proc.stdout}\n{proc.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", proc.stdout)
    if bad:
        raise RuntimeError(f"{bad.group(1)} refused requests:\n{proc.stdout}")
    return {"requests": int(done.group(1)), "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout).group(1)),
            "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", proc.stdout, re.M).group(1)),
            "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", proc.stdout, re.M).group(1))}


def _ms(text: str) -> float:
    unit = re.search(r"[a-z]+$", text).group(0)
    return float(text[: -len(unit)]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (smoke)")
    args = parser.parse_args()
    rounds, seconds = (1, 2) if args.quick else (3, 5)
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install -y wrk")
    import uvicorn

    print(f"machine: {machine()}; uvicorn {uvicorn.__version__}")
    print(f"load before: {loadavg()}; code {code_hash()}; wrk -t1 -c{CONNECTIONS} {seconds:g} s x {rounds} rounds, median")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lapse.toml"
        config.write_text(CONFIG)
        cookie = f"__Host-lapse={session(config)}"
        runs: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for _ in range(rounds):
            for side in runs:
                runs[side].append(measure(side, config, cookie, seconds))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    for side, m in med.items():
        print(f"FastAPI {side:<3}  server CPU {m['cpu_us']:6.1f} us/request   {m['rps']:8.0f} req/s   "
              f"p50 {m['p50_ms']:.2f} ms   p99 {m['p99_ms']:.2f} ms")
    ratio = med["on"]["cpu_us"] / med["off"]["cpu_us"]
    print(f"server CPU per request on/off: {ratio:.2f} (+{med['on']['cpu_us'] - med['off']['cpu_us']:.1f} us); "
          f"target <= {TARGET:.2f}: {'PASS' if ratio <= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
