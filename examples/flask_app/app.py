"""A small Flask app with lapse inside it.

    pip install -e '.[flask]'
    flask --app 'examples.flask_app.app:create_app()' run --port 5000
    # then http://127.0.0.1:5000 ; user "alice", password "wonderland"

``LAPSE_MODE=alongside`` (the default): Flask-Login signs people in; lapse enforces idle and absolute
limits on that sign-in and signs out through ``logout_user``. ``LAPSE_MODE=standalone``: the WSGI
middleware, lapse owns the cookie and the login page (users from ``lapse users add``).
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import flask_login
from flask import Flask, jsonify, redirect, render_template_string, request

from lapse.middleware.flask import Lapse
from lapse.middleware.jinja import install
from lapse.middleware.wsgi import LapseWSGI
from lapse.web.app import safe_next

HERE = Path(__file__).parent
USERS = {"alice": "wonderland"}  # the example's own user table (alongside mode)

PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
{{ lapse_widget() }}</head><body><h1>{{ title }}</h1>{% block body %}{{ body }}{% endblock %}</body></html>"""
LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head><body>
{% if reason %}<p role="status">Signed out ({{ reason }}).</p>{% endif %}{% if message %}<p>{{ message }}</p>{% endif %}
<form method="post"><input name="username"><input name="password" type="password">
<input type="hidden" name="next" value="{{ next }}"><button>Sign in</button></form></body></html>"""


class Account(flask_login.UserMixin):
    def __init__(self, name: str) -> None:
        self.id = self.username = name


def create_app(config: str | Path | None = None, *, mode: str | None = None,
               clock: Callable[[], float] | None = None) -> Flask:
    mode = mode or os.environ.get("LAPSE_MODE", "alongside")
    config = config or os.environ.get("LAPSE_CONFIG") or HERE / "lapse.toml"
    app = Flask(__name__)
    app.config.update(SECRET_KEY=os.environ.get("SESSION_SECRET") or secrets.token_urlsafe(32),
                      SESSION_COOKIE_NAME="__Host-session", SESSION_COOKIE_SECURE=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    login_manager = flask_login.LoginManager(app)
    login_manager.user_loader(lambda name: Account(name) if name in USERS else None)

    def who() -> str | None:
        if mode == "standalone":
            return request.environ.get("lapse.user")
        user = flask_login.current_user
        return user.username if user.is_authenticated else None

    @app.get("/")
    def home() -> str:
        return render_template_string(PAGE, title="Home", body=f"Signed in as {who()}" if who() else "Not signed in")

    @app.get("/private")
    def private():
        if who() is None:  # alongside: the app's own rule; standalone: lapse answered already
            return redirect("/login?next=/private", 303)
        return render_template_string(PAGE, title="Private", body=f"Hello {who()}.")

    @app.get("/api/data")
    def data():
        return (jsonify(user=who()), 200) if who() else (jsonify(error="sign in"), 401)

    @app.get("/api/poll")
    def poll():  # a passive path in lapse.toml: never extends the session
        return jsonify(user=who(), news=[])

    if mode == "standalone":
        install(app.jinja_env)
        app.wsgi_app = LapseWSGI(app.wsgi_app, config=config, clock=clock, public_paths=["/"])  # type: ignore[method-assign]
        return app

    @app.route("/login", methods=["GET", "POST"])
    def login():
        if request.method == "GET":
            return render_template_string(LOGIN, next=safe_next(request.args.get("next")),
                                          reason=request.args.get("reason"), message=None)
        name, password = request.form.get("username", ""), request.form.get("password", "")
        known = USERS.get(name)
        if known is None or not hmac.compare_digest(known.encode(), password.encode()):
            return render_template_string(LOGIN, next=safe_next(request.form.get("next")), reason=None,
                                          message="Wrong user name or password.")
        flask_login.login_user(Account(name))
        return redirect(safe_next(request.form.get("next")), 303)

    @app.post("/logout")
    def logout():
        flask_login.logout_user()  # lapse ends its session too (session.revoked, reason logout)
        return redirect("/", 303)

    Lapse(app, config=config, login_url="/login", clock=clock)
    return app
