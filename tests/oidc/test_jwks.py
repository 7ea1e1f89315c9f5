"""The JWKS cache (lapse.sso.provider): a key the IdP withdraws stops verifying; a failing IdP is ridden out, briefly.

An IdP rotates by overlap (Keycloak, Okta, Entra): the JWKS gains "new" while
"old" still signs, tokens switch to "new", then "old" is withdrawn. Refetching
only for an unknown kid would trust "old" until the next rotation or restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from lapse.config import parse_config
from lapse.sso.provider import JWKS_GRACE, Provider, ProviderError, keys_ttl
from lapse.sso.tokens import BACKCHANNEL_EVENT, TokenError

ISS = "https://idp.test"
OLD = RSAKey.generate_key(2048, parameters={"kid": "old"}, private=True)
NEW = RSAKey.generate_key(2048, parameters={"kid": "new"}, private=True)
CFG = parse_config(f'[oidc]\nissuer = "{ISS}"\nclient_id = "lapse"\nclient_secret = "x"\n', "/nonexistent/lapse.toml"
                   ).config.oidc


class Idp:
    """Discovery and a JWKS whose keys, Cache-Control and health the test sets; counts JWKS requests."""

    def __init__(self) -> None:
        self.keys = [OLD]
        self.cache_control: str | None = None
        self.down = False
        self.fetches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/openid-configuration"):
            return httpx.Response(200, json={"issuer": ISS, "authorization_endpoint": ISS + "/a",
                                             "token_endpoint": ISS + "/t", "jwks_uri": ISS + "/jwks"})
        self.fetches += 1
        if self.down:
            return httpx.Response(503)
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]}, headers=headers)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def id_token(key: RSAKey) -> str:
    now = time.time()
    return jwt.encode({"alg": "RS256", "kid": key.kid}, {"iss": ISS, "aud": "lapse", "sub": "alice", "iat": now,
                                                        "exp": now + 300, "nonce": "n", "auth_time": now}, key)


def logout_token(key: RSAKey) -> str:
    now = time.time()
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "logout+jwt"},
                      {"iss": ISS, "aud": "lapse", "sub": "alice", "iat": now, "exp": now + 120, "jti": str(now),
                       "events": {BACKCHANNEL_EVENT: {}}}, key)


def run(body: Any) -> None:
    async def main() -> None:
        idp, clock = Idp(), Clock()
        provider = Provider(CFG, client=httpx.AsyncClient(transport=httpx.MockTransport(idp)), monotonic=clock)
        try:
            await body(provider, idp, clock)
        finally:
            await provider.aclose()
    asyncio.run(main())


async def accepted(provider: Provider, key: RSAKey) -> bool:
    try:
        await provider.check_id_token(id_token(key), nonce="n", now=time.time())
    except TokenError as exc:
        assert exc.reason == "unknown_key"
        return False
    return True


def test_a_withdrawn_key_stops_verifying_once_the_cached_set_is_an_hour_old() -> None:
    async def body(provider: Provider, idp: Idp, clock: Clock) -> None:
        assert await accepted(provider, OLD) and idp.fetches == 1
        clock.t += 86400
        idp.keys = [OLD, NEW]
        assert await accepted(provider, NEW) and idp.fetches == 2  # stale anyway: one fetch
        idp.keys = [NEW]  # "old" withdrawn
        clock.t += 3599
        assert await accepted(provider, OLD)  # still within the hour the cached set may be kept
        clock.t += 1
        assert not await accepted(provider, OLD)
        assert idp.fetches == 3  # one refetch of the whole set; the unknown kid is then rate-limited
        with pytest.raises(TokenError) as info:
            await provider.check_logout_token(logout_token(OLD), now=time.time())
        assert info.value.reason == "unknown_key" and idp.fetches == 3
        assert await accepted(provider, NEW)
    run(body)


@pytest.mark.parametrize(("header", "ttl"), [
    (None, 3600.0), ("max-age=600", 600.0), ("public, max-age=900, must-revalidate", 900.0),
    ("max-age=10", 300.0), ("max-age=0", 300.0), ("no-cache", 300.0), ("no-store", 300.0),
    ("max-age=86400", 3600.0), ("max-age=abc", 3600.0), ("private", 3600.0), ('max-age="1200"', 1200.0),
])
def test_cache_control_max_age_is_honoured_between_5_minutes_and_an_hour(header: str | None, ttl: float) -> None:
    assert keys_ttl(header) == ttl


@pytest.mark.parametrize(("header", "ttl"), [("max-age=600", 600.0), ("max-age=5", 300.0), ("max-age=99999", 3600.0)])
def test_the_refetch_follows_the_jwks_responses_max_age(header: str, ttl: float) -> None:
    async def body(provider: Provider, idp: Idp, clock: Clock) -> None:
        idp.cache_control = header
        assert await accepted(provider, OLD) and idp.fetches == 1
        idp.keys = [NEW]
        clock.t += ttl - 1
        assert await accepted(provider, OLD) and idp.fetches == 1
        clock.t += 1
        assert not await accepted(provider, OLD) and idp.fetches == 2
    run(body)


def test_a_failing_refetch_keeps_the_cached_set_for_the_grace_period_then_refuses(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(provider: Provider, idp: Idp, clock: Clock) -> None:
        assert await accepted(provider, OLD)
        idp.down = True
        clock.t += 3600
        with caplog.at_level(logging.WARNING, logger="lapse.sso"):
            for _ in range(5):
                assert await accepted(provider, OLD)  # the IdP's hiccup does not stop sign-ins
                clock.t += 2
            assert idp.fetches == 2  # retried at most every 10 s
            clock.t += 10
            assert await accepted(provider, OLD) and idp.fetches == 3
        assert len([r for r in caplog.records if "cannot refetch" in r.getMessage()]) == 1  # said once
        clock.t = 1000.0 + 3600 + JWKS_GRACE
        with pytest.raises(ProviderError):
            await provider.check_id_token(id_token(OLD), nonce="n", now=time.time())
        clock.t += 1
        with pytest.raises(ProviderError):  # refused without asking again within 10 s
            await provider.check_logout_token(logout_token(OLD), now=time.time())
        idp.down, idp.keys = False, [NEW]
        clock.t += 10
        assert await accepted(provider, NEW) and not await accepted(provider, OLD)
    run(body)
