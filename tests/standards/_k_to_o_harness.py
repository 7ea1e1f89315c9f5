"""Shared helpers for checklist items 86-112 and the presets (§O): the gateway harness of
tests/web/test_gateway.py plus what these items need on top of it (sign-in from a given IP and
User-Agent, audit look-ups, and an in-process OIDC relying party whose IdP keys the test holds)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lapse.config import parse_config
from lapse.runtime import open_runtime
from lapse.sso import provider as provider_mod
from lapse.sso.provider import Provider
from lapse.store.base import SsoLink
from lapse.web import Gateway

from ..oidc.test_backchannel import ISS, FakeIdp, logout_token
from ..web.test_gateway import CONFIG, PASSWORD, T0, Harness, _jar, _set_cookies, harness, run

__all__ = ["CONFIG", "ISS", "PASSWORD", "T0", "Harness", "Rp", "cookie", "harness", "logout_token", "named",
           "FakeIdp", "relying_party", "run", "set_cookies", "sid_of", "sign_in"]

set_cookies = _set_cookies


async def sid_of(h: Harness | httpx.AsyncClient, **kwargs: Any) -> str:
    """Sign in (see ``sign_in``) and return the new session cookie's value."""
    r = await sign_in(h, **kwargs)
    assert r.status_code == 303, r.text
    return _set_cookies(r)["__Host-lapse"]


def cookie(sid: str) -> dict[str, str]:
    """The header a browser holding session ``sid`` sends."""
    return {"cookie": f"__Host-lapse={sid}"}


async def sign_in(h: Harness | httpx.AsyncClient, *, ip: str | None = None, user_agent: str | None = None,
                  user: str = "alice", jar: dict[str, str] | None = None, **fields: str) -> httpx.Response:
    """POST /_lapse/login as a browser at ``ip`` (via the trusted proxy's X-Forwarded-For) would."""
    client = h.client if isinstance(h, Harness) else h
    extra = {k: v for k, v in (("x-forwarded-for", ip), ("user-agent", user_agent)) if v is not None}
    page = await client.get("/_lapse/login", headers={"cookie": _jar(jar or {}), **extra})
    nonce = _set_cookies(page)["__Host-lapse-csrf"]
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    form = {"username": user, "password": PASSWORD, "next": "/", "csrf_token": token, **fields}
    return await client.post("/_lapse/login", data=form,
                             headers={"cookie": _jar({**(jar or {}), "__Host-lapse-csrf": nonce}), **extra})


async def named(h: Harness, *events: str) -> list[dict[str, Any]]:
    """The store sink's events with one of these names, oldest first."""
    return [e for e in await h.events() if e["event"] in events]


# ------------------------------------------------------------------ OIDC relying party, in process

RP_CONFIG = f"""
[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[defaults]
idle = "10m"
absolute = "1h"

[[apps]]
name = "pay"
hosts = ["127.0.0.1"]
paths = ["/pay*"]
idle = "1m"

[oidc]
issuer = "{ISS}"
client_id = "lapse"
client_secret = "not-used-here"
require_logout_typ = {{typ}}
"""


@dataclass
class Rp:
    """lapse as an OIDC relying party in process; the IdP's discovery and JWKS are ``FakeIdp``'s."""

    rt: Any
    gw: Gateway
    client: httpx.AsyncClient

    async def session(self, idp_sid: str | None, sub: str = "alice-sub", user: str = "alice") -> str:
        """A lapse session signed in through the IdP session ``idp_sid``; returns the raw cookie value."""
        raw, decision = await self.gw.gate.sign_in(user)
        now = time.time()
        await self.rt.store.put_link(SsoLink(decision.session.key, ISS, sub, idp_sid, "id.tok.en", None, False,
                                             now, now + 9e4))
        return raw

    async def backchannel(self, token: str | None, **extra: str) -> httpx.Response:
        data = {"logout_token": token, **extra} if token is not None else extra
        return await self.client.post("/_lapse/oidc/backchannel-logout", data=data)

    async def auth(self, raw: str, uri: str = "/") -> httpx.Response:
        return await self.client.get("/_lapse/auth", headers={"x-original-uri": uri, **cookie(raw)})

    async def events(self, *names: str) -> list[dict[str, Any]]:
        return [e.to_dict() for e in await self.rt.store.tail_audit(1000) if e.event in names]


@asynccontextmanager
async def relying_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                        require_typ: bool = False, idp: FakeIdp | None = None) -> AsyncIterator[Rp]:
    monkeypatch.setattr(provider_mod, "JWKS_MIN_INTERVAL", 0.0)
    text = RP_CONFIG.replace("{typ}", "true" if require_typ else "false")
    loaded = parse_config(text, str(tmp_path / "lapse.toml"), tmp_path)
    async with open_runtime(loaded) as rt:
        gw = Gateway(rt)
        gw.oidc.provider = Provider(loaded.config.oidc,
                                    client=httpx.AsyncClient(transport=httpx.MockTransport(idp or FakeIdp())))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(gw), base_url="http://127.0.0.1:8080") as client:
            yield Rp(rt, gw, client)
