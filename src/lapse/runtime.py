"""Wiring: from a loaded config to a working store, audit log, policy and gate.

The CLI uses it today; ``lapse serve`` and the middleware will too, so there is
one place that knows how the parts are put together.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .audit import AuditLog, open_sink
from .config import LoadedConfig, build_policy
from .core.policy import Policy
from .enforce import Gate
from .sealed import Sealer
from .secret import Secrets, load_or_create
from .store import SessionStore, open_store


@dataclass
class Runtime:
    loaded: LoadedConfig
    store: SessionStore
    audit: AuditLog
    gate: Gate
    secrets: Secrets
    sealer: Sealer  # TOTP seeds and OIDC tokens at rest

    @property
    def policy(self) -> Policy:
        return self.gate.policy


@asynccontextmanager
async def open_runtime(loaded: LoadedConfig, *, clock: Callable[[], float] | None = None) -> AsyncIterator[Runtime]:
    cfg = loaded.config
    secrets, warnings = load_or_create(cfg.server.secret_path)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    store = open_store(cfg.store.url, clock=clock, base_dir=loaded.base_dir)
    audit = AuditLog([open_sink(sink.spec, store, loaded.base_dir) for sink in cfg.audit.parsed_sinks])
    try:
        gate = Gate(store, build_policy(cfg), audit, secrets.session_hash_key)
        yield Runtime(loaded, store, audit, gate, secrets, Sealer(secrets.seal_key))
    finally:
        await audit.flush()
        audit.close()
        await store.close()
