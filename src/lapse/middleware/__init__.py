"""lapse inside the app: the same policy file, core, store, audit events, session API and widget.

- ``lapse.middleware.asgi.LapseMiddleware``: Starlette, FastAPI and any ASGI app.
- ``lapse.middleware.wsgi.LapseWSGI``: Flask and any WSGI app (standalone mode).
- ``lapse.middleware.flask.Lapse``: Flask alongside Flask-Login (or Flask's session).
- ``lapse.middleware.django.LapseMiddleware``: Django, standalone or alongside ``django.contrib.auth``.
- ``lapse.middleware.jinja`` and the ``lapse`` Django template library: the widget tag.

Frameworks are optional extras (``pip install lapse[fastapi]``, ``[flask]``, ``[django]``), so this
package imports none of them; import the adapter you use.
"""

from .core import SESSION_FIELD, WIDGET_TAG, Mode, Settings

__all__ = ["Mode", "SESSION_FIELD", "Settings", "WIDGET_TAG"]
