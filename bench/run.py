"""lapse performance benchmark: one command, one core, one table.

    python bench/run.py            # full run (1k, 100k, 1M sessions; ~1.5 min here, budget 5 min)
    python bench/run.py --quick    # smoke run (1k and 100k only, fewer reps; <30 s)

What is measured (see bench/README.md for the why):

  baseline  a trivial Python function call doing one dict lookup: the floor of
            any per-request Python work, measured in this run, on this core.
  (1)       ``decide()`` alone: a precomputed ``Effective`` (billing app, office
            network: idle, absolute, allow rules) and 1,000 live sessions; each
            call picks a random session and the clock advances 2 ms per call, so
            some calls coalesce (no write) and some produce a new record.
  (2)       ``Policy.resolve()`` + ``decide()``: a policy shaped like
            examples/lapse.toml plus a wildcard-host app (4 apps, path globs,
            passive paths, privileged routes, 2 networks with IPv4+IPv6 CIDRs,
            org ceiling) and a rotating mix of hosts/paths/methods/IPs.
  (3)       ``Gate.check`` read-decide-write (keyed hash, resolve, store read,
            decide, store write, audit with no sinks) on MemoryStore and
            SqliteStore with 1k / 100k / 1M live sessions, uniform random picks.

Every rate is the median of several repetitions timed with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import ipaddress
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

try:
    import lapse  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from machine import code_hash, loadavg, machine  # noqa: E402  (bench/ is on sys.path)

from lapse.audit import AuditLog
from lapse.core.decide import Request, decide, expires_at, sign_in
from lapse.core.policy import AppSpec, Layer, NetworkSpec, PolicySpec, PrivilegedSpec, compile_policy
from lapse.core.session import SIGN_IN, Session, session_key
from lapse.enforce import Gate
from lapse.store.memory import MemoryStore

T0 = 1_700_000_000.0
HASH_KEY = b"lapse-bench-fixed-hash-key-32byt"
SEED = 20240611

TARGETS = {
    "decide": 200_000,
    "resolve": 100_000,
    "sqlite": 20_000,
    "flat": 1.2,
}


# ----------------------------------------------------------------------- policy


def bench_policy_spec() -> PolicySpec:
    """examples/lapse.toml, by hand (no config parsing in the way), plus a wildcard-host app."""
    return PolicySpec(
        defaults=Layer(
            settings={"warn_before": 120.0},
            preset="nist-63b4-aal2",
            passive_paths=("/healthz", "/metrics"),
            on_ip_change="allow",
        ),
        apps=(
            AppSpec(
                name="billing",
                hosts=("billing.example.test",),
                layer=Layer(settings={"idle": 600.0}, preset="pci-dss-4", passive_paths=("/api/notifications*",)),
                privileged=(
                    PrivilegedSpec(("/billing/admin/*",), max_auth_age=300.0, mfa=True,
                                   methods=frozenset({"POST", "DELETE"})),
                ),
                allow=("group:finance",),
            ),
            AppSpec(
                name="wiki",
                hosts=("wiki.example.test",),
                layer=Layer(settings={"idle": 3600.0, "absolute": 43200.0}),
            ),
            AppSpec(
                name="admin",
                hosts=("admin.example.test",),
                layer=Layer(preset="disa-stig-admin", on_ip_change="step_up"),
                privileged=(PrivilegedSpec(("/admin/users/*",), max_auth_age=600.0, mfa=True),),
            ),
            AppSpec(
                name="tools",
                hosts=("tools.example.test", "*.tools.example.test"),
                paths=("/app/*", "/api/*"),
                layer=Layer(preset="owasp-high-value", passive_paths=("/api/poll*",)),
            ),
        ),
        networks=(
            NetworkSpec("office", (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00:10::/32")),
                        idle_factor=2.0),
            NetworkSpec("elsewhere", (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
                        idle_factor=0.5),
        ),
        max_idle=3600.0,
        max_absolute=86400.0,
    )


# (host, path, method, passive_header): the rotating request mix of (2)
TEMPLATES: tuple[tuple[str, str, str, bool], ...] = (
    ("billing.example.test", "/billing/invoices", "GET", False),
    ("billing.example.test", "/billing/invoices/2024-0042", "GET", False),
    ("billing.example.test", "/billing/admin/refund/881", "POST", False),  # privileged
    ("billing.example.test", "/billing/admin/refund/881", "GET", False),  # privileged path, not method
    ("billing.example.test", "/api/notifications/unread", "GET", False),  # passive (app glob)
    ("billing.example.test", "/healthz", "GET", False),  # passive (defaults glob)
    ("wiki.example.test", "/wiki/Main_Page", "GET", False),
    ("wiki.example.test", "/wiki/Security/Session_Policy", "GET", False),
    ("Wiki.Example.TEST:443", "/wiki/Onboarding", "GET", False),
    ("wiki.example.test", "/wiki/Main_Page", "GET", True),  # passive (X-Lapse-Activity)
    ("wiki.example.test", "/metrics", "GET", False),  # passive (defaults glob)
    ("admin.example.test", "/admin/users", "GET", False),
    ("admin.example.test", "/admin/users/42", "POST", False),  # privileged
    ("admin.example.test", "/_lapse/session", "GET", False),  # passive (lapse status)
    ("tools.example.test", "/app/pipelines", "GET", False),
    ("ci.tools.example.test", "/app/pipelines/1234/logs", "GET", False),  # wildcard host
    ("grafana.tools.example.test", "/api/poll/status", "GET", False),  # wildcard + passive
    ("grafana.tools.example.test", "/api/dashboards/7", "PUT", False),
    ("docs.tools.example.test", "/static/logo.svg", "GET", False),  # wildcard host, path outside the app
    ("intranet.example.test", "/", "GET", False),  # no app: defaults
)


def client_ip(i: int, rng: random.Random) -> str:
    """A client address: office and elsewhere, IPv4 and IPv6."""
    r = rng.random()
    if r < 0.40:
        return f"10.{i % 250}.{(i // 250) % 250}.{1 + i % 200}"
    if r < 0.50:
        return f"fd00:10::{i:x}"
    if r < 0.85:
        return f"203.0.{i % 250}.{1 + (i // 250) % 250}"
    return f"2001:db8:{i % 65536:x}::{1 + i % 4000:x}"


# ------------------------------------------------------------------- helpers


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {0})
            return "pinned to CPU 0"
        except OSError as exc:
            return f"not pinned ({exc})"
    return "not pinned (no sched_setaffinity)"


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_rate(samples: list[tuple[int, float]]) -> float:
    return statistics.median(n / dt for n, dt in samples)


def fmt_rate(rate: float, base: float) -> str:
    return f"{rate:>12,.0f}/s ({rate / base:.2f} of baseline)"


class Clock:
    """The store's clock: simulated, advanced by the benchmark."""

    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def session_id(i: int) -> str:
    """Deterministic 43-character IDs (the length of a real token_urlsafe(32))."""
    return f"bench-session-{i:012d}-0123456789abcdefghi"


# ------------------------------------------------------------ baseline, (1), (2)

_TABLE = {i: i * 7 for i in range(1000)}


def _lookup(key: int) -> int:
    return _TABLE[key]


def bench_baseline(n: int, reps: int) -> float:
    rng = random.Random(SEED)
    picks = [rng.randrange(1000) for _ in range(n)]
    f = _lookup
    samples = []
    for _ in range(reps + 1):
        gc.collect()
        t = time.perf_counter()
        for j in picks:
            f(j)
        samples.append((n, time.perf_counter() - t))
    return median_rate(samples[1:])  # first is warm-up


def make_live_sessions(policy, count: int, now: float, rng: random.Random, *, host: str, path: str,
                       ips: list[str] | None) -> list[Session]:
    out = []
    for i in range(count):
        ip = ips[i] if ips else "10.1.2.3"
        limits = policy.resolve(host, path, "GET", ip).limits
        groups = ("finance", "staff") if rng.random() < 0.8 else ("staff",)
        d = sign_in(session_key(HASH_KEY, session_id(i)), f"user{i}", now - rng.uniform(0, 60), limits,
                    ip=ip, mfa=rng.random() < 0.9, groups=groups)
        out.append(d.session)
    return out


def bench_decide(policy, n: int, reps: int, step: float) -> tuple[float, float, float]:
    """(rate, write fraction, allowed fraction) for decide() on one precomputed Effective."""
    rng = random.Random(SEED)
    effective = policy.resolve("billing.example.test", "/billing/invoices", "GET", "10.1.2.3")
    assert effective.active and effective.step_up is None
    picks = [rng.randrange(1000) for _ in range(n)]
    samples, writes, allowed = [], 0, 0
    for rep in range(reps + 1):
        sessions = make_live_sessions(policy, 1000, T0, random.Random(SEED), host="billing.example.test",
                                      path="/billing/invoices", ips=None)
        sessions = [s.with_(groups=("finance", "staff")) for s in sessions]  # all allowed: time that path
        requests = [Request("GET", "/billing/invoices", s.ip, s.key) for s in sessions]
        now, w, a = T0, 0, 0
        gc.collect()
        t = time.perf_counter()
        for j in picks:
            d = decide(sessions[j], requests[j], effective, now)
            if d.changed:
                sessions[j] = d.session
                w += 1
            a += d.allowed
            now += step
        dt = time.perf_counter() - t
        if rep:
            samples.append((n, dt))
            writes, allowed = writes + w, allowed + a
    return median_rate(samples), writes / (n * reps), allowed / (n * reps)


def bench_resolve_decide(policy_spec: PolicySpec, n: int, reps: int, step: float) -> tuple[float, float, float]:
    """(rate, write fraction, allowed fraction) for resolve() + decide() over a rotating request mix."""
    rng = random.Random(SEED)
    ips = [client_ip(i, rng) for i in range(1000)]
    plan_rng = random.Random(SEED + 1)
    picks = []
    for _ in range(n):
        j = plan_rng.randrange(1000)
        host, path, method, passive = TEMPLATES[plan_rng.randrange(len(TEMPLATES))]
        picks.append((j, host, path, method, ips[j], passive, Request(method, path, ips[j], None)))
    samples, writes, allowed = [], 0, 0
    for rep in range(reps + 1):
        policy = compile_policy(policy_spec)  # fresh: its host/IP caches start cold every repetition
        sessions = make_live_sessions(policy, 1000, T0, random.Random(SEED), host="wiki.example.test",
                                      path="/wiki/Main_Page", ips=ips)
        resolve = policy.resolve
        now, w, a = T0, 0, 0
        gc.collect()
        t = time.perf_counter()
        for j, host, path, method, ip, passive, request in picks:
            d = decide(sessions[j], request, resolve(host, path, method, ip, passive), now)
            if d.changed:
                sessions[j] = d.session
                w += 1
            a += d.allowed
            now += step
        dt = time.perf_counter() - t
        if rep:
            samples.append((n, dt))
            writes, allowed = writes + w, allowed + a
    return median_rate(samples), writes / (n * reps), allowed / (n * reps)


# ---------------------------------------------------------------------- (3)

GATE_HOST, GATE_PATH, GATE_IP = "wiki.example.test", "/wiki/Main_Page", "10.1.2.3"


def build_population(policy, count: int, now: float) -> list[Session]:
    """``count`` live sessions signed in during the last 10 minutes (one template from ``sign_in``)."""
    limits = policy.resolve(GATE_HOST, GATE_PATH, "GET", GATE_IP).limits
    gi, ga = limits.generous_idle, limits.generous_absolute
    users = [f"user{u}@example.test" for u in range(min(count, 50_000))]
    groups = ("staff",)
    nu = len(users)
    out = []
    for i in range(count):
        auth = now - (i % 600) - 0.5
        out.append(Session(
            key=session_key(HASH_KEY, session_id(i)),
            user=users[i % nu],
            auth_time=auth,
            created_at=auth,
            activity=((SIGN_IN, auth),),
            last_seen_at=auth,
            expires_at=expires_at(auth, auth, gi, ga),
            ip=GATE_IP,
            mfa=False,
            groups=groups,
        ))
    return out


async def load_store(store, sessions: list[Session], *, transaction: bool) -> float:
    t = time.perf_counter()
    create = store.create
    if transaction:
        store.db.execute("BEGIN")
    for s in sessions:
        await create(s)
    if transaction:
        store.db.execute("COMMIT")
    return time.perf_counter() - t


async def bench_gate(gate: Gate, clock: Clock, count: int, n: int, reps: int, step: float
                     ) -> tuple[float, float, float]:
    """(rate, write fraction, allowed fraction) for Gate.check with uniform random session picks."""
    rng = random.Random(SEED + count)
    check = gate.check
    samples, writes, allowed = [], 0, 0
    for rep in range(reps + 1):
        ids = [session_id(rng.randrange(count)) for _ in range(n)]
        w = a = 0
        gc.collect()
        t = time.perf_counter()
        for sid in ids:
            clock.t += step
            v = await check(host=GATE_HOST, path=GATE_PATH, method="GET", ip=GATE_IP, session_id=sid)
            d = v.decision
            w += d.changed
            a += d.allowed
        dt = time.perf_counter() - t
        if rep:
            samples.append((n, dt))
            writes, allowed = writes + w, allowed + a
    return median_rate(samples), writes / (n * reps), allowed / (n * reps)


async def memory_bytes_per_session(policy, sample: int = 20_000) -> float:
    """tracemalloc: what ``sample`` sessions cost inside a MemoryStore (records, keys, dict slots)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = MemoryStore(Clock(T0))
    sessions = build_population(policy, sample, T0)
    for s in sessions:
        await store.create(s)
    del sessions
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del store
    return used / sample


async def bench_stores(policy, populations: list[int], n: int, reps: int, step: float, tmp: Path,
                       log: Callable[[str], None]) -> dict:
    results: dict = {"memory": {}, "sqlite": {}, "load": {}, "sqlite_bytes": {}, "sqlite_bytes_after": {},
                     "memory_rss": {}}
    from lapse.store.sqlite import SqliteStore

    log("  memory per session (tracemalloc, 20k sample) ...")
    results["memory_tracemalloc"] = await memory_bytes_per_session(policy)
    audit = AuditLog([])
    for count in populations:
        gc.collect()
        rss0 = rss_bytes()
        gc.disable()  # building millions of objects: collections here only cost time (re-enabled to measure)
        t = time.perf_counter()
        sessions = build_population(policy, count, T0)
        build_s = time.perf_counter() - t

        # -- memory
        clock = Clock(T0)
        mem = MemoryStore(clock)
        mem_load = await load_store(mem, sessions, transaction=False)
        gc.enable()
        gc.collect()
        results["memory_rss"][count] = (rss_bytes() - rss0) / count
        gate = Gate(mem, policy, audit, HASH_KEY)
        rate, wf, af = await bench_gate(gate, clock, count, n, reps, step)
        results["memory"][count] = (rate, wf, af)
        log(f"  memory  {count:>9,} sessions: built in {build_s:5.1f} s, loaded in {mem_load:5.1f} s; "
            f"{rate:,.0f}/s, {wf:.1%} wrote, {af:.1%} allowed")
        del gate, mem

        # -- sqlite
        clock = Clock(T0)
        path = tmp / f"bench-{count}.db"
        sq = SqliteStore(path, clock)
        # Loading only: one transaction and a big page cache (random-key inserts into three
        # b-trees thrash the default 2 MB cache). Both are undone before anything is timed.
        cache_size = sq.db.execute("PRAGMA cache_size").fetchone()[0]
        sq.db.execute("PRAGMA cache_size = -1000000")
        gc.disable()
        sq_load = await load_store(sq, sessions, transaction=True)
        gc.enable()
        del sessions
        gc.collect()
        t = time.perf_counter()
        sq.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        ckpt = time.perf_counter() - t
        sq.db.execute(f"PRAGMA cache_size = {cache_size}")  # the store's own setting while measuring
        sq.db.execute("PRAGMA shrink_memory")
        results["sqlite_bytes"][count] = db_bytes(path) / count
        results["load"][count] = (build_s, mem_load, sq_load + ckpt)
        gate = Gate(sq, policy, audit, HASH_KEY)
        rate, wf, af = await bench_gate(gate, clock, count, n, reps, step)
        results["sqlite"][count] = (rate, wf, af)
        sq.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        results["sqlite_bytes_after"][count] = db_bytes(path) / count
        log(f"  sqlite  {count:>9,} sessions: loaded in {sq_load:5.1f} s (+ checkpoint {ckpt:.1f} s); "
            f"{rate:,.0f}/s, {wf:.1%} wrote, {af:.1%} allowed")
        await sq.close()
        del gate, sq
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return results


def db_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(str(path) + "-wal")) if p.exists())


# ----------------------------------------------------------------------- main


def row(label: str, rate: float, base: float, wrote: float | None = None, allowed: float | None = None) -> str:
    extra = "" if wrote is None else f"  {wrote:>6.1%}  {allowed:>7.1%}"
    return f"{label:<42}{fmt_rate(rate, base):>36}  {1e6 / rate:>8.2f}{extra}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 100k sessions only, fewer repetitions (<30 s)")
    args = ap.parse_args()
    quick = args.quick

    pinned = pin_one_core()
    started = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"lapse bench ({'quick' if quick else 'full'}) — {datetime.datetime.now().isoformat(timespec='seconds')}")
    log(f"machine: {machine()}; {pinned}; load average {loadavg()}")
    log(f"code: src/lapse sha256 {code_hash()}")

    reps = 3 if quick else 9
    n_core = 100_000  # per repetition; 2 ms per call: the same 200 simulated seconds in both modes
    core_step = 0.002  # over 1,000 sessions a session comes back every ~2 s on average: some calls coalesce
    populations = [1_000, 100_000] if quick else [1_000, 100_000, 1_000_000]
    store_reps = 3 if quick else 5
    n_store = 5_000 if quick else 20_000
    store_step = 0.010  # 10 ms per request: even at 1k sessions ~90% of decisions write

    spec = bench_policy_spec()
    policy = compile_policy(spec)

    log(f"\nmeasuring baseline, (1) decide(), (2) resolve()+decide(): {reps} x {n_core:,} calls each ...")
    base = bench_baseline(n_core, reps)
    dec, dec_w, dec_a = bench_decide(policy, n_core, reps, core_step)
    res, res_w, res_a = bench_resolve_decide(spec, n_core, reps, core_step)

    log(f"measuring (3) Gate.check read-decide-write: {store_reps} x {n_store:,} requests per store and population ...")
    with tempfile.TemporaryDirectory(prefix="lapse-bench-") as tmp:
        stores = asyncio.run(bench_stores(policy, populations, n_store, store_reps, store_step, Path(tmp), log))

    big = populations[-1]
    mem_base = stores["memory"][1_000][0]
    W = 104
    lines = [
        "",
        "=" * W,
        f"{'benchmark':<42}{'decisions/s (x of baseline)':>36}  {'us/op':>8}  {'wrote':>6}  {'allowed':>7}",
        "-" * W,
        row("baseline: dict-lookup function call", base, base),
        row("(1) decide(), 1k live sessions", dec, base, dec_w, dec_a),
        row("(2) resolve() + decide(), mixed requests", res, base, res_w, res_a),
        f"    (cost relative to the floor: decide() = {base / dec:,.0f} dict-lookup calls, "
        f"resolve()+decide() = {base / res:,.0f})",
        "-" * W,
        "(3) Gate.check read-decide-write; baseline = memory store @ 1k",
    ]
    for kind in ("memory", "sqlite"):
        for count in populations:
            rate, wf, af = stores[kind][count]
            lines.append(row(f"    {kind} store, {count:>9,} sessions", rate, mem_base, wf, af))
    for kind in ("memory", "sqlite"):
        r = stores[kind][1_000][0] / stores[kind][big][0]
        lines.append(f"    {kind}: cost per decision at {big:,} / at 1,000 = {r:.2f}x")
    lines += [
        "-" * W,
        "storage per live session:",
        f"    memory store: {stores['memory_tracemalloc']:,.0f} B (tracemalloc, 20k sample); "
        + ", ".join(f"{stores['memory_rss'][c]:,.0f} B @ {c:,} (RSS delta)" for c in populations if c >= 100_000),
        "    sqlite file : " + "; ".join(
            f"{stores['sqlite_bytes'][c]:,.0f} B @ {c:,} after load, {stores['sqlite_bytes_after'][c]:,.0f} B after run"
            for c in populations),
        "load time (not counted): " + "; ".join(
            f"{c:,}: build {b:.1f} s, memory {m:.1f} s, sqlite {s:.1f} s" for c, (b, m, s) in stores["load"].items()),
        "-" * W,
        "targets:",
    ]
    sq_min_count = min(populations, key=lambda c: stores["sqlite"][c][0])
    sq_min = stores["sqlite"][sq_min_count][0]
    flat = stores["sqlite"][1_000][0] / stores["sqlite"][big][0]
    flat_mem = stores["memory"][1_000][0] / stores["memory"][big][0]
    checks = [
        (f"decide() >= {TARGETS['decide']:,}/s", f"{dec:,.0f}/s", dec >= TARGETS["decide"]),
        (f"resolve()+decide() >= {TARGETS['resolve']:,}/s", f"{res:,.0f}/s", res >= TARGETS["resolve"]),
        (f"sqlite read-decide-write >= {TARGETS['sqlite']:,}/s (every population)",
         f"min {sq_min:,.0f}/s @ {sq_min_count:,}", sq_min >= TARGETS["sqlite"]),
        (f"sqlite cost flat: {big:,} within {TARGETS['flat']}x of 1k", f"{flat:.2f}x", flat <= TARGETS["flat"]),
        (f"memory cost flat: {big:,} within {TARGETS['flat']}x of 1k", f"{flat_mem:.2f}x", flat_mem <= TARGETS["flat"]),
    ]
    for name, got, ok in checks:
        lines.append(f"    {'PASS' if ok else 'MISS'}  {name:<60} {got}")
    if quick:
        lines.append("    (quick run: the flatness targets compare 100k with 1k; the real target is 1M)")
    lines += ["=" * W, f"total wall time {time.perf_counter() - started:.0f} s; load average {loadavg()}"]
    log("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
