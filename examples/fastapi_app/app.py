"""A small FastAPI app with lapse inside it.

    pip install -e '.[fastapi]'
    uvicorn --factory examples.fastapi_app.app:create_app --port 8000
    # then http://127.0.0.1:8000 ; user "alice", password "wonderland"

``LAPSE_MODE=alongside`` (the default): the app has its own login form and keeps the user in
Starlette's session; lapse enforces idle and absolute limits on that sign-in and signs out through
the session. ``LAPSE_MODE=standalone``: lapse owns the cookie and the login page (users from
``lapse users add``, in the store named by the config).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import DictLoader, Environment
from markupsafe import escape
from starlette.middleware.sessions import SessionMiddleware

from lapse.middleware.asgi import LapseMiddleware
from lapse.middleware.jinja import install
from lapse.web.app import safe_next

HERE = Path(__file__).parent
USERS = {"alice": "wonderland"}  # the example's own user table (alongside mode)

PAGES = {
    "page.html": """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
{{ lapse_widget() }}</head><body><h1>{{ title }}</h1>{{ body | safe }}</body></html>""",
}


def create_app(config: str | Path | None = None, *, mode: str | None = None,
               clock: Callable[[], float] | None = None) -> FastAPI:
    mode = mode or os.environ.get("LAPSE_MODE", "alongside")
    config = config or os.environ.get("LAPSE_CONFIG") or HERE / "lapse.toml"
    pages = install(Environment(loader=DictLoader(PAGES), autoescape=True))
    app = FastAPI()

    def page(title: str, body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(pages.get_template("page.html").render(title=title, body=body), status)

    def user_of(request: Request) -> str | None:
        return request.session.get("user") if mode == "alongside" else request.scope.get("lapse.user")

    @app.get("/")
    def home(request: Request) -> HTMLResponse:
        who = user_of(request)
        return page("Home", f"<p>Signed in as {who}</p><a href='/private'>private</a>" if who else
                    "<p>Not signed in.</p><a href='/private'>private</a>")

    @app.get("/private")
    def private(request: Request) -> HTMLResponse:
        if user_of(request) is None:  # alongside: the app's own rule; standalone: lapse answered already
            return RedirectResponse("/login?next=/private", 303)
        return page("Private", f"<p>Hello {user_of(request)}.</p>"
                    "<form method=post action=/logout><button>Sign out</button></form>")

    @app.get("/api/data")
    def data(request: Request) -> JSONResponse:
        if user_of(request) is None:
            return JSONResponse({"error": "sign in"}, 401)
        return JSONResponse({"user": user_of(request)})

    @app.get("/api/poll")
    def poll(request: Request) -> JSONResponse:  # a passive path in lapse.toml: never extends the session
        return JSONResponse({"user": user_of(request), "news": []})

    if mode == "alongside":
        @app.get("/login")
        def login_form(next: str = "/", reason: str = "") -> HTMLResponse:
            why = f"<p role=status>Signed out ({reason}).</p>" if reason else ""
            return page("Sign in", why + "<form method=post><input name=username><input name=password "
                        f"type=password><input type=hidden name=next value='{_safe(next)}'><button>Sign in</button></form>")

        @app.post("/login")
        async def login(request: Request) -> HTMLResponse:
            # parse_qs rather than Form(): no python-multipart needed for one small form
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            username, password, next = form.get("username", ""), form.get("password", ""), form.get("next", "/")
            known = USERS.get(username)
            if known is None or not hmac.compare_digest(known.encode(), password.encode()):
                return page("Sign in", "<p>Wrong user name or password.</p>", 200)
            request.session.clear()  # a new Starlette session on sign-in
            request.session["user"] = username
            return RedirectResponse(_safe(next), 303)

        @app.post("/logout")
        def logout(request: Request) -> RedirectResponse:
            request.session.clear()  # lapse sees its session gone and records session.revoked (logout)
            return RedirectResponse("/", 303)

    app.add_middleware(LapseMiddleware, config=config, mode=mode, clock=clock,
                       login_url="/login" if mode == "alongside" else None,
                       public_paths=() if mode == "alongside" else ["/"])
    if mode == "alongside":
        secret = os.environ.get("SESSION_SECRET") or secrets.token_urlsafe(32)
        app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie="__Host-app",
                           https_only=True, same_site="lax")
    return app


def _safe(next_: str) -> str:
    return str(escape(safe_next(next_)))
