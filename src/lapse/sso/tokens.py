"""ID token and logout token validation: pure, so it can be tested exhaustively.

Everything here takes ``now`` and a key set as arguments; nothing reads a clock,
fetches a key or logs. A refusal is a ``TokenError`` whose ``reason`` is a short
stable word (it goes to the audit log; the token itself never does).
``UnknownKey`` is the one refusal the caller may act on: the signing key's
``kid`` is not in the set, so the IdP may have rotated its keys; refetch the
JWKS (rate-limited) and try once more.

Rules, with their sources:

- Signature from the IdP's JWKS, ``alg`` from an allow-list of asymmetric
  algorithms; ``none`` and HMAC never (OIDC Core 3.1.3.7 steps 6-8; BCL 2.6).
  Encrypted (JWE) tokens are refused: lapse never negotiates encryption.
- ID token (Core 3.1.3.7): ``iss`` equals the issuer; ``aud`` contains the
  client ID, and ``azp`` (if present, or if there are several audiences) is the
  client ID; ``exp`` in the future, ``iat`` not in the future and ``nbf`` (if
  present, RFC 7519 4.1.5) not in the future (with ``LEEWAY``); ``nonce``
  equals the one sent; ``auth_time`` a number if present.
- Logout token (Back-Channel Logout 1.0, 2.4 and 2.6): the same ``iss``,
  ``aud``, ``iat``, ``nbf`` and (if present) ``exp`` checks, and ``iat`` at most
  ``MAX_IAT_AGE`` old. BCL 2.4 makes ``exp`` REQUIRED, but OPs in wide use
  omit it: Keycloak before 23.0.4 (keycloak#25753), authentik before 2025.8.2
  (authentik#16490), Ory Hydra 2.x (hydra#4035), LemonLDAP::NG; requiring it
  would break their logouts (the worse failure: sessions that should end
  live on), and the ``iat`` age limit already bounds such a token's life
  (and its replay window) as ``exp`` would; ``jti`` present; ``events``
  an object holding the back-channel-logout member whose value is an object;
  ``sub`` or ``sid`` (or both); no ``nonce``; ``typ`` = ``logout+jwt`` when
  required (configurable, since BCL 2.3 says requiring it breaks older OPs).
  Replay of ``jti`` is the caller's check: it needs shared state.
"""

from __future__ import annotations

import hmac
import json
import math
from base64 import urlsafe_b64decode
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

LEEWAY = 60.0
"""Seconds of clock skew tolerated on ``exp``/``iat``/``nbf``/``auth_time``."""

MAX_IAT_AGE = 600.0
"""A logout token issued longer ago than this is refused (BCL 2.6 lets the RP bound ``iat``)."""

MAX_TOKEN = 16 * 1024
"""Bytes; anything larger is not a token an IdP would send."""

MAX_HEADER = 2 * 1024
"""Characters of the (base64url) JOSE header segment; real headers are a few dozen bytes of JSON."""

SAFE_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""Asymmetric algorithms only; never ``none``, never HMAC (a client secret is not an IdP signature)."""

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TYP = "logout+jwt"


class TokenError(ValueError):
    """A token lapse refuses; ``reason`` is a short word for the audit log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class UnknownKey(TokenError):
    """The token names a ``kid`` the key set lacks: refetch the JWKS (rate-limited) and retry once."""

    def __init__(self, kid: str | None) -> None:
        super().__init__("unknown_key", f"no key with kid {kid!r}")
        self.kid = kid


@dataclass(frozen=True, slots=True)
class Expect:
    """What every token from this IdP must show."""

    issuer: str
    client_id: str
    algorithms: tuple[str, ...] = SAFE_ALGS
    leeway: float = LEEWAY


@dataclass(frozen=True, slots=True)
class IdClaims:
    sub: str
    auth_time: float | None
    sid: str | None
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    jti: str
    sub: str | None
    sid: str | None
    exp: float | None
    iat: float


def allowed_algorithms(supported: Collection[str] | None) -> tuple[str, ...]:
    """The IdP's advertised signing algorithms that lapse accepts (all safe ones if it says nothing)."""
    if not supported:
        return SAFE_ALGS
    return tuple(a for a in SAFE_ALGS if a in supported)


def header(token: str) -> dict[str, Any]:
    """The JOSE header of a compact JWS, checked for shape only (no trust)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN:
        raise TokenError("malformed", "not a token of sane size")
    parts = token.split(".")
    if len(parts) == 5:
        raise TokenError("encrypted", "encrypted tokens are not accepted")
    if len(parts) != 3:
        raise TokenError("malformed", "not a compact JWS")
    if len(parts[0]) > MAX_HEADER:
        raise TokenError("malformed", "header too long")
    try:
        raw = parts[0] + "=" * (-len(parts[0]) % 4)
        head = json.loads(urlsafe_b64decode(raw.encode("ascii")))
    except (ValueError, UnicodeError, RecursionError) as exc:  # "[[[[..." nests past the parser's limit
        raise TokenError("malformed", "unreadable header") from exc
    if not isinstance(head, dict):
        raise TokenError("malformed", "header is not an object")
    return head


def verify(token: str, keys: KeySet, expect: Expect) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a token whose signature holds under ``keys``; nothing else is checked yet."""
    head = header(token)
    alg = head.get("alg")
    if not isinstance(alg, str) or alg not in expect.algorithms:
        raise TokenError("bad_alg", f"algorithm {alg!r} is not allowed")
    if "crit" in head:
        raise TokenError("bad_header", "critical header parameters are not understood")
    kid = head.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("bad_header", "kid is not a string")
    if kid is not None and not any(k.kid == kid for k in keys.keys):
        raise UnknownKey(kid)
    try:
        if kid is None:
            # No kid: the token must verify under one of the keys of its type (IdPs with one key do this).
            claims = _verify_any(token, keys, alg)
        else:
            claims = jwt.decode(token, keys, algorithms=[alg]).claims
    except InvalidKeyIdError as exc:
        raise UnknownKey(kid) from exc
    except BadSignatureError as exc:
        raise TokenError("bad_signature") from exc
    except (JoseError, ValueError, TypeError, RecursionError) as exc:  # the payload's JSON as the header's
        raise TokenError("malformed", type(exc).__name__) from exc
    if not isinstance(claims, dict):
        raise TokenError("malformed", "claims are not an object")
    return head, claims


def _verify_any(token: str, keys: KeySet, alg: str) -> dict[str, Any]:
    for key in keys.keys:
        try:
            return jwt.decode(token, key, algorithms=[alg]).claims
        except BadSignatureError:
            continue
        except JoseError:
            continue  # a key of another type
    raise TokenError("bad_signature", "no key verifies it")


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise TokenError(f"missing_{name}")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenError(f"bad_{name}", f"{name} is not a number")
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TokenError(f"bad_{name}", f"{name} is not a non-empty string")
    return value


def _common(claims: Mapping[str, Any], expect: Expect, now: float) -> tuple[float, float | None]:
    """``iss``, ``aud``/``azp``, ``iat``, ``exp``, ``nbf`` as ID tokens and logout tokens share them: (iat, exp)."""
    if claims.get("iss") != expect.issuer:
        raise TokenError("bad_iss")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else None
    if not audiences or not all(isinstance(a, str) for a in audiences) or expect.client_id not in audiences:
        raise TokenError("bad_aud")
    azp = claims.get("azp")
    if (azp is not None or len(audiences) > 1) and azp != expect.client_id:
        raise TokenError("bad_azp")
    iat = _number(claims, "iat", required=True)
    assert iat is not None
    if iat > now + expect.leeway:
        raise TokenError("iat_in_future")
    exp = _number(claims, "exp", required=False)
    if exp is not None and exp <= now - expect.leeway:
        raise TokenError("expired")
    nbf = _number(claims, "nbf", required=False)
    if nbf is not None and nbf > now + expect.leeway:  # RFC 7519 4.1.5: MUST NOT be accepted before nbf
        raise TokenError("not_yet_valid")
    return iat, exp


def check_id_token(token: str, keys: KeySet, expect: Expect, *, nonce: str, now: float) -> IdClaims:
    """A validated ID token (OIDC Core 3.1.3.7), or ``TokenError``."""
    _head, claims = verify(token, keys, expect)
    _iat, exp = _common(claims, expect, now)
    if exp is None:
        raise TokenError("missing_exp")
    sent = claims.get("nonce")
    if not isinstance(sent, str) or not _same(sent, nonce):
        raise TokenError("bad_nonce")
    sub = _string(claims, "sub")
    if sub is None:
        raise TokenError("missing_sub")
    auth_time = _number(claims, "auth_time", required=False)
    if auth_time is not None and auth_time > now + expect.leeway:
        raise TokenError("auth_time_in_future")
    return IdClaims(sub, auth_time, _string(claims, "sid"), claims)


def check_logout_token(
    token: str, keys: KeySet, expect: Expect, *, now: float, require_typ: bool
) -> LogoutClaims:
    """A validated logout token (Back-Channel Logout 1.0, 2.6), or ``TokenError``. ``jti`` replay is the caller's."""
    head, claims = verify(token, keys, expect)
    typ = head.get("typ")
    if require_typ and not (isinstance(typ, str) and typ.lower() in (LOGOUT_TYP, "application/" + LOGOUT_TYP)):
        raise TokenError("bad_typ", "typ must be logout+jwt")
    iat, exp = _common(claims, expect, now)
    if iat < now - MAX_IAT_AGE:
        raise TokenError("too_old")
    if "nonce" in claims:
        raise TokenError("nonce_present")
    events = claims.get("events")
    if not isinstance(events, dict) or BACKCHANNEL_EVENT not in events:
        raise TokenError("bad_events")
    if not isinstance(events[BACKCHANNEL_EVENT], dict):
        raise TokenError("bad_events", "the event's value must be an object")
    jti = _string(claims, "jti")
    if jti is None:
        raise TokenError("missing_jti")
    sub, sid = _string(claims, "sub"), _string(claims, "sid")
    if sub is None and sid is None:
        raise TokenError("missing_sub_and_sid")
    return LogoutClaims(jti, sub, sid, exp, iat)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


__all__ = [
    "BACKCHANNEL_EVENT",
    "Expect",
    "IdClaims",
    "LogoutClaims",
    "SAFE_ALGS",
    "TokenError",
    "UnknownKey",
    "allowed_algorithms",
    "check_id_token",
    "check_logout_token",
    "header",
    "verify",
]
