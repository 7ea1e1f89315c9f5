#!/usr/bin/env python
"""python -m examples.django_app.manage migrate | createsuperuser | runserver 8000 (from the repository root)."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
