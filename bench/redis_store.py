"""lapse on Redis (issue 5): decisions/s with one and two replicas beside SQLite, round trips, bytes per session.

    python bench/redis_store.py            # full: 1M sessions for the memory figure (~2 min here)
    python bench/redis_store.py --quick    # smoke: 100k sessions, shorter runs (<30 s)

One run, one command, its own ``redis-server`` (free port, no persistence):

  sqlite    ``Gate.check`` on ``SqliteStore`` in one process: the single-node baseline.
  redis x1  the same loop on ``RedisStore`` in one replica process.
  redis x2  two replica processes at once on the same Redis (each its own event loop and pool).

Every replica runs ``CONCURRENCY`` request tasks in one event loop (a gateway serves many requests
at once; Redis round trips overlap, SQLite calls do not need to), for ``SECONDS`` of wall time,
over ``HOT`` signed-in sessions picked uniformly at random, with real clocks (Redis's ``TIME``,
the host's for SQLite), so the core's coalescing (at most one write per session per second under
a 30 min idle limit) works as in production: the steady state.

Round trips per decision are counted by Redis: ``INFO commandstats`` after ``CONFIG RESETSTAT``,
every command except INFO and those the store's scripts run inside (on the request path each round
trip is one EVALSHA). Bytes per session: ``INFO memory`` ``used_memory`` before and after loading
the sessions through the adapter's own create (record, due index, user index, TTL), divided by
the count, after dropping the write markers the load left (each sign-in leaves one for 60 s, so
that a create resent after a lost reply knows it already ran: at steady state only the last
minute's sign-ins have one, while a load of a million in a minute would count them all).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import lapse  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from machine import code_hash, loadavg, machine  # noqa: E402

from lapse.audit import AuditLog  # noqa: E402
from lapse.core.decide import expires_at  # noqa: E402
from lapse.core.policy import Layer, PolicySpec, compile_policy  # noqa: E402
from lapse.core.session import SIGN_IN, Session, session_key  # noqa: E402
from lapse.enforce import Gate  # noqa: E402
from lapse.store.redis import RedisStore  # noqa: E402
from lapse.store.sqlite import SqliteStore  # noqa: E402

HASH_KEY = b"lapse-bench-fixed-hash-key-32byt"
HOST, PATH, IP = "wiki.example.test", "/wiki/Main_Page", "10.1.2.3"
HOT = 1_000
CONCURRENCY = 32
SCRIPTED = {"time", "get", "set", "exists", "zadd", "zrem", "pexpire", "persist", "hmget", "hset", "xrange", "xdel"}
TARGETS = {"round_trips": 1.05, "ratio": 0.6, "bytes": 512}


def policy():
    return compile_policy(PolicySpec(defaults=Layer(settings={"idle": 1800.0, "absolute": 12 * 3600.0})))


def sid(i: int) -> str:
    return f"bench-session-{i:08d}"


def population(count: int, now: float, start: int = 0) -> list[Session]:
    limits = policy().resolve(HOST, PATH, "GET", IP).limits
    out = []
    for i in range(start, start + count):
        auth = now - (i % 600) - 0.5
        out.append(Session(
            key=session_key(HASH_KEY, sid(i)), user=f"user{i % 50_000}@example.test", auth_time=auth,
            created_at=auth, activity=((SIGN_IN, auth),), last_seen_at=auth,
            expires_at=expires_at(auth, auth, limits.generous_idle, limits.generous_absolute),
            ip=IP, groups=("staff",),
        ))
    return out


# ------------------------------------------------------------------ a replica


async def _drive(store, seconds: float, start_at: float) -> tuple[int, int, float, float]:
    """(decisions, writes, elapsed, CPU seconds) of CONCURRENCY tasks calling Gate.check until the time is up.

    CPU time is this process's (user + system) over the same span: per decision it is what a replica
    pays, and unlike the rate it barely moves when other work shares the machine.
    """
    gate = Gate(store, policy(), AuditLog([]), HASH_KEY)
    ids = [sid(i) for i in range(HOT)]
    counts = [0, 0]

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        check, pick = gate.check, rng.choice
        while time.time() < stop:
            v = await check(host=HOST, path=PATH, method="GET", ip=IP, session_id=pick(ids))
            counts[0] += 1
            counts[1] += v.decision.changed
            if not v.decision.allowed:
                raise RuntimeError(f"refused: {v.decision.reason}")

    await asyncio.sleep(max(0.0, start_at - time.time()))
    began, cpu = time.time(), time.process_time()
    stop = began + seconds
    await asyncio.gather(*(worker(os.getpid() * 100 + n) for n in range(CONCURRENCY)))
    return counts[0], counts[1], time.time() - began, time.process_time() - cpu


def replica(kind: str, target: str, seconds: float, start_at: float, out: mp.Queue) -> None:
    async def main() -> tuple[int, int, float, float]:
        store = RedisStore(target) if kind == "redis" else SqliteStore(target)
        try:
            return await _drive(store, seconds, start_at)
        finally:
            await store.close()

    try:
        import uvloop

        out.put(uvloop.run(main()))
    except ImportError:
        out.put(asyncio.run(main()))


def run_replicas(kind: str, target: str, n: int, seconds: float) -> list[tuple[int, int, float, float]]:
    ctx = mp.get_context("spawn")  # a fresh interpreter each, like `lapse serve` processes
    out: mp.Queue = ctx.Queue()
    start_at = time.time() + 2.0  # time to import; then all start together
    procs = [ctx.Process(target=replica, args=(kind, target, seconds, start_at, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return results


# ------------------------------------------------------------------ redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                self.command("PING")
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?timeout=2"

    def command(self, *args: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            data = b""
            while True:
                chunk = sock.recv(1 << 16)
                data += chunk
                head, sep, body = data.partition(b"\r\n")
                if not chunk or (sep and not head.startswith(b"$")) or (sep and len(body) >= int(head[1:]) + 2):
                    return data.decode()

    def info(self, section: str) -> dict[str, str]:
        return dict(line.split(":", 1) for line in self.command("INFO", section).splitlines() if ":" in line)

    def round_trips(self) -> int:
        total = 0
        for name, stats in self.info("commandstats").items():
            name = name.removeprefix("cmdstat_")
            if name in SCRIPTED or name == "info":
                continue
            fields = dict(kv.split("=") for kv in stats.split(","))
            total += int(fields["calls"]) + int(fields.get("rejected_calls", 0))
        return total

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def load(url: str, sessions: list[Session]) -> None:
    """The adapter's own create (script, arguments, user index), pipelined 1,000 at a time to load fast."""
    from lapse.store import redis_scripts as lua

    store = RedisStore(url)
    try:
        await store._r.script_load(lua.CREATE)
        sha = store._sha[lua.CREATE]
        for at in range(0, len(sessions), 1000):
            pipe = store._r.pipeline(transaction=False)
            for s in sessions[at : at + 1000]:
                index, member, keys, args = store.create_parts(s)
                pipe.execute_command("ZADD", index, s.created_at, member)
                pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
            await pipe.execute()
    finally:
        await store.close()


async def expire_markers(url: str) -> int:
    """Drop the write markers the load left (one per sign-in, 60 s TTL: ``redis_scripts``), as a minute would:
    at a million live sessions signed in over hours, only the last minute's sign-ins still have one."""
    store = RedisStore(url)
    try:
        gone = 0
        async for batch in _chunks(store._r.scan_iter(match=store._prefix + b"{*}w*", count=10_000), 1000):
            gone += await store._r.unlink(*batch)
        return gone
    finally:
        await store.close()


async def _chunks(keys, size: int):  # noqa: ANN001, ANN202 - an async iterator of keys, in lists of ``size``
    batch = []
    async for key in keys:
        batch.append(key)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k sessions for the memory figure, shorter runs")
    args = ap.parse_args()
    seconds = 3.0 if args.quick else 8.0
    big = 100_000 if args.quick else 1_000_000
    started = time.perf_counter()
    print(f"lapse bench redis ({'quick' if args.quick else 'full'}) — {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}; load average {loadavg()}")
    print(f"code: src/lapse sha256 {code_hash()}; redis-server {_redis_version()}")
    print(f"each replica: {CONCURRENCY} concurrent Gate.check tasks for {seconds:.0f} s over {HOT:,} live sessions, "
          "uniform picks, real clocks (steady state: coalesced writes)", flush=True)
    now = time.time()
    hot = population(HOT, now)
    rows: list[tuple[str, float, float, float | None, float]] = []
    with tempfile.TemporaryDirectory(prefix="lapse-bench-redis-") as tmp:
        db = Path(tmp) / "bench.db"
        sqlite = SqliteStore(db)
        asyncio.run(_create_all(sqlite, hot))
        asyncio.run(sqlite.close())
        [(n, w, dt, cpu)] = run_replicas("sqlite", str(db), 1, seconds)
        base = n / dt
        rows.append(("sqlite, 1 node", base, w / n, None, cpu / n))

        server = Server(Path(tmp))
        try:
            asyncio.run(load(server.url, hot))
            for replicas in (1, 2):
                server.command("CONFIG", "RESETSTAT")
                results = run_replicas("redis", server.url, replicas, seconds)
                trips = server.round_trips()
                decisions = sum(r[0] for r in results)
                for i, (n, w, dt, cpu) in enumerate(results):
                    rows.append((f"redis, {replicas} replica{'s' if replicas > 1 else ''}: #{i + 1}", n / dt, w / n,
                                 trips / decisions, cpu / n))
            server.command("FLUSHALL")
            time.sleep(0.5)
            before = int(server.info("memory")["used_memory"])
            t = time.perf_counter()
            for at in range(0, big, 100_000):
                asyncio.run(load(server.url, population(min(100_000, big - at), now, start=at)))
            loaded = time.perf_counter() - t
            markers = asyncio.run(expire_markers(server.url))
            after = int(server.info("memory")["used_memory"])
            per_session = (after - before) / big
        finally:
            server.stop()

    print("=" * 107)
    print(f"{'Gate.check':<32}{'decisions/s':>14}{'x sqlite':>10}{'wrote':>9}{'round trips/decision':>24}"
          f"{'CPU us/decision':>18}")
    print("-" * 107)
    for name, rate, wrote, trips, cpu in rows:
        print(f"{name:<32}{rate:>14,.0f}{rate / base:>10.2f}{wrote:>9.1%}{'' if trips is None else f'{trips:.3f}':>24}"
              f"{cpu * 1e6:>18.1f}")
    two = [r for r in rows if r[0].startswith("redis, 2")]
    print(f"{'redis, 2 replicas: together':<32}{sum(r[1] for r in two):>14,.0f}{sum(r[1] for r in two) / base:>10.2f}")
    print("-" * 107)
    print(f"Redis memory per live session at {big:,}: {per_session:,.0f} B (INFO memory used_memory delta; "
          f"loaded in {loaded:.0f} s; {markers:,} one-minute write markers of the load dropped first)")
    worst_trips = max(r[3] for r in rows if r[3] is not None)
    worst_ratio = min(r[1] / base for r in rows if r[3] is not None)
    print("targets:")
    for name, got, ok in [
        (f"round trips per decision <= {TARGETS['round_trips']}", f"{worst_trips:.3f}", worst_trips <= TARGETS["round_trips"]),
        (f"per replica >= {TARGETS['ratio']}x the SQLite rate", f"{worst_ratio:.2f}x", worst_ratio >= TARGETS["ratio"]),
        (f"<= {TARGETS['bytes']} B of Redis memory per session", f"{per_session:,.0f} B", per_session <= TARGETS["bytes"]),
    ]:
        print(f"    {'PASS' if ok else 'MISS'}  {name:<50} {got}")
    print("=" * 107)
    print(f"total wall time {time.perf_counter() - started:.0f} s; load average {loadavg()}")
    return 0


async def _create_all(store, sessions: list[Session]) -> None:
    for s in sessions:
        await store.create(s)


def _redis_version() -> str:
    out = subprocess.run([shutil.which("redis-server") or "/usr/bin/redis-server", "--version"],
                         capture_output=True, text=True).stdout
    return out.split("v=", 1)[1].split()[0] if "v=" in out else "?"


if __name__ == "__main__":
    sys.exit(main())
