"""What lapse's middleware adds to a request, per framework, with the middleware on and off in one run.

    python bench/middleware.py            # ~1 min here
    python bench/middleware.py --quick    # smoke

In-process, no sockets: each app is called the way its server calls it (ASGI: ``await app(scope,
receive, send)`` on one event loop; WSGI and Django: ``app(environ, start_response)``), so the
figure is what the app process spends per request, without a load generator and a network stack
sharing the machine's two CPUs (they would add noise and a common cost that makes any ratio look
smaller). The "off" app is the same app without lapse, measured in the same run, interleaved
round by round with "on"; the median of the rounds is reported.

"on" is standalone mode on the embedded SQLite store, every request carrying a live session
cookie to an authenticated JSON endpoint: one keyed hash, one policy lookup, one store read, and a
store write once a second per session (the coalescing bound). The sync adapters judge in the
request thread, taking their turn at the store (sync.py); the hop to the loop thread, which only
the ``/_lapse`` endpoints still make, is measured alone beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import lapse  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from machine import code_hash, loadavg, machine  # noqa: E402  (bench/ is on sys.path)

TARGET = 1.15  # FastAPI: at most 15% added latency per request (issue 10)

CONFIG = """
[server]
public_url = "http://127.0.0.1:8000"
secret_file = "secret"
[store]
url = "sqlite:///lapse.db"
sweep_interval = "1h"
[audit]
sinks = ["store"]
[defaults]
idle = "30m"
absolute = "12h"
"""


def per_request(call: Callable[[], None], n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call. CPU time (this process, all its threads) is what other
    engineers' jobs on the shared machine disturb least; wall time includes their preemptions."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        call()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def compare(name: str, off: Callable[[], None], on: Callable[[], None], n: int, rounds: int) -> tuple[float, float]:
    per_request(off, n // 10)  # warm-up
    per_request(on, n // 10)
    offs, ons = [], []
    for _ in range(rounds):
        offs.append(per_request(off, n))
        ons.append(per_request(on, n))
    for i, kind in ((0, "wall"), (1, "CPU ")):
        a, b = statistics.median(x[i] for x in offs), statistics.median(x[i] for x in ons)
        print(f"{name:<10} {kind} off {a * 1e6:8.1f} us   on {b * 1e6:8.1f} us   ratio {b / a:5.2f}"
              f"   (+{(b - a) * 1e6:.1f} us)")
    return statistics.median(x[0] for x in offs), statistics.median(x[0] for x in ons)


# -------------------------------------------------------------------------- ASGI


def asgi_driver(loop: asyncio.AbstractEventLoop, app, headers: list[tuple[bytes, bytes]]) -> Callable[[], None]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "https",
             "path": "/api/data", "raw_path": b"/api/data", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def many(n: int) -> None:
        for _ in range(n):
            await app(dict(scope), receive, send)

    def one() -> None:
        loop.run_until_complete(many(1))
        assert statuses.pop() == 200

    return one


async def lifespan(app) -> tuple[asyncio.Queue, asyncio.Task]:
    inbox: asyncio.Queue = asyncio.Queue()
    started = asyncio.Event()

    async def send(message):
        if message["type"].startswith("lifespan.startup"):
            started.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    await started.wait()
    return inbox, task


LIFESPANS: list[tuple[asyncio.Queue, asyncio.Task]] = []


def fastapi_pair(folder: Path, loop: asyncio.AbstractEventLoop) -> tuple[Callable[[], None], Callable[[], None]]:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from lapse.middleware.asgi import LapseMiddleware

    def build() -> FastAPI:
        app = FastAPI()

        @app.get("/api/data")
        async def data() -> JSONResponse:
            return JSONResponse({"user": "bench"})

        return app

    plain = build()
    wrapped = LapseMiddleware(build(), config=folder / "lapse.toml")
    LIFESPANS.append(loop.run_until_complete(lifespan(plain)))
    LIFESPANS.append(loop.run_until_complete(lifespan(wrapped)))
    gate = wrapped.enforcer.rt.gate
    sid, _ = loop.run_until_complete(gate.sign_in("bench"))

    async def checks(n: int) -> None:
        for _ in range(n):
            await gate.check(host="127.0.0.1:8000", path="/api/data", ip="127.0.0.1", session_id=sid)

    started = time.perf_counter()
    loop.run_until_complete(checks(3000))
    print(f"{'':<10} Gate.check alone (core + SQLite store, enforce.py): "
          f"{(time.perf_counter() - started) / 3000 * 1e6:.1f} us")
    base = [(b"host", b"127.0.0.1:8000"), (b"accept", b"application/json")]
    cookie = [(b"cookie", f"__Host-lapse={sid}".encode())]
    return asgi_driver(loop, plain, base), asgi_driver(loop, wrapped, base + cookie)


# -------------------------------------------------------------------------- WSGI


def wsgi_driver(app, cookie: str | None) -> Callable[[], None]:
    import io

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/data", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_HOST": "127.0.0.1:8000", "HTTP_ACCEPT": "application/json", "wsgi.url_scheme": "https",
               "wsgi.version": (1, 0), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
    if cookie:
        environ["HTTP_COOKIE"] = cookie
    statuses: list[str] = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    def one() -> None:
        env = dict(environ, **{"wsgi.input": io.BytesIO(b"")})
        body = app(env, start_response)
        for _ in body:
            pass
        if hasattr(body, "close"):
            body.close()
        assert statuses.pop().startswith("200"), "request refused"

    return one


def flask_pair(folder: Path) -> tuple[Callable[[], None], Callable[[], None], dict[str, Callable[[], None]]]:
    from flask import Flask, jsonify

    from lapse.middleware.wsgi import LapseWSGI

    def build() -> Flask:
        app = Flask(__name__)
        app.get("/api/data")(lambda: jsonify(user="bench"))
        return app

    plain, wrapped = build(), build()
    lapse_wsgi = LapseWSGI(wrapped.wsgi_app, config=folder / "lapse.toml")
    wrapped.wsgi_app = lapse_wsgi  # type: ignore[method-assign]
    sid, _ = lapse_wsgi.bridge.run(lambda e: e.rt.gate.sign_in("bench"))

    async def nothing(_e) -> None:
        return None

    hops = {
        "bridge hop to the loop thread and back (the /_lapse endpoints)": lambda: lapse_wsgi.bridge.on_loop(nothing),
        "bridge in the request thread (turn lock + drive, app requests)": lambda: lapse_wsgi.bridge.run(nothing),
    }
    return wsgi_driver(plain, None), wsgi_driver(wrapped, f"__Host-lapse={sid}"), hops


def django_pair(folder: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False, SECRET_KEY="bench" * 10, ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__,
        INSTALLED_APPS=[], MIDDLEWARE=[], DATABASES={},
        LAPSE={"config": str(folder / "lapse.toml"), "mode": "standalone"},
    )
    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    from lapse.middleware.django import bridge_for

    plain = WSGIHandler()
    with override_settings(MIDDLEWARE=["lapse.middleware.django.LapseMiddleware"]):
        wrapped = WSGIHandler()
    sid, _ = bridge_for(settings.LAPSE).run(lambda e: e.rt.gate.sign_in("bench"))
    return wsgi_driver(plain, None), wsgi_driver(wrapped, f"__Host-lapse={sid}")


def _django_view(request):
    from django.http import JsonResponse

    return JsonResponse({"user": "bench"})


def _urls():
    from django.urls import path

    return [path("api/data", _django_view)]


def __getattr__(name: str):  # Django asks this module for its urlpatterns (ROOT_URLCONF) lazily
    if name == "urlpatterns":
        return _urls()
    raise AttributeError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds (smoke)")
    args = parser.parse_args()
    n, rounds = (500, 3) if args.quick else (3000, 9)
    try:
        os.sched_setaffinity(0, {0})  # the loop thread of the sync bridge shares this core, as in a real worker
    except (AttributeError, OSError):
        pass
    print(f"machine: {machine()}")
    print(f"load before: {loadavg()}; code {code_hash()}; {n} requests x {rounds} rounds per figure, median")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "lapse.toml").write_text(CONFIG)
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        off, on = fastapi_pair(folder, loop)
        fa = compare("FastAPI", off, on, n, rounds)
        off, on, hops = flask_pair(folder)
        fl = compare("Flask", off, on, n, rounds)
        for what, hop in hops.items():
            times = [per_request(hop, n) for _ in range(rounds)]
            print(f"{'':<10} {what}, no store: wall {statistics.median(t[0] for t in times) * 1e6:.1f} us, "
                  f"CPU {statistics.median(t[1] for t in times) * 1e6:.1f} us")
        off, on = django_pair(folder)
        dj = compare("Django", off, on, n, rounds)
        for inbox, task in LIFESPANS:
            inbox.put_nowait({"type": "lifespan.shutdown"})
            loop.run_until_complete(task)
    ratio = fa[1] / fa[0]
    print(f"FastAPI target: on/off <= {TARGET:.2f}: {ratio:.2f} {'PASS' if ratio <= TARGET else 'MISS'}")
    del fl, dj


if __name__ == "__main__":
    main()
