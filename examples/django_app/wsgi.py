"""``waitress-serve --port 8000 examples.django_app.wsgi:application`` (from the repository root)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
application = get_wsgi_application()
