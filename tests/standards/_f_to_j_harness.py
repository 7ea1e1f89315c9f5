"""Shared rig for the checklist slice F-J (items 46-85): the gateway of tests/web/test_gateway.py on SQLite
with the test's clock, one config that has every limit the slice needs, and an OIDC relying party whose
IdP (discovery, JWKS, token endpoint) answers with ID-token claims the test chooses, on the same clock."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import RSAKey

from lapse import totp
from lapse.config import parse_config
from lapse.identity import hash_password
from lapse.runtime import open_runtime
from lapse.sso.provider import Provider
from lapse.store.base import User
from lapse.web import Gateway

from ..core.helpers import Clock
from ..web.test_gateway import PASSWORD, T0, Harness, _set_cookies, harness, run

__all__ = ["CONFIG", "PASSWORD", "T0", "Harness", "Idp", "Rp", "admin", "authorize_query", "cookie", "csrf_field",
           "enrol", "events", "gateway", "heartbeat", "new_sid", "oidc", "run", "session_cookie", "status"]

# Limits chosen so each item's boundary is a round number: main 10m/1h (warn 2m), pay 5m (warn 30s) with
# a 5-minute step-up route and an MFA route, wide 90m/12h under an org ceiling of 1h/8h, and the admin
# console behind MFA step-up with its own 2-minute idle (item 79), and ending one's other sessions only
# within 5 minutes of entering the password (item 57): lapse's own pages obey privileged rules like any path.
CONFIG = """
[server]
mode = "{mode}"
upstream = "{upstream}"
trusted_proxies = ["127.0.0.1/32"]

[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[login]
max_attempts = 5
window = "1m"

[org]
max_idle = "1h"
max_absolute = "8h"

[defaults]
idle = "10m"
absolute = "1h"
warn_before = "2m"

[[apps]]
name = "pay"
hosts = ["app.test"]
paths = ["/pay*"]
idle = "5m"
warn_before = "30s"

  [[apps.privileged]]
  paths = ["/pay/admin*"]
  max_auth_age = "5m"

  [[apps.privileged]]
  paths = ["/pay/mfa*"]
  max_auth_age = "1h"
  mfa = true

[[apps]]
name = "console"
hosts = ["app.test"]
paths = ["/_lapse/admin*"]
idle = "2m"

  [[apps.privileged]]
  paths = ["/_lapse/admin*"]
  max_auth_age = "10m"
  mfa = true

[[apps]]
name = "wide"
hosts = ["wide.test"]
idle = "90m"
absolute = "12h"

[[apps]]
name = "main"
hosts = ["app.test"]

  [[apps.privileged]]
  paths = ["/_lapse/sessions/end"]
  methods = ["POST"]
  max_auth_age = "5m"
"""


def gateway(tmp_path: Path, mode: str = "forward-auth") -> Any:
    """The slice's gateway (an async context manager yielding a ``Harness``)."""
    return harness(tmp_path, mode=mode, config=CONFIG)


def session_cookie(sid: str) -> dict[str, str]:
    return {"cookie": f"__Host-lapse={sid}"}


def cookie(sid: str, accept: str = "text/html") -> dict[str, str]:
    return {**session_cookie(sid), "accept": accept}


def csrf_field(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


async def events(h: Harness, name: str) -> list[dict[str, Any]]:
    """The audit events called ``name``, oldest first, as every sink receives them."""
    return [e for e in await h.events() if e["event"] == name]


async def status(h: Harness, sid: str, path: str = "/docs", host: str = "app.test") -> dict[str, Any]:
    """The PASSIVE status of the app of ``host`` + ``path``."""
    r = await h.client.get("/_lapse/session", params={"path": path}, headers={**session_cookie(sid), "host": host})
    assert r.status_code == 200, r.text
    return r.json()


async def heartbeat(h: Harness, sid: str, path: str = "/docs") -> httpx.Response:
    """The ACTIVE heartbeat ("Stay signed in"), with the session's CSRF token."""
    token = (await status(h, sid, path))["csrf_token"]
    return await h.client.post("/_lapse/session/activity", params={"path": path},
                               headers={**session_cookie(sid), "x-csrf-token": token})


async def admin(h: Harness, name: str = "root") -> None:
    await h.rt.store.put_user(User(name, hash_password(PASSWORD), admin=True))


async def enrol(h: Harness, name: str) -> str:
    """Give ``name`` a TOTP factor (as `lapse users totp` does); returns the secret."""
    user = await h.rt.store.get_user(name)
    secret = totp.new_secret()
    factor, _codes = totp.enrol(secret)
    await h.rt.store.put_user(replace(user, extra={**user.extra, "totp": factor.to_dict(h.rt.sealer, user.name)}))
    return secret


def new_sid(r: httpx.Response) -> str | None:
    return _set_cookies(r).get("__Host-lapse")


# ------------------------------------------------------------------------------------- OIDC

ISS = "https://idp.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "one"}, private=True)

OIDC = CONFIG.replace("[server]", "[server]\npublic_url = \"http://127.0.0.1:8080\"", 1) + f"""
[oidc]
issuer = "{ISS}"
client_id = "lapse"
client_secret = "not-used-here"
revalidate_every = "1m"
"""


class Idp:
    """The IdP's back channel: discovery, keys, and a token endpoint issuing ID tokens of ``claims``.

    Times are the gateway's clock, so ``auth_time`` and ``exp`` mean what a test says. A refresh grant
    answers with a fresh ID token whose ``auth_time`` is ``refresh_auth_time``.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.claims: dict[str, Any] = {}
        self.drop: tuple[str, ...] = ()
        self.nonce = ""
        self.refresh_auth_time: float | None = None
        self.grants: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISS, "authorization_endpoint": ISS + "/auth", "token_endpoint": ISS + "/token",
                "jwks_uri": ISS + "/jwks", "id_token_signing_alg_values_supported": ["RS256"],
            })
        if request.url.path == "/jwks":
            return httpx.Response(200, json={"keys": [KEY.as_dict(private=False)]})
        if request.url.path == "/token":
            grant = parse_qs(request.content.decode())["grant_type"][0]
            self.grants.append(grant)
            now = int(self.clock.now)
            claims = {"iss": ISS, "aud": "lapse", "iat": now, "exp": now + 300, "auth_time": now,
                      "nonce": self.nonce, "sub": "carol-sub", "preferred_username": "carol", **self.claims}
            if grant == "refresh_token":
                claims.pop("nonce")
                claims["auth_time"] = int(self.refresh_auth_time or now)
            for name in self.drop:
                claims.pop(name, None)
            token = jwt.encode({"alg": "RS256", "kid": "one"}, claims, KEY)
            return httpx.Response(200, json={"id_token": token, "token_type": "Bearer", "refresh_token": "r1"})
        return httpx.Response(404)


class Rp:
    """lapse as the relying party: start a login, play the IdP's front channel, come back."""

    def __init__(self, h: Harness, gw: Gateway, idp: Idp) -> None:
        self.h, self.gw, self.idp = h, gw, idp

    async def start(self, next_: str = "/", host: str = "app.test", **params: str) -> httpx.Response:
        r = await self.h.client.get("/_lapse/oidc/login", params={"next": next_, **params}, headers={"host": host})
        assert r.status_code == 303, r.text
        return r

    async def come_back(self, start: httpx.Response, host: str = "app.test", **claims: Any) -> httpx.Response:
        """The IdP authenticated (or remembered) the user with ``claims``: the callback's response."""
        self.idp.claims = claims
        query = authorize_query(start)
        self.idp.nonce = query["nonce"]
        flow = start.headers["set-cookie"].split(";", 1)[0]
        return await self.h.client.get("/_lapse/oidc/callback", params={"code": "c", "state": query["state"]},
                                       headers={"cookie": flow, "accept": "text/html", "host": host})

    async def sign_in(self, next_: str = "/", host: str = "app.test", **claims: Any) -> str:
        r = await self.come_back(await self.start(next_, host), host, **claims)
        assert r.status_code == 303, r.text
        sid = new_sid(r)
        assert sid
        return sid


def authorize_query(r: httpx.Response) -> dict[str, str]:
    """The authorization request lapse sent the browser to, one value per parameter."""
    location = r.headers["location"]
    assert location.startswith(ISS + "/auth?"), location
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@asynccontextmanager
async def oidc(tmp_path: Path) -> AsyncIterator[Rp]:
    loaded = parse_config(OIDC.format(mode="forward-auth", upstream="http://127.0.0.1:9"), "lapse.toml", tmp_path)
    clock = Clock(float(int(time.time())))  # token checks compare iat/exp with this clock
    async with open_runtime(loaded, clock=clock) as rt:
        idp = Idp(clock)
        gw = Gateway(rt)
        gw.oidc.provider = Provider(loaded.config.oidc, client=httpx.AsyncClient(transport=httpx.MockTransport(idp)))
        transport = httpx.ASGITransport(app=gw, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://app.test") as client:
            yield Rp(Harness(rt, clock, client), gw, idp)
        await gw.oidc.provider.aclose()

