"""The OIDC routes (CONTRACT.md §4): login through the IdP, its callback, back-channel and RP-initiated logout.

Thin over ``lapse.sso`` and the gate: these handlers gather facts and carry
out answers. What they keep beside a session (the IdP's ``sid`` and ``sub``,
the ID token for ``id_token_hint``, the refresh token for ``revalidate_every``)
lives in the store's ``SsoLink``, never in the session record, and never in a
log line: logs and audit events carry reasons, not tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import unicodedata
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import OIDC
from ..core import events as ev
from ..core.device import from_user_agent
from ..core.events import AuditEvent
from ..core.session import Session
from ..identity import UserError, check_name
from ..sealed import SealError
from ..sso import name_claim
from ..sso.amr import is_mfa
from ..sso.flow import FLOW_TTL, Flow, Flows
from ..sso.provider import Provider, ProviderError, Rejected
from ..sso.tokens import LEEWAY, MAX_IAT_AGE, IdClaims, TokenError
from ..store.base import SsoLink, StoreUnavailable
from .forms import read_form
from .tokens import parse_cookies, valid_id

if TYPE_CHECKING:
    from ..runtime import Runtime
    from .app import Gateway

log = logging.getLogger("lapse.sso")

LOGIN = "/_lapse/oidc/login"
CALLBACK = "/_lapse/oidc/callback"
BACKCHANNEL = "/_lapse/oidc/backchannel-logout"
SIGNED_OUT = "/_lapse/oidc/signed-out"
EVERY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
BACKCHANNEL_EVENT = "auth.backchannel_logout"  # a refused logout token (a success shows as session.revoked)
REVALIDATE_REASON = "idp_revalidation"  # session.revoked reason when the IdP says the sign-in is gone
LOCAL_USER_CONFLICT = "local_user_conflict"  # auth.login failure: the IdP's user name is a local user's
BAD_USERNAME = "bad_username"  # auth.login failure: neither username_claim nor sub is a usable lapse user name
NAME_TAKEN = "name_taken"  # auth.login failure: the name is bound to another IdP account (iss, sub)
EMAIL_NOT_VERIFIED = "email_not_verified"  # auth.login failure: username_claim = "email" without email_verified
REVOKERS = 4  # RFC 7009 calls in flight at once, at most
DRAIN_TIMEOUT = 10.0  # seconds shutdown waits for the revocations still queued


class OidcWeb:
    """Mounted by ``Gateway`` when ``[oidc]`` is configured."""

    def __init__(self, gateway: Gateway, cfg: OIDC, provider: Provider | None = None) -> None:
        self.gw = gateway
        self.cfg = cfg
        self.provider = provider or Provider(cfg)
        self.revoker = RefreshRevoker(gateway.rt, lambda: self.provider)
        gateway.rt.gate.on_end = self.revoker.ended
        self.flows = Flows(gateway.rt.secrets.derive("oidc-flow"))
        server = gateway.rt.loaded.config.server
        self.base = server.public_url.rstrip("/")
        self.flow_cookie = ("__Host-" if server.cookie_secure else "") + "lapse-oidc"  # in Cookies.names too
        self._attrs = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if server.cookie_secure else "")

    @property
    def redirect_uri(self) -> str:
        return self.base + CALLBACK

    @property
    def post_logout_redirect_uri(self) -> str:
        return self.base + SIGNED_OUT

    def routes(self) -> list[Route]:
        return [
            Route(LOGIN, self.login, methods=["GET"]),
            Route(CALLBACK, self.callback, methods=["GET"]),
            Route(BACKCHANNEL, self.backchannel, methods=EVERY_METHOD),  # the 405 must say no-store too
            Route(SIGNED_OUT, self.signed_out, methods=["GET"]),
        ]

    def login_link(self, next_: str, reason: str | None = None) -> str:
        query = "next=" + quote(next_, safe="/")
        return f"{LOGIN}?{query}" + (f"&reason={quote(reason)}" if reason else "")

    # ---------------------------------------------------------------- login

    def _max_age(self, host: str, path: str, ip: str | None) -> int | None:
        """What the IdP must honour: the target's strictest step-up age, and its absolute limit.

        Asking with ``max_age`` = the app's absolute limit means the IdP
        re-authenticates a user whose IdP session is older than the app allows,
        instead of handing back an ``auth_time`` lapse would refuse at once
        (a redirect loop). Core 3.1.2.1: with ``max_age`` the ID token MUST
        carry ``auth_time``. The login is a GET, but the step-up it serves may
        be for a POST (``methods = ["POST"]``): every method a privileged rule
        names is asked about, and the smallest ``max_auth_age`` wins.
        """
        policy = self.gw.gate.policy
        methods = {"GET"} | {m for app in policy.spec.apps for rule in app.privileged for m in rule.methods or ()}
        resolved = [policy.resolve(host, path, m, ip) for m in sorted(methods)]
        age = min([resolved[0].limits.absolute]  # the same for every method
                  + [e.step_up.max_auth_age for e in resolved if e.step_up is not None])
        return None if math.isinf(age) else int(age)

    async def _redirect_to_idp(self, flow: Flow, prompt: str | None) -> Response:
        url = await self.provider.authorize_url(
            redirect_uri=self.redirect_uri, state=self.flows.state(flow), nonce=self.flows.nonce(flow),
            challenge=self.flows.challenge(flow), max_age=flow.max_age, prompt=prompt,
        )
        cookie = f"{self.flow_cookie}={self.flows.dump(flow)}{self._attrs}; Max-Age={int(FLOW_TTL)}"
        return Response(b"", 303, {"Location": url, "Set-Cookie": cookie, "Cache-Control": "no-store"})

    async def login(self, request: Request) -> Response:
        from .app import safe_next

        headers, _trusted, ip, _sid = self.gw._facts(request)
        target = safe_next(request.query_params.get("next"))
        step_up = request.query_params.get("reason") == "step_up"
        now = await self.gw.rt.store.now()
        flow = self.flows.start(target, now, max_age=self._max_age(headers.get("host", ""), _path(target), ip),
                                forced=step_up)
        try:
            return await self._redirect_to_idp(flow, "login" if step_up else None)
        except ProviderError as exc:
            log.error("oidc: cannot start a login: %s", exc)
            return self.gw._error(503, "Sign-in service unavailable",
                                  "The identity provider cannot be reached. Please try again in a minute.",
                                  {"Retry-After": "30"})

    def _clear_flow(self) -> str:
        return f"{self.flow_cookie}={self._attrs}; Max-Age=0"

    async def _fail(self, reason: str, ip: str | None, user: str | None = None, status: int = 400,
                    detail: str = "The sign-in through your identity provider did not succeed. Please try again.",
                    ) -> Response:
        now = await self.gw.rt.store.now()
        await self.gw.rt.audit.emit([AuditEvent(now, ev.LOGIN, ev.FAILURE, user, None, None, ip,
                                                f"GET {CALLBACK}", reason)])
        log.info("oidc: login refused: %s", reason)
        response = self.gw._error(status, "Sign-in failed", detail)
        response.headers.append("Set-Cookie", self._clear_flow())
        return response

    async def callback(self, request: Request) -> Response:
        headers, _trusted, ip, old_sid = self.gw._facts(request)
        store = self.gw.rt.store
        now = await store.now()
        params = request.query_params
        flow = self.flows.load(parse_cookies(headers.get("cookie", "")).get(self.flow_cookie), now)
        if flow is None:
            return await self._fail("no_login_in_progress", ip)
        if not self.flows.state_matches(flow, params.get("state")):
            return await self._fail("bad_state", ip)
        if params.get("error"):
            return await self._fail("idp_" + _word(params["error"]), ip)
        code = params.get("code")
        if not code:
            return await self._fail("missing_code", ip)
        try:
            if params.get("iss") is not None and params["iss"] != (await self.provider.metadata()).issuer:
                return await self._fail("bad_iss", ip)  # RFC 9207 mix-up defence
            tokens = await self.provider.exchange(code=code, verifier=self.flows.verifier(flow),
                                                  redirect_uri=self.redirect_uri)
            id_token = tokens.get("id_token")
            if not isinstance(id_token, str):
                return await self._fail("missing_id_token", ip)
            claims = await self.provider.check_id_token(id_token, nonce=self.flows.nonce(flow), now=now)
        except TokenError as exc:
            return await self._fail("id_token_" + exc.reason, ip)
        except Rejected as exc:
            return await self._fail("token_" + exc.reason, ip)
        except ProviderError as exc:
            log.error("oidc: token exchange failed: %s", exc)
            return await self._fail(exc.reason, ip, status=502)

        if (self.cfg.username_claim == "email" and claims.claims.get("email") is not None
                and claims.claims.get("email_verified") is not True):
            # Anyone may type any address at many IdPs: an unverified one names nobody.
            return await self._fail(EMAIL_NOT_VERIFIED, ip, status=403, detail=(
                "Your identity provider has not verified your email address, which is your user name here. "
                "Please verify it there, or ask an administrator."))
        user = self._username(claims)
        if user is None:
            return await self._fail(BAD_USERNAME, ip, detail=(
                "Your identity provider did not give a user name lapse can use (1-64 letters, digits, '.', '_', "
                "'@' or '-', starting with a letter or digit). Please ask an administrator."))
        if await self._local_user(user):
            # One namespace: an IdP user may not take over a local user's name (admin flag, allow rules,
            # Remote-User, the sessions page all go by the name).
            return await self._fail(LOCAL_USER_CONFLICT, ip, user, status=403, detail=(
                "Your user name at the identity provider is also the name of a local lapse account, so it cannot "
                "be used through single sign-on. Please ask an administrator to rename one of the two accounts."))
        if not await self._bound(user, claims.claims["iss"], claims.sub):
            return await self._fail(NAME_TAKEN, ip, user, status=403, detail=(
                "Your user name at the identity provider already belongs to another account that signed in "
                "here before, so it cannot be used for yours. Please ask an administrator."))
        if flow.max_age is not None or flow.forced:
            if claims.auth_time is None:
                return await self._fail("missing_auth_time", ip, user)
            if flow.forced and claims.auth_time < flow.started - LEEWAY:
                # prompt=login was sent, and the user did not sign in again: an IdP (or an SSO in front of it)
                # that ignores prompt=login must not complete a step-up with an old sign-in.
                return await self._fail("stale_auth_time", ip, user, detail=(
                    "This page needs you to sign in again, and your identity provider did not ask you to. "
                    "Please try again; if this repeats, ask an administrator."))
            age = now - claims.auth_time
            if flow.max_age is not None and not flow.forced and age > flow.max_age:
                # Core 3.1.3.7: too old -> ask again, this time with prompt=login. No skew allowance here: an
                # auth_time past max_age (the target's absolute limit, at most) would make a session already
                # past its deadline; asking again costs one round trip, and the answer gets the allowance.
                again = self.flows.start(flow.next, now, max_age=flow.max_age, forced=True)
                return await self._redirect_to_idp(again, "login")
            if flow.max_age is not None and age > flow.max_age + LEEWAY:
                return await self._fail("stale_auth_time", ip, user)

        groups = self._groups(claims)
        mfa = is_mfa(claims.claims.get("amr"))
        sid, decision = await self.gw.gate.sign_in(
            user, host=headers.get("host", ""), path=_path(flow.next), ip=ip, groups=groups,
            auth_time=claims.auth_time if claims.auth_time is not None else now, mfa=mfa,
            replaces=old_sid if valid_id(old_sid) else None, login=f"GET {CALLBACK}",
            device=from_user_agent(headers.get("user-agent")), factor="oidc_mfa" if mfa else "oidc",
        )
        assert decision.session is not None
        refresh = tokens.get("refresh_token")
        await self._put_link(SsoLink(
            session=decision.session.key, issuer=claims.claims["iss"], subject=claims.sub, sid=claims.sid,
            id_token=id_token, refresh_token=refresh if isinstance(refresh, str) else None,
            admin=bool(set(groups) & set(self.cfg.admin_groups)), checked_at=now,
            keep_until=decision.session.auth_time + self.gw.gate.policy.generous_absolute + 3600,
        ))
        response = Response(b"", 303, {"Location": flow.next, "Cache-Control": "no-store"})
        response.headers.append("Set-Cookie", self.gw.cookies.session(sid))
        response.headers.append("Set-Cookie", self._clear_flow())
        return response

    def _username(self, claims: IdClaims) -> str | None:
        """``username_claim`` if it is a valid lapse user name (``check_name``), else ``sub`` if that is; else None."""
        value = claims.claims.get(self.cfg.username_claim)
        if isinstance(value, str) and _valid_name(value):
            return value
        if value is not None:
            log.warning("oidc: the %s claim is not a usable user name; trying sub", self.cfg.username_claim)
        return claims.sub if _valid_name(claims.sub) else None

    async def _bound(self, name: str, issuer: str, subject: str) -> bool:
        """True if ``name`` belongs to this IdP account: bound to it now, on its first sign-in, or before.

        Core 5.7: ``preferred_username`` and ``email`` may change and repeat; only
        (``iss``, ``sub``) names an account. The binding is a store ``claim`` (shared
        by replicas, atomic, permanent), keyed by the name without regard to case
        as ``_local_user`` compares, so a second account presenting "Bob" cannot
        become "bob".
        """
        mine = json.dumps([issuer, subject], separators=(",", ":"))
        return await self.gw.rt.store.claim(name_claim(name), mine) == mine

    async def _local_user(self, name: str) -> bool:
        """True if a local user has this name, compared without regard to case (as apps may compare Remote-User)."""
        if await self.gw.rt.store.get_user(name) is not None:
            return True
        folded = name.casefold()
        return any(u.name.casefold() == folded for u in await self.gw.rt.store.users())

    def _groups(self, claims: IdClaims) -> tuple[str, ...]:
        """The group names of ``groups_claim``; a name with ``,`` or a control character is dropped (Remote-Groups
        joins names with ``,``; the store with ``\\x1f``), with one warning per login that never quotes the token."""
        value = claims.claims.get(self.cfg.groups_claim)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            return ()
        names = [g for g in value if isinstance(g, str) and g]
        kept = [g for g in names if "," not in g and not any(unicodedata.category(c) == "Cc" for c in g)]
        if len(kept) < len(names):
            log.warning("oidc: dropped %d group name(s) of the %s claim holding ',' or a control character",
                        len(names) - len(kept), self.cfg.groups_claim)
        return tuple(dict.fromkeys(kept))

    # ------------------------------------------------------ tokens at rest

    async def _put_link(self, link: SsoLink) -> None:
        """Store a new link with its tokens sealed to its session (``lapse.sealed``)."""
        await self.gw.rt.store.put_link(replace(
            link, id_token=self._seal(link.id_token, link.session),
            refresh_token=self._seal(link.refresh_token, link.session),
        ))

    def _seal(self, token: str | None, session_key: str) -> str | None:
        return None if token is None else self.gw.rt.sealer.seal(token, f"oidc:{session_key}")

    def _open(self, token: str | None, session_key: str) -> str | None:
        """A stored token as the IdP issued it; ``SealError`` if it does not open."""
        return None if token is None else self.gw.rt.sealer.open(token, f"oidc:{session_key}")

    # --------------------------------------------------------------- logout

    async def end_session_url(self, session_key: str) -> str | None:
        """Where to send the browser after ``/_lapse/logout`` ended an OIDC session (None: not one)."""
        link = await self.gw.rt.store.get_link(session_key)
        if link is None:
            return None
        try:
            hint = self._open(link.id_token, link.session)
        except SealError as exc:
            log.error("oidc: logging out without id_token_hint: %s", exc)
            hint = None
        try:
            return await self.provider.end_session_url(id_token=hint,
                                                       post_logout_redirect_uri=self.post_logout_redirect_uri)
        except ProviderError as exc:
            log.error("oidc: no IdP logout (discovery failed): %s", exc)
            return None

    async def signed_out(self, request: Request) -> Response:
        return self.gw._render("signed_out.html", 200, title="Signed out", login_url=LOGIN)

    async def backchannel(self, request: Request) -> Response:
        """Back-Channel Logout 1.0: 200 with the named sessions revoked, 400 for a bad token, 503 (retry) when the
        IdP's keys or the store cannot be reached; never cached.

        The ``jti`` replay marker is taken before anything ends (a replay must not
        end sessions made since) and dropped again (``store.forget``) if ending
        them fails, so the OP's retry (BCL 2.5) is not refused as a replay.
        Revoking is idempotent: a retry that finds a session already ended
        leaves it, and its one ``session.revoked`` event, alone.
        """
        if request.method != "POST":  # BCL 2.5: a POST; the refusal is not cached either (2.8)
            return Response(b"", 405, {"Allow": "POST", "Cache-Control": "no-store"})
        _headers, _trusted, ip, _sid = self.gw._facts(request)
        store = self.gw.rt.store
        form = await read_form(request) if request.headers.get("content-type", "").lower().startswith(
            "application/x-www-form-urlencoded") else None
        token = (form or {}).get("logout_token")
        now = await store.now()
        if not token:
            return await self._refuse("invalid_request", "missing_logout_token", now, ip)
        try:
            claims = await self.provider.check_logout_token(token, now=now)
            issuer = (await self.provider.metadata()).issuer
        except TokenError as exc:
            return await self._refuse("invalid_request", exc.reason, now, ip)
        except ProviderError as exc:
            log.error("oidc: back-channel logout could not be checked: %s", exc)
            return await self._refuse("temporarily_unavailable", exc.reason, now, ip, status=503)
        until = max(claims.exp or 0.0, claims.iat + MAX_IAT_AGE) + LEEWAY
        marker = "jti:" + hashlib.sha256(f"{issuer}\n{claims.jti}".encode()).hexdigest()
        if not await store.first_use(marker, until):
            return await self._refuse("invalid_request", "replayed_jti", now, ip)
        try:
            if claims.sid is not None:
                links = [x for x in await store.find_links(issuer, sid=claims.sid)
                         if claims.sub is None or x.subject == claims.sub]
            else:
                links = await store.find_links(issuer, subject=claims.sub)
            revoked = await _revoke(self.gw, [x.session for x in links], "backchannel", ip=ip,
                                    resource=f"POST {request.url.path}")
        except Exception:  # StoreUnavailable above all: the gateway answers 503, and the OP may retry
            await self._forget(marker)
            raise
        log.info("oidc: back-channel logout ended %d session(s)", revoked)
        return Response(b"", 200, {"Cache-Control": "no-store"})

    async def _forget(self, marker: str) -> None:
        """Drop a jti marker after a failed logout; if the store cannot, the OP's retry is refused, and we say so."""
        try:
            await self.gw.rt.store.forget(marker)
        except StoreUnavailable as exc:
            log.error("oidc: back-channel logout failed and its jti stays marked (a retry will be refused): %s", exc)

    async def _refuse(self, error: str, reason: str, now: float, ip: str | None, status: int = 400) -> Response:
        """400: the token is bad (final). 503 with Retry-After: lapse could not judge it yet (BCL 2.5: retry)."""
        await self.gw.rt.audit.emit([AuditEvent(now, BACKCHANNEL_EVENT, ev.FAILURE, None, None, None, ip,
                                                f"POST {BACKCHANNEL}", reason)])
        log.info("oidc: back-channel logout refused: %s", reason)
        headers = {"Cache-Control": "no-store"} | ({"Retry-After": "30"} if status == 503 else {})
        return JSONResponse({"error": error, "error_description": reason}, status, headers)

    # ----------------------------------------------------------- revalidate

    async def revalidate_once(self) -> int:
        """Ask the IdP about every live OIDC session not checked for ``revalidate_every``; returns how many ended.

        With a refresh token: a refresh grant (the IdP answers ``invalid_grant``
        once its session is gone); the rotated refresh token is kept. Without
        one there is nothing to ask: the session is left to its own limits
        (documented). An IdP that cannot be reached ends nothing (lapse's own
        limits still hold); a definite refusal ends the session with reason
        ``idp_revalidation``.
        """
        every = self.cfg.revalidate_every
        if every is None:
            return 0
        store = self.gw.rt.store
        ended = 0
        for session in await store.sessions():
            link = await store.get_link(session.key)
            now = await store.now()
            if link is None or link.refresh_token is None or now - link.checked_at < every:
                continue
            try:
                tokens = await self.provider.refresh(self._open(link.refresh_token, link.session))  # type: ignore[arg-type]
            except SealError as exc:
                log.error("oidc: revalidation impossible (%s): ending the session", exc)
                ended += await _revoke(self.gw, [session.key], REVALIDATE_REASON)
                continue
            except Rejected as exc:
                log.info("oidc: revalidation refused (%s): ending the session", exc.reason)
                ended += await _revoke(self.gw, [session.key], REVALIDATE_REASON)
                continue
            except ProviderError as exc:
                log.warning("oidc: revalidation could not ask the IdP: %s", exc)
                continue
            rotated = tokens.get("refresh_token")
            id_token = tokens.get("id_token")
            await store.put_link(replace(
                link, checked_at=now,
                id_token=self._seal(id_token, link.session) if isinstance(id_token, str) else link.id_token,
                refresh_token=self._seal(rotated, link.session) if isinstance(rotated, str) else link.refresh_token,
            ))
            current, _ = await store.read(session.key)
            if isinstance(rotated, str) and current is not None and current.ended:
                self.revoker.rotated(session.key, rotated)  # it ended while the IdP answered: revoke the new one too
        return ended

    async def run(self, stop: asyncio.Event) -> None:
        """Background work beside the sweeper: say once whether refresh tokens can be revoked; revalidate."""
        await self.revoker.check_endpoint()
        every = self.cfg.revalidate_every
        if every is None:
            return
        interval = max(1.0, min(every / 4, 60.0))
        while not stop.is_set():
            try:
                await self.revalidate_once()
            except StoreUnavailable as exc:
                log.error("oidc: revalidation: store unavailable: %s", exc)
            except Exception:  # never let one bad answer stop the loop
                log.exception("oidc: revalidation failed")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass


class RefreshRevoker:
    """Revokes the refresh token of each ended OIDC session at the IdP (RFC 7009), off the request path.

    ``Gate.on_end`` tells it of every end this process wrote, once; it queues the
    session key and returns. Up to ``REVOKERS`` workers take the link's refresh token,
    post it to the ``revocation_endpoint`` (bounded by ``REVOKE_TIMEOUT``), log
    one line if that fails, and drop the token from the store either way: a
    stolen store or backup holds no live refresh token of an ended session.
    """

    def __init__(self, rt: Runtime, provider: Callable[[], Provider]) -> None:
        self.rt = rt
        self._provider = provider
        self._queue: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()
        self._workers: set[asyncio.Task[None]] = set()  # held: a task nobody holds may be collected
        self._said_no_endpoint = False

    def ended(self, session: Session) -> None:
        """``Gate.on_end``: queue the session (never blocks, never raises); its link says which token."""
        self._put(session.key, None)

    def rotated(self, key: str, token: str) -> None:
        """A refresh token issued to a session that has ended meanwhile (``revalidate_once``): revoke it too."""
        self._put(key, token)

    def _put(self, key: str, token: str | None) -> None:
        """Queue; a worker runs while work waits."""
        self._queue.put_nowait((key, token))
        self._workers = {task for task in self._workers if not task.done()}
        if len(self._workers) < REVOKERS:
            self._workers.add(asyncio.create_task(self._work()))

    async def check_endpoint(self) -> None:
        """At start: an IdP without a ``revocation_endpoint`` is said once (then ends just drop the tokens)."""
        try:
            meta = await self._provider().metadata()
        except ProviderError:
            return  # said by whoever needs discovery next; the workers will look again
        if meta.revocation_endpoint is None:
            self._no_endpoint()

    def _no_endpoint(self) -> None:
        if not self._said_no_endpoint:
            log.warning("oidc: the IdP advertises no revocation_endpoint: refresh tokens of ended sessions are "
                        "dropped from the store, not revoked at the IdP")
            self._said_no_endpoint = True

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait (at most ``timeout``) for the queued revocations (shutdown, tests); what is left is dropped."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("oidc: shutdown did not wait for the last refresh token revocations (%d still queued)",
                        self._queue.qsize())
            for task in self._workers:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self) -> None:
        """Revoke until the queue is empty, then end (an idle process holds no task)."""
        while not self._queue.empty():
            key, token = self._queue.get_nowait()
            try:
                await self._revoke_one(key, token)
            except Exception as exc:  # StoreUnavailable above all: the link keeps its token until it is purged
                log.warning("oidc: the refresh token of an ended session was not revoked: %s: %s",
                            type(exc).__name__, exc)
            finally:
                self._queue.task_done()

    async def _revoke_one(self, key: str, token: str | None) -> None:
        """Revoke ``token`` (None: the link's), then drop the link's token unless it is another one by now (a
        rotation racing the end: whoever rotated it queues that one, ``rotated``)."""
        store, sealer, context = self.rt.store, self.rt.sealer, f"oidc:{key}"
        link = await store.get_link(key)
        try:
            if token is None:
                if link is None or link.refresh_token is None:
                    return
                token = sealer.open(link.refresh_token, context)
            if not await self._provider().revoke_refresh_token(token):
                self._no_endpoint()
        except (SealError, ProviderError) as exc:
            log.warning("oidc: the refresh token of an ended session was not revoked at the IdP: %s", exc)
        current = await store.get_link(key)
        if current is None or current.refresh_token is None:
            return
        try:
            mine = token is None or sealer.open(current.refresh_token, context) == token
        except SealError:
            mine = True  # a token that does not open is of no use to anyone: drop it
        if mine:
            await store.put_link(replace(current, refresh_token=None))


@asynccontextmanager
async def revoking(rt: Runtime) -> AsyncIterator[None]:
    """For processes without a gateway (the CLI): ends they write revoke refresh tokens too, drained at exit."""
    cfg = rt.loaded.config.oidc
    if cfg is None:
        yield
        return
    provider: list[Provider] = []

    def made() -> Provider:
        if not provider:
            provider.append(Provider(cfg))
        return provider[0]

    revoker = RefreshRevoker(rt, made)
    rt.gate.on_end = revoker.ended
    try:
        yield
    finally:
        await revoker.drain()
        if provider:
            await provider[0].aclose()


async def _revoke(gw: Gateway, keys: Sequence[str], reason: str, *, ip: str | None = None,
                  resource: str | None = None) -> int:
    return sum([await gw.gate.revoke(key, reason, ip=ip, resource=resource) for key in keys])


def _valid_name(name: str) -> bool:
    try:
        check_name(name)
    except UserError:
        return False
    return True


def _path(target: str) -> str:
    return target.split("?", 1)[0]


def _word(text: str) -> str:
    return "".join(c for c in text if c.isalnum() or c == "_")[:40] or "error"


__all__ = ["BACKCHANNEL", "CALLBACK", "LOGIN", "OidcWeb", "RefreshRevoker", "revoking"]


