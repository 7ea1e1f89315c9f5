"""What every benchmark prints about where and on which code it ran."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lapse"


def machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}; {platform.platform()}"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def code_hash() -> str:
    """A short hash of src/lapse/**/*.py: which code these numbers belong to."""
    h = hashlib.sha256()
    for p in sorted(SRC.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]
