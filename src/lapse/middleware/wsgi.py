"""WSGI middleware (Flask, or any WSGI app) in standalone mode: lapse owns the cookie and the login.

    app.wsgi_app = LapseWSGI(app.wsgi_app, config="lapse.toml", public_paths=["/", "/static/*"])

Alongside Flask-Login, use ``lapse.middleware.flask.Lapse`` instead: only inside Flask can lapse see
who Flask-Login says is signed in. The signed-in user is ``environ["lapse.user"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..config import LoadedConfig
from .core import Reply, Settings, loaded_config
from .sync import MAX_BODY, Bridge, SyncLapse, facts_of_environ, is_lapse, judged_facts

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class LapseWSGI:
    def __init__(
        self,
        app: WSGIApp,
        *,
        config: str | Path | LoadedConfig | None = None,
        app_name: str | None = None,
        public_paths: tuple[str, ...] | list[str] = (),
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        settings = Settings.of("standalone", app=app_name, public_paths=public_paths)
        self.bridge = Bridge(loaded_config(config), settings, clock=clock)
        self.lapse = SyncLapse(self.bridge)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if is_lapse(environ.get("PATH_INFO") or "/"):
            facts = facts_of_environ(environ)
            reply = self.lapse.wrong_host(facts)
            if reply is None:
                reply, _ = self.lapse.endpoint(facts, self.lapse.cookie_sid(facts), read_body(environ))
            return respond(reply, start_response)
        facts = judged_facts(environ)
        wrong = self.lapse.wrong_host(facts)
        if wrong is not None:
            return respond(wrong, start_response)
        sid = self.lapse.cookie_sid(facts)
        judgement = self.lapse.judge(facts, sid)
        if judgement.reply is not None:
            return respond(judgement.reply, start_response)
        environ["lapse.user"] = judgement.user
        return self.app(environ, start_response)


def read_body(environ: dict[str, Any]) -> bytes:
    """A ``/_lapse`` request body, read up to just past what the gateway accepts."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return environ["wsgi.input"].read(min(length, MAX_BODY)) if length > 0 else b""


def respond(reply: Reply, start_response: StartResponse) -> list[bytes]:
    status = f"{reply.status} {HTTPStatus(reply.status).phrase}"
    start_response(status, [*reply.headers, ("Content-Length", str(len(reply.body)))])
    return [reply.body]


__all__ = ["LapseWSGI", "read_body", "respond"]
