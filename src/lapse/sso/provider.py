"""The IdP as lapse sees it over HTTP: discovery, the JWKS (with rotation), the token endpoint.

Thin over ``lapse.sso.tokens``: this module fetches and caches, the pure module
judges. Key rotation: a token naming a ``kid`` not in the cached JWKS makes
one refetch, at most every ``JWKS_MIN_INTERVAL`` seconds (an attacker sending
made-up ``kid``s cannot make lapse hammer the IdP); the token is then judged
once more. Discovery is retried on the next request after a failure.

Key withdrawal: the cached JWKS is also refetched, whole, once it is older than
the JWKS response's ``Cache-Control: max-age`` held between ``JWKS_TTL_FLOOR``
and ``JWKS_TTL_CEILING`` (``JWKS_TTL_DEFAULT`` without one), so a key the IdP
has withdrawn (rotated out, or compromised) stops verifying within the hour,
not at the next rotation or restart. If that refetch fails, the cached set is
kept for ``JWKS_GRACE`` more (an IdP hiccup must not stop every sign-in and
back-channel logout at once), retried at most every ``JWKS_MIN_INTERVAL``,
with one warning; after that, tokens are not judged at all (``ProviderError``:
logins fail, back-channel logouts get a retryable 503) until a fetch works. So
a withdrawn key is trusted at most ceiling + grace (2 h), even to someone who
can cut lapse off from the IdP.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..config import OIDC
from .tokens import Expect, IdClaims, LogoutClaims, UnknownKey, allowed_algorithms, check_id_token, check_logout_token

log = logging.getLogger("lapse.sso")

JWKS_MIN_INTERVAL = 10.0  # seconds between JWKS refetches caused by unknown kids (and between failed ones)
JWKS_TTL_FLOOR = 300.0  # the cached JWKS is refetched after Cache-Control max-age, held to these bounds
JWKS_TTL_CEILING = 3600.0
JWKS_TTL_DEFAULT = 3600.0  # no (usable) max-age
JWKS_GRACE = 3600.0  # a JWKS past its time, whose refetch fails, is still used this much longer
TIMEOUT = 10.0
REVOKE_TIMEOUT = 5.0  # seconds for one RFC 7009 revocation: best effort, never worth waiting long for
MAX_BODY = 1 << 20


class ProviderError(Exception):
    """The IdP could not be asked, or answered something unusable; ``reason`` is a short word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Rejected(ProviderError):
    """The IdP answered, and the answer is no (``invalid_grant`` and the like)."""


@dataclass(frozen=True, slots=True)
class Metadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    userinfo_endpoint: str | None
    revocation_endpoint: str | None  # RFC 7009 (RFC 8414 metadata)
    algorithms: tuple[str, ...]
    basic_auth: bool  # client_secret_basic (else client_secret_post)
    backchannel_logout: bool


def read_secret(cfg: OIDC) -> str:
    if cfg.client_secret is not None:
        return cfg.client_secret
    path = cfg.client_secret_path
    assert path is not None
    return path.read_text().strip()


class Provider:
    def __init__(self, cfg: OIDC, *, client: httpx.AsyncClient | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._secret = read_secret(cfg)
        self._http = client or httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False)
        self._monotonic = monotonic
        self._meta: Metadata | None = None
        self._keys: KeySet | None = None
        self._keys_at = -float("inf")  # when the cached set was fetched (monotonic)
        self._keys_ttl = JWKS_TTL_DEFAULT
        self._tried_at = -float("inf")  # the last fetch attempt, good or not
        self._failing = False  # a refetch of a stale set has failed (and said so once)
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------ discovery

    async def _get_json(self, url: str) -> dict[str, Any]:
        return (await self._get_json_with_headers(url))[0]

    async def _get_json_with_headers(self, url: str) -> tuple[dict[str, Any], httpx.Headers]:
        try:
            r = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderError("idp_unreachable", f"{url}: {type(exc).__name__}") from exc
        if r.status_code != 200 or len(r.content) > MAX_BODY:
            raise ProviderError("idp_error", f"{url}: HTTP {r.status_code}")
        try:
            body = r.json()
        except ValueError as exc:
            raise ProviderError("idp_error", f"{url}: not JSON") from exc
        if not isinstance(body, dict):
            raise ProviderError("idp_error", f"{url}: not a JSON object")
        return body, r.headers

    async def metadata(self) -> Metadata:
        if self._meta is not None:
            return self._meta
        issuer = self.cfg.issuer.rstrip("/")
        doc = await self._get_json(issuer + "/.well-known/openid-configuration")
        if doc.get("issuer") != self.cfg.issuer and doc.get("issuer") != issuer:
            # OIDC Discovery 4.3: the issuer in the document MUST be the one asked for.
            raise ProviderError("idp_error", "discovery document names another issuer")
        try:
            methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
            meta = Metadata(
                issuer=doc["issuer"],
                authorization_endpoint=doc["authorization_endpoint"],
                token_endpoint=doc["token_endpoint"],
                jwks_uri=doc["jwks_uri"],
                end_session_endpoint=doc.get("end_session_endpoint"),
                userinfo_endpoint=doc.get("userinfo_endpoint"),
                revocation_endpoint=doc.get("revocation_endpoint") or None,
                algorithms=allowed_algorithms(doc.get("id_token_signing_alg_values_supported")),
                basic_auth="client_secret_basic" in methods or "client_secret_post" not in methods,
                backchannel_logout=bool(doc.get("backchannel_logout_supported")),
            )
        except KeyError as exc:
            raise ProviderError("idp_error", f"discovery document lacks {exc}") from None
        if not meta.algorithms:
            raise ProviderError("idp_error", "the IdP signs with no algorithm lapse accepts")
        self._meta = meta
        return meta

    async def expect(self) -> Expect:
        meta = await self.metadata()
        return Expect(meta.issuer, self.cfg.client_id, meta.algorithms)

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The IdP's signature keys: cached, refetched whole when stale or (``refresh``) for an unknown kid."""
        async with self._lock:
            now = self._monotonic()
            stale = now - self._keys_at >= self._keys_ttl
            may_try = now - self._tried_at >= JWKS_MIN_INTERVAL
            if self._keys is None or ((stale or refresh) and may_try):
                self._tried_at = now
                try:
                    self._keys, self._keys_ttl = await self._fetch_keys()
                except ProviderError as exc:
                    if self._keys is None or not stale:
                        raise  # nothing cached, or an unknown kid: the token cannot be judged
                    self._grace(now, exc)
                else:
                    self._keys_at = now
                    if self._failing:
                        log.warning("oidc: the IdP's JWKS can be fetched again")
                        self._failing = False
            elif stale:
                self._grace(now, None)  # a failed refetch, tried again within JWKS_MIN_INTERVAL
            return self._keys

    def _grace(self, now: float, exc: ProviderError | None) -> None:
        """A stale cached set whose refetch failed: still used within ``JWKS_GRACE``, refused after it."""
        if now - self._keys_at >= self._keys_ttl + JWKS_GRACE:
            raise exc or ProviderError("idp_unreachable", "the JWKS is past its time and cannot be fetched")
        if exc is not None and not self._failing:
            log.warning("oidc: cannot refetch the IdP's JWKS (%s); using the cached keys for up to %d s more",
                        exc, int(self._keys_at + self._keys_ttl + JWKS_GRACE - now))
            self._failing = True

    async def _fetch_keys(self) -> tuple[KeySet, float]:
        """The whole JWKS (signature keys only) and how long to keep it."""
        doc, headers = await self._get_json_with_headers((await self.metadata()).jwks_uri)
        try:
            keys = KeySet.import_key_set({"keys": [k for k in doc.get("keys", []) if _usable(k)]})
        except (JoseError, ValueError, TypeError) as exc:
            raise ProviderError("idp_error", "unusable JWKS") from exc
        return keys, keys_ttl(headers.get("cache-control"))

    async def _judged(self, judge: Callable[[KeySet, Expect], Any]) -> Any:
        expect = await self.expect()
        try:
            return judge(await self.keys(), expect)
        except UnknownKey:
            return judge(await self.keys(refresh=True), expect)  # rotated keys: one look, rate-limited

    async def check_id_token(self, token: str, *, nonce: str, now: float) -> IdClaims:
        return await self._judged(lambda keys, exp: check_id_token(token, keys, exp, nonce=nonce, now=now))

    async def check_logout_token(self, token: str, *, now: float) -> LogoutClaims:
        return await self._judged(
            lambda keys, exp: check_logout_token(token, keys, exp, now=now, require_typ=self.cfg.require_logout_typ)
        )

    # ------------------------------------------------------------- endpoints

    async def authorize_url(self, *, redirect_uri: str, state: str, nonce: str, challenge: str,
                            max_age: int | None = None, prompt: str | None = None) -> str:
        meta = await self.metadata()
        params = {
            "response_type": "code",
            "client_id": self.cfg.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.cfg.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if max_age is not None:
            params["max_age"] = str(max(0, max_age))
        if prompt:
            params["prompt"] = prompt
        sep = "&" if "?" in meta.authorization_endpoint else "?"
        return meta.authorization_endpoint + sep + urlencode(params)

    async def end_session_url(self, *, id_token: str | None, post_logout_redirect_uri: str) -> str | None:
        meta = await self.metadata()
        if not meta.end_session_endpoint:
            return None
        params = {"client_id": self.cfg.client_id, "post_logout_redirect_uri": post_logout_redirect_uri}
        if id_token:
            params["id_token_hint"] = id_token
        sep = "&" if "?" in meta.end_session_endpoint else "?"
        return meta.end_session_endpoint + sep + urlencode(params)

    def _client_auth(self, meta: Metadata, form: dict[str, str]) -> tuple[dict[str, str], httpx.BasicAuth | None]:
        """The form and Basic credentials for the client's authentication (token and revocation endpoints alike)."""
        if meta.basic_auth:
            return form, httpx.BasicAuth(quote(self.cfg.client_id, safe=""), quote(self._secret, safe=""))
        return {**form, "client_id": self.cfg.client_id, "client_secret": self._secret}, None

    async def _token(self, form: dict[str, str]) -> dict[str, Any]:
        meta = await self.metadata()
        form, auth = self._client_auth(meta, form)
        try:
            r = await self._http.post(meta.token_endpoint, data=form, auth=auth, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderError("idp_unreachable", f"token endpoint: {type(exc).__name__}") from exc
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code in (400, 401) and isinstance(body, dict) and isinstance(body.get("error"), str):
            raise Rejected(_word(body["error"]))
        if r.status_code != 200 or not isinstance(body, dict):
            raise ProviderError("idp_error", f"token endpoint: HTTP {r.status_code}")
        return body

    async def exchange(self, *, code: str, verifier: str, redirect_uri: str) -> dict[str, Any]:
        """Authorization code -> tokens (with the PKCE verifier)."""
        return await self._token({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                                  "code_verifier": verifier})

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """A refresh grant: tokens, or ``Rejected`` when the IdP says the grant is gone."""
        return await self._token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    async def revoke_refresh_token(self, refresh_token: str) -> bool:
        """RFC 7009: tell the IdP a refresh token is no longer needed; False when it advertises no endpoint.

        ``token_type_hint=refresh_token`` spares the IdP a lookup among access
        tokens (2.1). Bounded by ``REVOKE_TIMEOUT``; any answer but 200 (2.2: the
        IdP answers 200 for a token that is already invalid, too) is a
        ``ProviderError``, or ``Rejected`` with the IdP's error code (2.2.1).
        """
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            return False
        form, auth = self._client_auth(meta, {"token": refresh_token, "token_type_hint": "refresh_token"})
        try:
            r = await self._http.post(meta.revocation_endpoint, data=form, auth=auth,
                                      headers={"Accept": "application/json"}, timeout=REVOKE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise ProviderError("idp_unreachable", f"revocation endpoint: {type(exc).__name__}") from exc
        if r.status_code == 200:
            return True
        try:
            body = r.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            raise Rejected(_word(body["error"]))
        raise ProviderError("idp_error", f"revocation endpoint: HTTP {r.status_code}")

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        meta = await self.metadata()
        if not meta.userinfo_endpoint:
            raise ProviderError("idp_error", "no userinfo endpoint")
        try:
            r = await self._http.get(meta.userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}"})
        except httpx.HTTPError as exc:
            raise ProviderError("idp_unreachable", f"userinfo: {type(exc).__name__}") from exc
        if r.status_code == 401:
            raise Rejected("invalid_token")
        if r.status_code != 200:
            raise ProviderError("idp_error", f"userinfo: HTTP {r.status_code}")
        return r.json()


def keys_ttl(cache_control: str | None) -> float:
    """Seconds to keep a JWKS: its ``max-age`` (``no-cache``/``no-store``: 0) within the floor and ceiling."""
    if not cache_control:
        return JWKS_TTL_DEFAULT
    directives = cache_control.lower()
    if re.search(r"(^|[\s,])no-(cache|store)\b", directives):
        return JWKS_TTL_FLOOR
    found = re.search(r"(?:^|[\s,])max-age\s*=\s*\"?(\d{1,12})\b", directives)
    if found is None:
        return JWKS_TTL_DEFAULT
    return min(max(float(found.group(1)), JWKS_TTL_FLOOR), JWKS_TTL_CEILING)


def _usable(jwk: Any) -> bool:
    """Signature keys only (``use`` sig or absent); encryption keys are not ours to verify with."""
    return isinstance(jwk, dict) and jwk.get("use", "sig") == "sig" and jwk.get("kty") in ("RSA", "EC", "OKP")


def _word(text: str) -> str:
    """An IdP's error code, safe to log: letters, digits and ``_`` only, short."""
    return "".join(c for c in text if c.isalnum() or c == "_")[:40] or "error"


__all__ = ["Metadata", "Provider", "ProviderError", "Rejected", "keys_ttl", "read_secret"]
