"""Settings of the Django example: django.contrib.auth signs people in, lapse enforces the limits."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBUG = False
SECRET_KEY = os.environ.get("SESSION_SECRET") or secrets.token_urlsafe(32)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "lapse.middleware.django",  # {% load lapse %}
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "lapse.middleware.django.LapseMiddleware",  # after AuthenticationMiddleware: it reads request.user
]
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "DIRS": [HERE / "templates"]}]
(HERE / ".lapse").mkdir(exist_ok=True)  # the example's database and lapse's store live here
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("DJANGO_DB", str(HERE / ".lapse" / "django.sqlite3"))}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
LOGIN_URL = "/login/"
SESSION_COOKIE_NAME = "__Host-sessionid"
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_NAME = "__Host-csrftoken"
CSRF_COOKIE_SECURE = True
LAPSE = {"config": os.environ.get("LAPSE_CONFIG") or str(HERE / "lapse.toml"),
         "mode": os.environ.get("LAPSE_MODE", "alongside")}
