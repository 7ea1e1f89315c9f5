"""OIDC step-up and re-authentication, with an IdP whose answers the test writes (auth_time above all).

A step-up (``reason=step_up``, ``prompt=login``) must come back with a sign-in
made after it began; the ``max_age`` asked must be the strictest the target may
demand, whatever the method of its privileged rule; an ``auth_time`` past
``max_age`` asks once more instead of making a session already past its limit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt

from lapse.config import parse_config
from lapse.runtime import open_runtime
from lapse.sso.provider import Provider
from lapse.web import Gateway

from .test_callback import ISS, KEY

CONFIG = f"""
[store]
url = "memory://"

[audit]
sinks = ["store"]

[defaults]
idle = "30m"
absolute = "8h"

[[apps]]
name = "console"
hosts = ["127.0.0.1"]
  [[apps.privileged]]
  paths = ["/admin/*"]
  methods = ["POST", "DELETE"]
  max_auth_age = "5m"

[oidc]
issuer = "{ISS}"
client_id = "lapse"
client_secret = "not-used-here"
"""

IP_STEP_UP = CONFIG.replace("[defaults]\n", '[defaults]\non_ip_change = "step_up"\n')


class FakeIdp:
    """Answers the token request with an ID token of ``claims``; remembers the authorization request's query."""

    def __init__(self) -> None:
        self.claims: dict[str, Any] = {}
        self.nonce = ""
        self.asked: dict[str, list[str]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISS, "authorization_endpoint": ISS + "/auth", "token_endpoint": ISS + "/token",
                "jwks_uri": ISS + "/jwks", "id_token_signing_alg_values_supported": ["RS256"]})
        if request.url.path == "/jwks":
            return httpx.Response(200, json={"keys": [KEY.as_dict(private=False)]})
        if request.url.path == "/token":
            now = int(time.time())
            claims = {"iss": ISS, "aud": "lapse", "iat": now, "exp": now + 300, "auth_time": now,
                      "nonce": self.nonce, "sub": "carol-sub", "preferred_username": "carol", **self.claims}
            token = jwt.encode({"alg": "RS256", "kid": "one"}, {k: v for k, v in claims.items() if v is not None}, KEY)
            return httpx.Response(200, json={"id_token": token, "token_type": "Bearer"})
        return httpx.Response(404)


class Rp:
    def __init__(self, rt: Any, gw: Gateway, idp: FakeIdp, client: httpx.AsyncClient) -> None:
        self.rt, self.gw, self.idp, self.client = rt, gw, idp, client

    async def start(self, next_: str = "/", step_up: bool = False) -> httpx.Response:
        params = {"next": next_} | ({"reason": "step_up"} if step_up else {})
        return await self.client.get("/_lapse/oidc/login", params=params)

    async def back(self, start: httpx.Response, cookie: str = "", **claims: Any) -> httpx.Response:
        """The IdP sends the browser back to the callback of the login ``start`` began, with ``claims``."""
        assert start.status_code == 303, start.text
        self.idp.asked = parse_qs(urlsplit(start.headers["location"]).query)
        self.idp.nonce, self.idp.claims = self.idp.asked["nonce"][0], claims
        flow = start.headers["set-cookie"].split(";", 1)[0]
        return await self.client.get("/_lapse/oidc/callback", params={"code": "c", "state": self.idp.asked["state"][0]},
                                     headers={"cookie": "; ".join(x for x in (flow, cookie) if x), "accept": "text/html"})

    async def sign_in(self, next_: str = "/", step_up: bool = False, cookie: str = "", **claims: Any) -> httpx.Response:
        return await self.back(await self.start(next_, step_up), cookie, **claims)

    async def logins(self) -> list[tuple[str, str | None]]:
        return [(e.outcome, e.reason) for e in await self.rt.store.tail_audit(100) if e.event == "auth.login"]


def cookie_of(r: httpx.Response) -> str:
    return r.headers.get_list("set-cookie")[0].split(";")[0]


def run(tmp_path: Path, body: Any, config: str = CONFIG) -> None:
    async def main() -> None:
        loaded = parse_config(config, str(tmp_path / "lapse.toml"), tmp_path)
        async with open_runtime(loaded) as rt:
            gw = Gateway(rt)
            idp = FakeIdp()
            gw.oidc.provider = Provider(loaded.config.oidc, client=httpx.AsyncClient(transport=httpx.MockTransport(idp)))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gw), base_url="http://127.0.0.1:8080") as c:
                await body(Rp(rt, gw, idp, c))
            await gw.oidc.provider.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("step_up", [False, True])
def test_max_age_is_the_post_only_rules_max_auth_age_though_the_login_is_a_get(tmp_path: Path, step_up: bool) -> None:
    """A privileged rule for POST /admin/* (5 min) is what a login for /admin/x must ask, not the 8 h absolute."""
    async def body(rp: Rp) -> None:
        start = await rp.start("/admin/x", step_up)
        asked = parse_qs(urlsplit(start.headers["location"]).query)
        assert asked["max_age"] == ["300"]
        assert asked.get("prompt") == (["login"] if step_up else None)
        elsewhere = parse_qs(urlsplit((await rp.start("/wiki")).headers["location"]).query)
        assert elsewhere["max_age"] == [str(8 * 3600)]
    run(tmp_path, body)


def test_a_step_up_answered_with_an_old_sign_in_is_refused(tmp_path: Path) -> None:
    """The IdP ignored prompt=login and max_age: a 2-hour-old auth_time must not complete the step-up."""
    async def body(rp: Rp) -> None:
        first = await rp.sign_in()
        assert first.status_code == 303
        r = await rp.sign_in("/admin/x", step_up=True, cookie=cookie_of(first), auth_time=int(time.time()) - 7200)
        assert r.status_code == 400 and "did not ask you to" in r.text
        assert [c.split("=")[0] for c in r.headers.get_list("set-cookie")] == [rp.gw.oidc.flow_cookie]  # cleared
        assert await rp.logins() == [("success", "oidc"), ("failure", "stale_auth_time")]
        assert len(await rp.rt.store.sessions()) == 1
    run(tmp_path, body)


def test_a_step_up_for_a_new_ip_answered_with_an_old_sign_in_is_refused(tmp_path: Path) -> None:
    """on_ip_change = step_up: max_age is the 8 h absolute, so a 3-hour-old auth_time passed it; it predates the
    step-up, so the user never signed in again."""
    async def body(rp: Rp) -> None:
        old = int(time.time()) - 3 * 3600
        first = await rp.sign_in(auth_time=old)
        assert first.status_code == 303
        r = await rp.sign_in(step_up=True, cookie=cookie_of(first), auth_time=old)
        assert r.status_code == 400
        assert await rp.logins() == [("success", "oidc"), ("failure", "stale_auth_time")]
        fresh = await rp.sign_in(step_up=True, cookie=cookie_of(first), auth_time=int(time.time()))
        assert fresh.status_code == 303 and fresh.headers["location"] == "/"
        assert await rp.logins() == [("success", "oidc"), ("failure", "stale_auth_time"), ("success", "oidc")]
    run(tmp_path, body, IP_STEP_UP)


@pytest.mark.parametrize("over", [1, 30, 59])
def test_an_auth_time_just_past_max_age_asks_again_instead_of_a_session_past_its_limit(
        tmp_path: Path, over: int) -> None:
    """Within the 60 s skew allowance the session would be born past its 8 h absolute limit: ask with prompt=login."""
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(auth_time=int(time.time()) - 8 * 3600 - over)
        assert r.status_code == 303 and r.headers["location"].startswith(ISS + "/auth?")
        asked = parse_qs(urlsplit(r.headers["location"]).query)
        assert (asked["prompt"], asked["max_age"]) == (["login"], [str(8 * 3600)])
        assert await rp.rt.store.sessions() == [] and await rp.logins() == []
        again = await rp.back(r, auth_time=int(time.time()) - 5)  # the IdP asked this time
        assert again.status_code == 303 and again.headers["location"] == "/"
        assert await rp.logins() == [("success", "oidc")]
    run(tmp_path, body)
