"""Django: ``lapse.middleware.django.LapseMiddleware``, standalone or alongside ``django.contrib.auth``.

settings.py::

    INSTALLED_APPS += ["lapse.middleware.django"]          # {% load lapse %}{% lapse_widget %}
    MIDDLEWARE += ["lapse.middleware.django.LapseMiddleware"]   # after AuthenticationMiddleware
    LAPSE = {"config": BASE_DIR / "lapse.toml", "mode": "alongside"}   # login_url: settings.LOGIN_URL

Alongside (the default): Django's auth decides who is signed in; lapse keeps its own session ID in
``request.session``, judges every request, and on a refusal calls ``django.contrib.auth.logout``
(which flushes the session) before redirecting to ``LOGIN_URL`` (or 401 JSON for API clients).
``login()`` starts a new lapse session (the old one ends: ``reauth``); ``logout()`` ends it
(``logout``). Standalone: lapse's own cookie and login page, as with the other adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import logout
from django.contrib.auth.signals import user_logged_in
from django.http import HttpRequest, HttpResponse

from ..core import SESSION_FIELD, Reply, Settings, StoreUnavailable, form_token, loaded_config
from ..sync import MAX_BODY, Bridge, SyncLapse, facts_of_environ, is_lapse, judged_facts

_bridges: dict[str, Bridge] = {}
"""One bridge per process and configuration: Django builds a middleware instance per handler."""


def bridge_for(options: dict[str, Any]) -> Bridge:
    key = repr(sorted(options.items()))
    if key not in _bridges:
        mode = options.get("mode", "alongside")
        login_url = options.get("login_url") or (settings.LOGIN_URL if mode == "alongside" else None)
        lapse_settings = Settings.of(mode, app=options.get("app"), login_url=login_url,
                                     public_paths=options.get("public_paths", ()))
        _bridges[key] = Bridge(loaded_config(options.get("config")), lapse_settings, clock=options.get("clock"))
    return _bridges[key]


class LapseMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.lapse = SyncLapse(bridge_for(getattr(settings, "LAPSE", {})))

    def __call__(self, request: HttpRequest) -> HttpResponse:
        lapse_path = is_lapse(request.META.get("PATH_INFO") or "/")
        facts = (facts_of_environ if lapse_path else judged_facts)(request.META, wsgi_strings=False)
        try:
            wrong = self.lapse.wrong_host(facts)
            if wrong is not None:
                return to_response(wrong)
            if lapse_path:
                return self._endpoint(request, facts)
            if not self.lapse.alongside:
                judgement = self.lapse.judge(facts, self.lapse.cookie_sid(facts))
                if judgement.reply is not None:
                    return to_response(judgement.reply)
                request.lapse_user = judgement.user  # type: ignore[attr-defined]
                return self.get_response(request)
            early = self._judge(request, facts)
            if early is not None:
                return early
        except StoreUnavailable as exc:
            return to_response(self.lapse.unavailable(facts, exc))
        response = self.get_response(request)
        try:
            self._follow(request, facts)
        except StoreUnavailable as exc:  # fail closed: no sign-in that lapse cannot enforce
            logout(request)
            return to_response(self.lapse.unavailable(facts, exc))
        return response

    def _judge(self, request: HttpRequest, facts: Any) -> HttpResponse | None:
        user = request.user.get_username() if request.user.is_authenticated else None
        sid = request.session.get(SESSION_FIELD)
        if user is None and sid is not None:  # signed out by a path lapse did not see
            request.session.pop(SESSION_FIELD)
            self.lapse.end(sid, "logout")
            sid = None
        judgement = self.lapse.judge(facts, sid, user)
        if judgement.reply is not None:
            if judgement.sign_out:
                logout(request)  # Django's own sign-out: the session is flushed, a new key issued
            return to_response(judgement.reply)
        if user is not None and (sid is None or judgement.user != user):
            sid = request.session[SESSION_FIELD] = self.lapse.adopt(facts, user, replaces=sid)
        request.lapse_sid = sid  # type: ignore[attr-defined]
        return None

    def _follow(self, request: HttpRequest, facts: Any) -> None:
        """What the view did: ``login()`` starts a new lapse session now; ``logout()`` ends it."""
        before = getattr(request, "lapse_sid", None)
        user = request.user.get_username() if request.user.is_authenticated else None
        now = request.session.get(SESSION_FIELD)
        if before is not None and (now != before or user is None):
            self.lapse.end(before, "logout")
            request.session.pop(SESSION_FIELD, None)
            now = None
        if user is not None and (now is None or getattr(request, "lapse_login", False)):
            request.session[SESSION_FIELD] = self.lapse.adopt(facts, user, replaces=now)

    def _endpoint(self, request: HttpRequest, facts: Any) -> HttpResponse:
        body = request.body[:MAX_BODY] if request.method == "POST" else b""
        sid = request.session.get(SESSION_FIELD) if self.lapse.alongside else self.lapse.cookie_sid(facts)
        reply, sign_out = self.lapse.endpoint(facts, sid, body, form_token(body))
        if sign_out:
            logout(request)
        return to_response(reply)


def _mark_login(sender: Any, request: HttpRequest, **kwargs: Any) -> None:
    request.lapse_login = True  # type: ignore[attr-defined]


user_logged_in.connect(_mark_login, dispatch_uid="lapse.middleware.django")


def to_response(reply: Reply) -> HttpResponse:
    response = HttpResponse(reply.body, status=reply.status)
    for name, value in reply.headers:
        if name.lower() == "set-cookie":
            _set_cookie(response, value)
        else:
            response[name] = value
    return response


def _set_cookie(response: HttpResponse, header: str) -> None:
    """Django keeps cookies apart from headers: carry lapse's Set-Cookie line over attribute by attribute."""
    first, *attrs = [p.strip() for p in header.split(";")]
    name, _, value = first.partition("=")
    flags = {a.partition("=")[0].lower(): a.partition("=")[2] for a in attrs}
    max_age = int(flags["max-age"]) if "max-age" in flags else None
    response.set_cookie(name, value, max_age=max_age, path=flags.get("path", "/"), secure="secure" in flags,
                        httponly="httponly" in flags, samesite=flags.get("samesite") or None)


__all__ = ["LapseMiddleware"]
