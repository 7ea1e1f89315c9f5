"""Durations as the config writes them: "90s", "15m", "1h30m", "none".

Seconds are floats everywhere in the core; ``None`` means "no limit" and is
only accepted where a limit may be absent (the idle timeout).
"""

from __future__ import annotations

import re

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"([0-9]+)([dhms])")
_WHOLE = re.compile(r"(?:[0-9]+[dhms])+")


MAX_SECONDS = 100 * 366 * 86400
"""The longest duration accepted: beyond it a limit means "never" (write "none" where that is allowed), and
larger numbers only overflow the clocks they are added to."""


def parse_duration(text: str, *, allow_none: bool = False) -> float | None:
    """Parse a duration string into seconds (``None`` for "none" where allowed).

    Units must appear largest first and at most once ("1h30m", not "30m1h"),
    so every accepted string has exactly one meaning. Zero, negative and bare
    numbers are rejected: a limit of zero would deny every request, and a bare
    number hides its unit.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string like \"15m\", got {text!r}")
    value = text.strip().lower()
    if value == "none":
        if allow_none:
            return None
        raise ValueError("\"none\" is not allowed here: this limit must have a value")
    if not _WHOLE.fullmatch(value):
        raise ValueError(f"bad duration {text!r}: use e.g. \"90s\", \"15m\", \"12h\", \"30d\" or \"1h30m\"")
    units = [unit for _, unit in _PART.findall(value)]
    order = "dhms"
    if units != sorted(units, key=order.index) or len(set(units)) != len(units):
        raise ValueError(f"bad duration {text!r}: give each unit once, largest first (e.g. \"1h30m\")")
    total = sum(int(n) * int(_UNITS[u]) for n, u in _PART.findall(value))  # exact: no float overflow
    if total <= 0:
        raise ValueError(f"bad duration {text!r}: must be greater than zero")
    if total > MAX_SECONDS:
        raise ValueError(f"bad duration {text!r}: at most 100 years")
    return float(total)


def format_duration(seconds: float | None) -> str:
    """The shortest config-style spelling of ``seconds`` (inverse of parse for whole seconds)."""
    if seconds is None:
        return "none"
    if seconds != int(seconds) or seconds <= 0:
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit in "dhms":
        size = int(_UNITS[unit])
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)
