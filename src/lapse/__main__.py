"""``python -m lapse``: the same as the ``lapse`` command."""

from .cli import main

main()
