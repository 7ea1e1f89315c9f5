"""Wiring: from a loaded config to a working store, audit log, policy and gate.

The CLI uses it today; ``lapse serve`` and the middleware will too, so there is
one place that knows how the parts are put together.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from .audit import AuditLog, open_sink
from .config import LoadedConfig, build_policy
from .core.policy import Policy
from .enforce import Gate
from .sealed import PREFIX, Sealer, SealError
from .secret import Secrets, load_or_create
from .store import SessionStore, open_store
from .totp import Factor


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


async def seal_stored_factors(rt: Runtime) -> int:
    """Seal the TOTP factors stored before sealing existed (plain seeds, bare recovery hashes); how many.

    ``lapse serve`` runs it at start, so no plain seed outlives an upgrade by more than a restart.
    Idempotent; a code accepted on another replica meanwhile is still refused a second time (its
    claim in the store, ``first_use``, outlives this rewrite of ``last_step``).
    """
    sealed = 0
    for user in await rt.store.users():
        raw = user.extra.get("totp")
        if raw and (not str(raw.get("secret", "")).startswith(PREFIX) or not isinstance(raw.get("recovery"), str)):
            try:
                factor = Factor.from_extra(user.extra, rt.sealer, user.name)
            except SealError:
                continue  # sealed under another secret file: its codes are refused and logged at sign-in
            assert factor is not None
            await rt.store.put_user(replace(user, extra={**user.extra, "totp": factor.to_dict(rt.sealer, user.name)}))
            sealed += 1
    return sealed
