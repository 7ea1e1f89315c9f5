"""The back-channel logout endpoint in-process, with an IdP whose keys the test holds.

(tests/oidc/test_idp.py covers the same endpoint with the real provider's calls;
here the test signs tokens itself, so every BCL rule and the replay window can
be tried.) Requirement IDs: ../shared/research/standards-checklist.md.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from lapse.config import parse_config
from lapse.runtime import open_runtime
from lapse.sso import provider as provider_mod
from lapse.sso.provider import Provider
from lapse.sso.tokens import BACKCHANNEL_EVENT
from lapse.store.base import SsoLink, StoreUnavailable
from lapse.web import Gateway

ISS = "https://idp.test"
KEY1 = RSAKey.generate_key(2048, parameters={"kid": "one"}, private=True)
KEY2 = RSAKey.generate_key(2048, parameters={"kid": "two"}, private=True)

CONFIG = f"""
[store]
url = "sqlite:///state/lapse.db"

[audit]
sinks = ["store"]

[oidc]
issuer = "{ISS}"
client_id = "lapse"
client_secret = "not-used-here"
require_logout_typ = true
"""


class FakeIdp:
    """Discovery and a JWKS the test can rotate; counts JWKS fetches."""

    def __init__(self) -> None:
        self.keys = [KEY1]
        self.jwks_fetches = 0
        self.jwks_status = 200  # anything else: the JWKS endpoint is failing

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={
                "issuer": ISS, "authorization_endpoint": ISS + "/auth", "token_endpoint": ISS + "/token",
                "jwks_uri": ISS + "/jwks", "end_session_endpoint": ISS + "/logout",
                "id_token_signing_alg_values_supported": ["RS256"], "backchannel_logout_supported": True,
            })
        if request.url.path == "/jwks":
            self.jwks_fetches += 1
            if self.jwks_status != 200:
                return httpx.Response(self.jwks_status)
            return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]})
        return httpx.Response(404)


def logout_token(key: RSAKey = KEY1, typ: str | None = "logout+jwt", **changes: Any) -> str:
    now = time.time()
    claims = {"iss": ISS, "aud": "lapse", "iat": int(now), "exp": int(now) + 120, "jti": f"j-{now}",
              "sub": "alice-sub", "sid": "S1", "events": {BACKCHANNEL_EVENT: {}}}
    claims.update(changes)
    header = {"alg": "RS256", "kid": key.kid, **({"typ": typ} if typ else {})}
    return jwt.encode(header, {k: v for k, v in claims.items() if v is not None}, key)


async def _setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    monkeypatch.setattr(provider_mod, "JWKS_MIN_INTERVAL", 0.0)
    loaded = parse_config(CONFIG, str(tmp_path / "lapse.toml"), tmp_path)
    cm = open_runtime(loaded)
    rt = await cm.__aenter__()
    gw = Gateway(rt)
    idp = FakeIdp()
    gw.oidc.provider = Provider(loaded.config.oidc, client=httpx.AsyncClient(transport=httpx.MockTransport(idp)))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(gw), base_url="http://127.0.0.1:8080")

    async def session(sid: str | None, sub: str = "alice-sub", user: str = "alice") -> str:
        raw, decision = await gw.gate.sign_in(user)
        k = decision.session.key
        await rt.store.put_link(SsoLink(k, ISS, sub, sid, "id.tok.en", None, False, time.time(), time.time() + 9e4))
        return k

    async def post(token: str | None, **extra: str) -> httpx.Response:
        data = {"logout_token": token, **extra} if token is not None else extra
        return await client.post("/_lapse/oidc/backchannel-logout", data=data)

    async def alive(k: str) -> bool:
        s, _ = await rt.store.read(k)
        return not s.ended

    return cm, rt, idp, session, post, alive, client


def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: Any) -> None:
    async def main() -> None:
        cm, rt, idp, session, post, alive, client = await _setup(tmp_path, monkeypatch)
        try:
            await body(rt=rt, idp=idp, session=session, post=post, alive=alive)
        finally:
            await client.aclose()
            await cm.__aexit__(None, None, None)

    asyncio.run(main())


def test_sid_ends_that_session_only_and_extra_fields_are_ignored(tmp_path, monkeypatch) -> None:
    """[BCL 2.5, 2.7 / checklist 87, 90] sid -> only S1 dies; unknown form fields are ignored; 200 + no-store."""
    async def body(rt, idp, session, post, alive):
        s1, s2 = await session("S1"), await session("S2")
        r = await post(logout_token(), extra="1")
        assert (r.status_code, r.headers["cache-control"]) == (200, "no-store")
        assert not await alive(s1) and await alive(s2)
        ends = [e for e in await rt.store.tail_audit(100) if e.event == "session.revoked"]
        assert [(e.session, e.reason) for e in ends] == [(s1, "backchannel")]
    run(tmp_path, monkeypatch, body)


def test_sub_without_sid_ends_every_session_of_that_subject(tmp_path, monkeypatch) -> None:
    """[BCL 2.4, 2.7 / checklist 90] no sid: all sessions of iss+sub; another subject's survive."""
    async def body(rt, idp, session, post, alive):
        a1, a2, b1 = await session("S1"), await session("S2"), await session("S3", sub="bob-sub", user="bob")
        assert (await post(logout_token(sid=None))).status_code == 200
        assert not await alive(a1) and not await alive(a2) and await alive(b1)
    run(tmp_path, monkeypatch, body)


def test_already_ended_or_unknown_sessions_are_a_success(tmp_path, monkeypatch) -> None:
    """[BCL 2.7 / checklist 56] a logout for a user already logged out at the RP has succeeded."""
    async def body(rt, idp, session, post, alive):
        await session("S1")
        assert (await post(logout_token())).status_code == 200
        assert (await post(logout_token())).status_code == 200  # a new jti for the same sid
        assert (await post(logout_token(sid="never-seen"))).status_code == 200
    run(tmp_path, monkeypatch, body)


def test_a_replayed_jti_is_refused_and_the_session_lives(tmp_path, monkeypatch) -> None:
    """[BCL 2.6 step 8 / checklist 89] jti seen before within the window -> 400."""
    async def body(rt, idp, session, post, alive):
        token = logout_token(sid="nobody")
        assert (await post(token)).status_code == 200
        s1 = await session("S1")
        replay = await post(token)
        assert replay.status_code == 400 and replay.json()["error_description"] == "replayed_jti"
        assert await alive(s1)
        refused = [e for e in await rt.store.tail_audit(100) if e.event == "auth.backchannel_logout"]
        assert [(e.outcome, e.reason) for e in refused] == [("failure", "replayed_jti")]
    run(tmp_path, monkeypatch, body)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: logout_token(nonce="n"), "nonce_present"),
        (lambda: logout_token(events=None), "bad_events"),
        (lambda: logout_token(typ=None), "bad_typ"),  # require_logout_typ = true
        (lambda: logout_token(aud="other"), "bad_aud"),
        (lambda: logout_token(iss="https://evil.test"), "bad_iss"),
        (lambda: logout_token(exp=int(time.time()) - 600), "expired"),
        (lambda: logout_token(sub=None, sid=None), "missing_sub_and_sid"),
        (lambda: logout_token(key=RSAKey.generate_key(2048, parameters={"kid": "one"}, private=True)), "bad_signature"),
    ],
)
def test_each_invalid_token_is_a_400_and_ends_nothing(tmp_path, monkeypatch, token, reason) -> None:
    """[BCL 2.6, 2.8 / checklist 89, 91, 92] one negative case per rule; the session stays alive."""
    async def body(rt, idp, session, post, alive):
        s1 = await session("S1")
        r = await post(token())
        assert (r.status_code, r.headers["cache-control"]) == (400, "no-store")
        assert r.json() == {"error": "invalid_request", "error_description": reason}
        assert await alive(s1)
    run(tmp_path, monkeypatch, body)


def test_a_rotated_key_is_fetched_once_and_made_up_kids_cannot_hammer_the_idp(tmp_path, monkeypatch) -> None:
    async def body(rt, idp, session, post, alive):
        s1 = await session("S1")
        assert (await post(logout_token(sid="x"))).status_code == 200
        assert idp.jwks_fetches == 1
        idp.keys = [KEY1, KEY2]  # the IdP rotates: tokens now come signed with "two"
        assert (await post(logout_token(key=KEY2))).status_code == 200
        assert idp.jwks_fetches == 2 and not await alive(s1)
        monkeypatch.setattr(provider_mod, "JWKS_MIN_INTERVAL", 3600.0)
        stranger = RSAKey.generate_key(2048, parameters={"kid": "three"}, private=True)
        for _ in range(5):
            assert (await post(logout_token(key=stranger))).status_code == 400
        assert idp.jwks_fetches == 2  # rate-limited: no refetch for made-up kids
    run(tmp_path, monkeypatch, body)


def test_a_deeply_nested_header_is_a_400_with_an_audit_event_not_a_500(tmp_path, monkeypatch) -> None:
    """M4: b64url("[" * 6000) as the JOSE header used to raise RecursionError out of json.loads (a 500)."""
    async def body(rt, idp, session, post, alive):
        s1 = await session("S1")
        head = base64.urlsafe_b64encode(b"[" * 6000).rstrip(b"=").decode()
        r = await post(head + ".e30.c2ln")
        assert (r.status_code, r.headers["cache-control"]) == (400, "no-store")
        assert r.json() == {"error": "invalid_request", "error_description": "malformed"}
        assert await alive(s1)
        refused = [e for e in await rt.store.tail_audit(100) if e.event == "auth.backchannel_logout"]
        assert [(e.outcome, e.reason) for e in refused] == [("failure", "malformed")]
    run(tmp_path, monkeypatch, body)


def _fail_once(obj: Any, name: str, after: int = 0) -> list[int]:
    """Make ``obj.name`` raise StoreUnavailable on its call number ``after`` (0: the first), once; returns the count."""
    real, calls = getattr(obj, name), [0]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == after + 1:
            raise StoreUnavailable("simulated blip")
        return await real(*args, **kwargs)
    setattr(obj, name, flaky)
    return calls


def _ends(events: list[Any]) -> list[tuple[str | None, str | None]]:
    return [(e.session, e.reason) for e in events if e.event == "session.revoked"]


def test_a_store_blip_answers_503_and_the_ops_retry_of_the_same_token_ends_the_session(tmp_path, monkeypatch) -> None:
    """BCL 2.5: the OP retries after a recoverable error; the jti must not be used up by the failed attempt."""
    async def body(rt, idp, session, post, alive):
        s1 = await session("S1")
        token = logout_token()
        _fail_once(rt.store, "find_links")
        first = await post(token)
        assert (first.status_code, first.headers["cache-control"]) == (503, "no-store")
        assert await alive(s1)
        retry = await post(token)
        assert (retry.status_code, retry.headers["cache-control"]) == (200, "no-store")
        assert not await alive(s1)
        assert _ends(await rt.store.tail_audit(100)) == [(s1, "backchannel")]
        replay = await post(token)  # once it worked, the jti is used up
        assert replay.status_code == 400 and replay.json()["error_description"] == "replayed_jti"
    run(tmp_path, monkeypatch, body)


def test_a_blip_halfway_through_the_revocations_is_retried_without_a_second_end(tmp_path, monkeypatch) -> None:
    """The retry ends what is left; what the first attempt ended stays ended, with its one session.revoked."""
    async def body(rt, idp, session, post, alive):
        a1, a2 = await session("S1"), await session("S2")
        token = logout_token(sid=None)
        _fail_once(rt.store, "write", after=1)  # the first is revoked, the second's write fails
        assert (await post(token)).status_code == 503
        assert sorted([await alive(a1), await alive(a2)]) == [False, True]
        assert (await post(token)).status_code == 200
        assert [await alive(a1), await alive(a2)] == [False, False]
        assert sorted(_ends(await rt.store.tail_audit(100))) == sorted([(a1, "backchannel"), (a2, "backchannel")])
    run(tmp_path, monkeypatch, body)


@pytest.mark.parametrize("jwks_status", [500, 404])
def test_an_unreachable_jwks_is_a_retryable_503_not_a_final_400(tmp_path, monkeypatch, jwks_status) -> None:
    """BCL 2.8: 400 tells the OP the token is bad (no retry); lapse merely could not check it yet."""
    async def body(rt, idp, session, post, alive):
        s1 = await session("S1")
        token = logout_token()
        idp.jwks_status = jwks_status
        r = await post(token)
        assert (r.status_code, r.headers["cache-control"], r.headers["retry-after"]) == (503, "no-store", "30")
        assert r.json() == {"error": "temporarily_unavailable", "error_description": "idp_error"}
        assert await alive(s1)
        refused = [e for e in await rt.store.tail_audit(100) if e.event == "auth.backchannel_logout"]
        assert [(e.outcome, e.reason) for e in refused] == [("failure", "idp_error")]
        idp.jwks_status = 200
        assert (await post(token)).status_code == 200
        assert not await alive(s1)
    run(tmp_path, monkeypatch, body)


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_405_and_not_cached(tmp_path, monkeypatch, method) -> None:
    """BCL 2.8: the response SHOULD carry Cache-Control: no-store; the refusal of a method too."""
    async def main() -> None:
        cm, _rt, _idp, _session, _post, _alive, client = await _setup(tmp_path, monkeypatch)
        try:
            r = await client.request(method, "/_lapse/oidc/backchannel-logout")
            assert (r.status_code, r.headers["cache-control"], r.headers["allow"]) == (405, "no-store", "POST")
        finally:
            await client.aclose()
            await cm.__aexit__(None, None, None)
    asyncio.run(main())
