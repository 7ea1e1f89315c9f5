"""Session stores: the port and its adapters, chosen by URL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .base import SessionStore, SsoLink, StoreUnavailable, User, WriteResult
from .memory import MemoryStore


def open_store(url: str, *, clock: Callable[[], float] = time.time, base_dir: Path | None = None) -> SessionStore:
    """``memory://`` or ``sqlite:///PATH`` (relative paths from ``base_dir``)."""
    if url == "memory://":
        return MemoryStore(clock)
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        path = Path(url[len("sqlite:///") :])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return SqliteStore(path, clock)
    raise ValueError(f"unsupported store url {url!r}: use \"memory://\" or \"sqlite:///PATH\"")


__all__ = ["MemoryStore", "SessionStore", "SsoLink", "StoreUnavailable", "User", "WriteResult", "open_store"]
