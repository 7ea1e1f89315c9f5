"""Refresh tokens of ended sessions are revoked at the real IdP (RFC 7009; checklist 99, ASVS 5.0 10.4).

Each test ends a session one way (sign-out without following the IdP's logout,
an administrator, the sweeper) and then presents that session's refresh token at
the IdP's token endpoint, as a thief holding a copy of the store would: the IdP
must answer ``invalid_grant``, while a session that still lives keeps a token
the IdP honours. Nothing here follows the browser to the IdP's end-session
endpoint, whose logout would revoke the grant by itself.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from lapse.config import parse_config
from lapse.core.decide import revoke
from lapse.enforce import NOTHING, Gate
from lapse.runtime import open_runtime
from lapse.sso.provider import REVOKE_TIMEOUT, Provider
from lapse.store.base import SsoLink
from lapse.web import Gateway

from .conftest import SECRET, Browser, Idp, Lapse
from .test_backchannel import CONFIG, ISS, FakeIdp
from .test_idp import key


def refresh_token(lapse: Lapse, sid: str) -> str:
    """The refresh token the IdP issued to this session (opened from its sealed link)."""
    link = lapse.call(lapse.rt.store.get_link(key(lapse, sid)))
    return lapse.rt.sealer.open(link.refresh_token, f"oidc:{link.session}")


def refresh_at_idp(idp: Idp, client: str, token: str) -> httpx.Response:
    """A refresh grant straight at the IdP's token endpoint, with the client's credentials."""
    endpoint = httpx.get(idp.url + "/.well-known/openid-configuration").json()["token_endpoint"]
    return httpx.post(endpoint, data={"grant_type": "refresh_token", "refresh_token": token},
                      auth=(client, SECRET))


def drain(lapse: Lapse) -> None:
    """Wait for the revocations queued by the ends so far (what shutdown does)."""
    lapse.call(lapse.gateway.oidc.revoker.drain())


def refused(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json().get("error", "")


def test_sign_out_revokes_the_refresh_token_at_the_idp_and_only_that_one(make_lapse, browser_for, idp):
    lapse = make_lapse()
    b: Browser = browser_for(lapse)
    b.sign_in()
    other: Browser = browser_for(lapse)
    other.sign_in()
    ended = key(lapse, b.sid)
    gone, kept = refresh_token(lapse, b.sid), refresh_token(lapse, other.sid)
    assert "revocation_endpoint" in httpx.get(idp.url + "/.well-known/openid-configuration").json()
    csrf = b.get("/_lapse/session").json()["csrf_token"]
    r = b.post("/_lapse/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"].startswith(idp.url + "/session/end")  # not followed
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp1", gone)) == (400, "invalid_grant")
    assert refresh_at_idp(idp, "rp1", kept).status_code == 200  # the other session's grant lives
    link = lapse.call(lapse.rt.store.get_link(ended))
    assert link.refresh_token is None  # dropped from the store
    assert link.id_token is not None  # still the id_token_hint of a sign-out after expiry
    assert [e["reason"] for e in lapse.events("session.revoked")] == ["logout"]


def test_an_admin_revocation_revokes_the_refresh_token_and_adds_no_audit_event(make_lapse, browser_for, idp):
    lapse = make_lapse()
    admin: Browser = browser_for(lapse)
    admin.sign_in(user="alice")  # in lapse-admins
    bob: Browser = browser_for(lapse)
    bob.sign_in(user="bob")
    token, bobs = refresh_token(lapse, bob.sid), key(lapse, bob.sid)
    page = admin.get("/_lapse/admin", headers={"accept": "text/html"})
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = admin.post("/_lapse/admin/revoke", data={"user": "bob", "csrf_token": csrf}, headers={"accept": "text/html"})
    assert r.status_code == 303
    events = lapse.events()
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp1", token)) == (400, "invalid_grant")
    assert lapse.events() == events  # revoking at the IdP is no session event of its own
    assert [(e["reason"], e["session"]) for e in lapse.events("session.revoked")] == [("admin", bobs)]


def test_an_expiry_by_the_sweeper_revokes_the_refresh_token(make_lapse, browser_for, idp):
    lapse = make_lapse(client="rp2")
    b: Browser = browser_for(lapse)
    b.sign_in()
    token = refresh_token(lapse, b.sid)
    lapse.clock.advance(31 * 60)  # past the 30m idle (lapse's clock; the IdP's grant is days long)
    assert lapse.call(lapse.gateway.gate.sweep_once()) == 1
    drain(lapse)
    assert refused(refresh_at_idp(idp, "rp2", token)) == (400, "invalid_grant")
    assert [e["reason"] for e in lapse.events("session.expired")] == ["idle"]


def test_a_revocation_from_the_cli_revokes_the_refresh_token_before_the_command_exits(make_lapse, browser_for, idp):
    """``lapse sessions revoke`` (like ``users disable``/``delete``) runs in its own process, with no gateway:
    its ends revoke too, and the command waits for them."""
    lapse = make_lapse()
    b: Browser = browser_for(lapse)
    b.sign_in()
    token = refresh_token(lapse, b.sid)
    config = lapse.rt.loaded.base_dir / "lapse.toml"
    done = subprocess.run([sys.executable, "-m", "lapse", "--config", str(config), "sessions", "revoke",
                           "--user", "alice"], capture_output=True, text=True, timeout=60, cwd=config.parent)
    assert (done.returncode, done.stdout) == (0, "ended 1 session(s)\n"), done.stderr
    assert refused(refresh_at_idp(idp, "rp1", token)) == (400, "invalid_grant")
    assert [e["reason"] for e in lapse.events("session.revoked")] == ["admin"]


# ------------------------------------------------------------------ in process, an IdP the test scripts


class RevokingIdp(FakeIdp):
    """``FakeIdp`` with an RFC 7009 endpoint (``endpoint=False``: none advertised) that answers ``status``,
    raises ``error``, or waits for ``gate`` first; records each revocation request."""

    def __init__(self, *, endpoint: bool = True, status: int = 200, error: Exception | None = None) -> None:
        super().__init__()
        self.endpoint, self.status, self.error = endpoint, status, error
        self.gate: asyncio.Event | None = None
        self.on_refresh: Callable[[], Awaitable[None]] | None = None  # runs while a refresh grant is answered
        self.revocations: list[httpx.Request] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        r = self(request)
        if request.url.path == "/.well-known/openid-configuration" and self.endpoint:
            return httpx.Response(200, json={**r.json(), "revocation_endpoint": ISS + "/revoke"})
        if request.url.path == "/token" and self.on_refresh is not None:
            await self.on_refresh()
            return httpx.Response(200, json={"access_token": "at-2", "token_type": "Bearer", "refresh_token": "rt-2"})
        if request.url.path == "/revoke":
            self.revocations.append(request)
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None:
                raise self.error
            return httpx.Response(self.status, json={"error": "invalid_client"} if self.status == 401 else None)
        return r


def in_process(tmp_path: Path, idp: RevokingIdp, body: Callable[[Any, Gateway, Callable[..., Any]], Any],
               config: str = CONFIG) -> None:
    """lapse with [oidc] over ``idp``; ``body(rt, gw, session)``, where ``session(refresh)`` signs one in."""

    async def main() -> None:
        loaded = parse_config(config, str(tmp_path / "lapse.toml"), tmp_path)
        async with open_runtime(loaded) as rt:
            gw = Gateway(rt)
            gw.oidc.provider = Provider(loaded.config.oidc,
                                        client=httpx.AsyncClient(transport=httpx.MockTransport(idp.handle)))

            async def session(refresh: str | None = "rt-1") -> str:
                _raw, decision = await gw.gate.sign_in("alice")
                k = decision.session.key
                sealed = None if refresh is None else rt.sealer.seal(refresh, f"oidc:{k}")
                await rt.store.put_link(SsoLink(k, ISS, "alice-sub", "S1", "id.tok.en", sealed, False,
                                                time.time(), time.time() + 9e4))
                return k

            try:
                await body(rt, gw, session)
            finally:
                await gw.oidc.revoker.drain()
                await gw.oidc.provider.aclose()

    asyncio.run(main())


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lapse.sso" and r.levelno >= logging.WARNING]


def test_the_revocation_request_is_rfc_7009_with_the_clients_credentials_and_a_bounded_timeout(tmp_path):
    idp = RevokingIdp()

    async def body(rt, gw, session) -> None:
        k = await session("the-refresh-token")
        assert await gw.gate.revoke(k, "admin")
        await gw.oidc.revoker.drain()
        [request] = idp.revocations
        assert (request.method, str(request.url)) == ("POST", ISS + "/revoke")
        assert parse_qs(request.content.decode()) == {"token": ["the-refresh-token"],
                                                      "token_type_hint": ["refresh_token"]}
        assert request.headers["authorization"] == "Basic " + base64.b64encode(b"lapse:not-used-here").decode()
        assert request.extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), REVOKE_TIMEOUT)
        assert (await rt.store.get_link(k)).refresh_token is None

    in_process(tmp_path, idp, body)


def test_the_end_does_not_wait_for_the_idp(tmp_path):
    """Off the request path: the session has ended, and said so, while the IdP is still answering."""
    idp = RevokingIdp()
    idp.gate = asyncio.Event()

    async def body(rt, gw, session) -> None:
        k = await session()
        assert await asyncio.wait_for(gw.gate.revoke(k, "logout"), 1.0)
        await asyncio.wait_for(_until(lambda: len(idp.revocations) == 1), 1.0)
        assert (await rt.store.read(k))[0].ended and (await rt.store.get_link(k)).refresh_token is not None
        idp.gate.set()
        await gw.oidc.revoker.drain()
        assert (await rt.store.get_link(k)).refresh_token is None

    in_process(tmp_path, idp, body)


@pytest.mark.parametrize(("idp", "line"), [
    (RevokingIdp(status=503), "idp_error: revocation endpoint: HTTP 503"),
    (RevokingIdp(status=401), "invalid_client"),
    (RevokingIdp(error=httpx.ReadTimeout("slow")), "idp_unreachable: revocation endpoint: ReadTimeout"),
])
def test_a_failed_revocation_is_one_log_line_the_end_stands_and_the_token_is_dropped(tmp_path, caplog, idp, line):
    async def body(rt, gw, session) -> None:
        k = await session()
        assert await gw.gate.revoke(k, "admin")
        await gw.oidc.revoker.drain()
        assert failures(caplog) == ["oidc: the refresh token of an ended session was not revoked at the IdP: " + line]
        assert (await rt.store.get_link(k)).refresh_token is None
        assert [e.reason for e in await rt.store.tail_audit(100) if e.event == "session.revoked"] == ["admin"]

    in_process(tmp_path, idp, body)


def test_an_idp_without_a_revocation_endpoint_is_said_once_at_start_and_tokens_are_still_dropped(tmp_path, caplog):
    idp = RevokingIdp(endpoint=False)

    async def body(rt, gw, session) -> None:
        await gw.oidc.run(asyncio.Event())  # what lapse serve starts (revalidate_every is "none": it returns)
        keys = [await session(), await session()]
        for k in keys:
            await gw.gate.revoke(k, "admin")
        await gw.oidc.revoker.drain()
        assert failures(caplog) == ["oidc: the IdP advertises no revocation_endpoint: refresh tokens of ended "
                                    "sessions are dropped from the store, not revoked at the IdP"]
        assert idp.revocations == []
        assert [(await rt.store.get_link(k)).refresh_token for k in keys] == [None, None]

    in_process(tmp_path, idp, body)


def test_only_the_replica_whose_write_ended_the_session_signals_it(tmp_path):
    """Two replicas on one store: both read the session live; B's end lands; A's write is refused, A judges
    again, finds it ended, and neither ends it nor signals it."""
    idp = RevokingIdp()

    async def body(rt, gw, session) -> None:
        k = await session()
        told: dict[str, list[str]] = {"a": [], "b": []}
        a = Gate(rt.store, rt.gate.policy, rt.audit, rt.secrets.session_hash_key)
        b = Gate(rt.store, rt.gate.policy, rt.audit, rt.secrets.session_hash_key)
        a.on_end, b.on_end = (lambda s: told["a"].append(s.key)), (lambda s: told["b"].append(s.key))
        stale = await rt.store.read(k)  # A's read, before B moves
        assert await b.revoke(k, "admin")
        decision, _ = await a._settle(k, lambda s, now: revoke(s, "admin", now) if s else NOTHING, stale)
        assert decision.events == ()
        assert told == {"a": [], "b": [k]}

    in_process(tmp_path, idp, body)


def test_a_refresh_token_rotated_while_the_session_ends_is_revoked_too(tmp_path):
    """revalidate_every's refresh grant is answered with a new token just as the session ends (and its old
    token is revoked): the new token, stored by the revalidation, is revoked and dropped as well."""
    idp = RevokingIdp()

    async def body(rt, gw, session) -> None:
        k = await session("rt-1")
        link = await rt.store.get_link(k)
        await rt.store.put_link(replace(link, checked_at=0.0))  # due for revalidation

        async def end_meanwhile() -> None:
            assert await gw.gate.revoke(k, "admin")
            await gw.oidc.revoker.drain()  # rt-1 revoked and dropped before the answer is stored

        idp.on_refresh = end_meanwhile
        assert await gw.oidc.revalidate_once() == 0
        await gw.oidc.revoker.drain()
        assert [parse_qs(r.content.decode())["token"] for r in idp.revocations] == [["rt-1"], ["rt-2"]]
        assert (await rt.store.get_link(k)).refresh_token is None

    in_process(tmp_path, idp, body, CONFIG.replace("require_logout_typ = true", 'revalidate_every = "1m"'))


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)
