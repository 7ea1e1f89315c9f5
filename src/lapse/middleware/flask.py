"""Flask alongside its own sign-in (Flask-Login, or a user name in Flask's session).

    lapse = Lapse(app, config="lapse.toml", login_url="/login")

Flask-Login stays in charge of who is signed in; lapse opens its own session
when someone signs in (``session.created``), keeps its ID in Flask's session,
judges every request by the policy, and on a refusal signs out through
Flask-Login (``logout_user``) before redirecting to ``login_url`` (or 401 JSON
for API clients). A ``logout_user`` by the app ends lapse's session
(``session.revoked``, reason ``logout``). The widget's endpoints are mounted
at ``/_lapse/*`` and ``{{ lapse_widget() }}`` is added to Jinja.

Flask-Login's "remember me" cookie signs a user back in after their session
ended; to lapse that is a new sign-in. Where idle limits matter, do not offer it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request, session

from ..config import LoadedConfig
from .core import SESSION_FIELD, Reply, Settings, StoreUnavailable, form_token, loaded_config
from .jinja import install
from .sync import MAX_BODY, Bridge, SyncLapse, facts_of_environ, is_lapse, judged_facts

try:
    import flask_login
except ImportError:  # Flask without Flask-Login: the user is session["user"]
    flask_login = None  # type: ignore[assignment]


def default_user() -> str | None:
    """Flask-Login's ``current_user`` (its ``username``, else its id), else ``session["user"]``."""
    if flask_login is not None and getattr(flask_login.current_user, "is_authenticated", False):
        user = flask_login.current_user
        return str(getattr(user, "username", None) or user.get_id())
    name = session.get("user")
    return None if name in (None, "") else str(name)


class Lapse:
    def __init__(
        self,
        app: Flask | None = None,
        *,
        config: str | Path | LoadedConfig | None = None,
        login_url: str = "/login",
        app_name: str | None = None,
        user_of: Callable[[], str | None] = default_user,
        clock: Callable[[], float] | None = None,
    ) -> None:
        settings = Settings.of("alongside", app=app_name, login_url=login_url)
        self.bridge = Bridge(loaded_config(config), settings, clock=clock)
        self.lapse = SyncLapse(self.bridge)
        self.user_of = user_of
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.before_request(self._before)
        app.after_request(self._after)
        app.add_url_rule("/_lapse/<path:rest>", "lapse", self._endpoint, methods=["GET", "HEAD", "POST"])
        install(app.jinja_env)
        app.extensions["lapse"] = self
        if flask_login is not None:
            flask_login.user_logged_in.connect(self._logged_in, app)

    def sign_out(self) -> None:
        """Sign out through the framework: Flask-Login's ``logout_user`` (also forgets "remember me")."""
        if flask_login is not None and getattr(flask_login.current_user, "is_authenticated", False):
            flask_login.logout_user()
        session.pop("user", None)
        session.pop(SESSION_FIELD, None)

    def _before(self) -> Response | None:
        wrong = self.lapse.wrong_host(judged_facts(request.environ))  # /_lapse/* included
        if wrong is not None:
            return to_response(wrong)
        if is_lapse(request.path):
            return None
        try:
            return self._judge()
        except StoreUnavailable as exc:
            return to_response(self.lapse.unavailable(judged_facts(request.environ), exc))

    def _judge(self) -> Response | None:
        facts = judged_facts(request.environ)
        user, sid = self.user_of(), session.get(SESSION_FIELD)
        if user is None and sid is not None:  # signed out by a path lapse did not see
            session.pop(SESSION_FIELD)
            self.lapse.end(sid, "logout")
            sid = None
        judgement = self.lapse.judge(facts, sid, user)
        if judgement.reply is not None:
            if judgement.sign_out:
                self.sign_out()
            return to_response(judgement.reply)
        if user is not None and (sid is None or judgement.user != user):
            sid = session[SESSION_FIELD] = self.lapse.adopt(facts, user, replaces=sid)
        g.lapse_sid = sid
        return None

    def _after(self, response: Response) -> Response:
        """What the view did: a sign-in starts lapse's session now; a sign-out ends it."""
        if is_lapse(request.path):
            return response
        try:
            self._follow()
        except StoreUnavailable as exc:  # fail closed: no sign-in that lapse cannot enforce
            self.sign_out()
            return to_response(self.lapse.unavailable(judged_facts(request.environ), exc))
        return response

    def _follow(self) -> None:
        before = g.pop("lapse_sid", None)
        now, user = session.get(SESSION_FIELD), self.user_of()
        if before is not None and (now != before or user is None):
            self.lapse.end(before, "logout")
            session.pop(SESSION_FIELD, None)
            now = None
        if user is not None and (now is None or g.pop("lapse_login", False)):
            session[SESSION_FIELD] = self.lapse.adopt(judged_facts(request.environ), user, replaces=now)

    def _logged_in(self, sender: Any, **extra: Any) -> None:
        g.lapse_login = True  # a login while a lapse session lives: a new session, the old one ends (reauth)

    def _endpoint(self, rest: str) -> Response:
        facts = facts_of_environ(request.environ)
        body = request.get_data(cache=True)[:MAX_BODY] if request.method == "POST" else b""
        reply, sign_out = self.lapse.endpoint(facts, session.get(SESSION_FIELD), body, form_token(body))
        if sign_out:
            self.sign_out()
        return to_response(reply)


def to_response(reply: Reply) -> Response:
    return Response(reply.body, reply.status, reply.headers)


__all__ = ["Lapse", "default_user"]
