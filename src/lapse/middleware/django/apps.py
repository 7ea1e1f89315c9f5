from django.apps import AppConfig


class LapseConfig(AppConfig):
    """Listed in INSTALLED_APPS only so that ``{% load lapse %}`` finds the template tag."""

    name = "lapse.middleware.django"
    label = "lapse"
