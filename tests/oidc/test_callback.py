"""The OIDC callback in-process, with an IdP whose keys and ID token claims the test holds.

(tests/oidc/test_idp.py covers the callback against a real provider; here the
test writes the ID token itself, so user names and groups an IdP should not
send can be tried.) H3: an IdP user must not share a local user's name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from lapse.config import parse_config
from lapse.identity import hash_password
from lapse.runtime import open_runtime
from lapse.sso.provider import Provider
from lapse.store.base import User
from lapse.web import Gateway

ISS = "https://idp.test"
KEY = RSAKey.generate_key(2048, parameters={"kid": "one"}, private=True)

CONFIG = f"""
[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[oidc]
issuer = "{ISS}"
client_id = "lapse"
client_secret = "not-used-here"
admin_groups = ["lapse-admins"]
"""


class FakeIdp:
    """Discovery, a JWKS and a token endpoint that answers with an ID token of ``claims`` (the nonce added)."""

    def __init__(self) -> None:
        self.claims: dict[str, Any] = {}
        self.nonce = ""
        self.id_token = ""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISS, "authorization_endpoint": ISS + "/auth", "token_endpoint": ISS + "/token",
                "jwks_uri": ISS + "/jwks", "id_token_signing_alg_values_supported": ["RS256"],
            })
        if request.url.path == "/jwks":
            return httpx.Response(200, json={"keys": [KEY.as_dict(private=False)]})
        if request.url.path == "/token":
            now = int(time.time())
            claims = {"iss": ISS, "aud": "lapse", "iat": now, "exp": now + 300, "auth_time": now,
                      "nonce": self.nonce, "sub": "alice-sub", **self.claims}
            self.id_token = jwt.encode({"alg": "RS256", "kid": "one"}, claims, KEY)
            return httpx.Response(200, json={"id_token": self.id_token, "token_type": "Bearer"})
        return httpx.Response(404)


class Rp:
    def __init__(self, rt: Any, gw: Gateway, idp: FakeIdp, client: httpx.AsyncClient) -> None:
        self.rt, self.gw, self.idp, self.client = rt, gw, idp, client

    async def sign_in(self, **claims: Any) -> httpx.Response:
        """The whole login: start, 'the IdP' answers with ``claims``, the callback's response."""
        self.idp.claims = claims
        start = await self.client.get("/_lapse/oidc/login", params={"next": "/"})
        assert start.status_code == 303, start.text
        query = parse_qs(urlsplit(start.headers["location"]).query)
        self.idp.nonce = query["nonce"][0]
        cookie = start.headers["set-cookie"].split(";", 1)[0]
        return await self.client.get("/_lapse/oidc/callback", params={"code": "c", "state": query["state"][0]},
                                     headers={"cookie": cookie, "accept": "text/html"})

    async def logins(self) -> list[tuple[str, str | None, str | None]]:
        return [(e.outcome, e.user, e.reason) for e in await self.rt.store.tail_audit(100) if e.event == "auth.login"]

    async def users_signed_in(self) -> list[str]:
        return [s.user for s in await self.rt.store.sessions()]


def run(tmp_path: Path, body: Any, config: str = CONFIG) -> None:
    async def main() -> None:
        loaded = parse_config(config, str(tmp_path / "lapse.toml"), tmp_path)
        async with open_runtime(loaded) as rt:
            gw = Gateway(rt)
            idp = FakeIdp()
            gw.oidc.provider = Provider(loaded.config.oidc,
                                        client=httpx.AsyncClient(transport=httpx.MockTransport(idp)))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(gw), base_url="http://127.0.0.1:8080") as c:
                await body(Rp(rt, gw, idp, c))
            await gw.oidc.provider.aclose()

    asyncio.run(main())


def test_a_good_user_name_signs_in_as_itself(tmp_path: Path) -> None:
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(preferred_username="carol@example.test")
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert await rp.users_signed_in() == ["carol@example.test"]
    run(tmp_path, body)


@pytest.mark.parametrize("name", ["", " ", "root\n", "a b", "a,b", "../x", "-x", "x" * 65, "Zoë", 42, ["admin"]])
def test_an_unusable_username_claim_falls_back_to_a_usable_sub(tmp_path: Path, name: Any) -> None:
    """H3 (a): the username claim must pass lapse.identity.check_name, else ``sub`` is the user name."""
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(preferred_username=name)
        assert r.status_code == 303, r.text
        assert await rp.users_signed_in() == ["alice-sub"]
    run(tmp_path, body)


def test_neither_a_usable_username_claim_nor_sub_refuses_the_login(tmp_path: Path) -> None:
    """H3 (a): no usable name at all -> no session, auth.login failure ``bad_username``, a page that says why."""
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(preferred_username="a\x1fb", sub="user|1234 5")
        assert r.status_code == 400
        assert "user name" in r.text and "administrator" in r.text
        assert r.headers["cache-control"] == "no-store"
        assert await rp.users_signed_in() == []
        assert await rp.logins() == [("failure", None, "bad_username")]
    run(tmp_path, body)


@pytest.mark.parametrize("name", ["admin", "ADMIN", "Admin"])
def test_an_idp_user_named_like_a_local_user_is_refused(tmp_path: Path, name: str) -> None:
    """H3 (b): preferred_username = a local admin's name must not become that admin (case ignored)."""
    async def body(rp: Rp) -> None:
        await rp.rt.store.put_user(User("admin", hash_password("correct horse battery"), admin=True))
        r = await rp.sign_in(preferred_username=name)
        assert r.status_code == 403
        assert "local lapse account" in r.text and "ask an administrator" in r.text
        assert "__Host-lapse=" not in r.headers.get("set-cookie", "")  # no session cookie
        assert await rp.users_signed_in() == []
        assert await rp.logins() == [("failure", name, "local_user_conflict")]
    run(tmp_path, body)


def test_a_sub_fallback_named_like_a_local_user_is_refused_too(tmp_path: Path) -> None:
    """H3 (b): the rule holds whichever claim gave the name."""
    async def body(rp: Rp) -> None:
        await rp.rt.store.put_user(User("alice-sub", hash_password("correct horse battery")))
        r = await rp.sign_in()
        assert r.status_code == 403 and await rp.users_signed_in() == []
        assert await rp.logins() == [("failure", "alice-sub", "local_user_conflict")]
    run(tmp_path, body)


def test_group_names_with_a_comma_or_control_character_are_dropped_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """H3 (d): a group "finance,lapse-admins" must not read as two groups in Remote-Groups (nor make an admin)."""
    async def body(rp: Rp) -> None:
        with caplog.at_level(logging.WARNING, logger="lapse.sso"):
            r = await rp.sign_in(preferred_username="carol",
                                 groups=["wiki", "finance,lapse-admins", "x\ny", "tab\t", "del\x7f", "c1\x85", "ok"])
        assert r.status_code == 303
        (session,) = await rp.rt.store.sessions()
        assert session.groups == ("wiki", "ok")
        link = await rp.rt.store.get_link(session.key)
        assert link is not None and not link.admin
        warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
        assert len(warnings) == 1 and "5 group name(s)" in warnings[0].getMessage()
        assert rp.idp.id_token and rp.idp.id_token not in caplog.text
    run(tmp_path, body)


# ------------------------------------------------- the name is bound to (iss, sub)


@pytest.mark.parametrize("second", ["bob", "BOB"])
def test_a_second_idp_account_presenting_a_bound_name_is_refused(tmp_path: Path, second: str) -> None:
    """Core 5.7: preferred_username is not unique; the first account to sign in as "bob" keeps the name."""
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(sub="sub-of-bob", preferred_username="bob")
        assert r.status_code == 303
        evil = await rp.sign_in(sub="sub-of-mallory", preferred_username=second)
        assert evil.status_code == 403
        assert "already belongs to another account" in evil.text and "administrator" in evil.text
        assert "__Host-lapse=" not in evil.headers.get("set-cookie", "")
        assert await rp.users_signed_in() == ["bob"]
        assert await rp.logins() == [("success", "bob", "oidc"), ("failure", second, "name_taken")]
        assert await rp.rt.store.claim("oidc-user:bob", "probe") == f'["{ISS}","sub-of-bob"]'
        again = await rp.sign_in(sub="sub-of-bob", preferred_username="Bob")  # the owner, in any case
        assert again.status_code == 303
        assert await rp.users_signed_in() == ["bob", "Bob"]
    run(tmp_path, body)


def test_the_sub_fallback_name_is_bound_too(tmp_path: Path) -> None:
    """A name taken through the sub fallback cannot be presented as another account's preferred_username."""
    async def body(rp: Rp) -> None:
        assert (await rp.sign_in(sub="alice-sub")).status_code == 303
        r = await rp.sign_in(sub="someone-else", preferred_username="alice-sub")
        assert r.status_code == 403
        assert await rp.logins() == [("success", "alice-sub", "oidc"), ("failure", "alice-sub", "name_taken")]
    run(tmp_path, body)


EMAIL_CONFIG = CONFIG.replace('admin_groups = ["lapse-admins"]', 'admin_groups = ["lapse-admins"]\nusername_claim = "email"')


@pytest.mark.parametrize("verified", [None, False, "true", 1])
def test_an_unverified_email_is_not_a_user_name(tmp_path: Path, verified: Any) -> None:
    """username_claim = "email" needs email_verified exactly true; anything else refuses the sign-in."""
    async def body(rp: Rp) -> None:
        claims = {"email": "ceo@example.test"} | ({} if verified is None else {"email_verified": verified})
        r = await rp.sign_in(**claims)
        assert r.status_code == 403 and "not verified your email" in r.text
        assert await rp.users_signed_in() == []
        assert await rp.logins() == [("failure", None, "email_not_verified")]
    run(tmp_path, body, EMAIL_CONFIG)


def test_a_verified_email_is_the_user_name(tmp_path: Path) -> None:
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(email="ceo@example.test", email_verified=True)
        assert r.status_code == 303
        assert await rp.users_signed_in() == ["ceo@example.test"]
    run(tmp_path, body, EMAIL_CONFIG)
