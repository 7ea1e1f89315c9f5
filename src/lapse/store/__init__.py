"""Session stores: the port and its adapters, chosen by URL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .base import SessionStore, SsoLink, StoreUnavailable, User, WriteResult
from .memory import MemoryStore
from .redis_url import is_redis_url


def open_store(url: str, *, clock: Callable[[], float] | None = None, base_dir: Path | None = None) -> SessionStore:
    """``memory://``, ``sqlite:///PATH`` (relative paths from ``base_dir``) or a Redis URL (docs/redis.md).

    ``clock`` is the store's clock: the host's by default; Redis judges by its own
    ``TIME`` unless a clock is given (tests).
    """
    if url == "memory://":
        return MemoryStore(clock or time.time)
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        path = Path(url[len("sqlite:///") :])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return SqliteStore(path, clock or time.time)
    if is_redis_url(url):
        from .redis import RedisStore

        return RedisStore(url, clock)
    raise ValueError(
        f"unsupported store url {url!r}: use \"memory://\", \"sqlite:///PATH\" or \"redis://HOST:PORT/DB\""
    )


__all__ = ["MemoryStore", "SessionStore", "SsoLink", "StoreUnavailable", "User", "WriteResult", "open_store"]
