"""One login through the IdP, bound to the browser that started it.

Nothing is kept on the server between ``/_lapse/oidc/login`` and the callback,
so any replica can finish a login another one began. The browser holds a
short-lived ``__Host-`` cookie with a random transaction ID, what to do after
sign-in, and an HMAC over both. ``state``, ``nonce`` and the PKCE verifier are
derived from the transaction ID with the gateway's secret key, so:

- ``state`` in the callback must equal the one derived from THIS browser's
  cookie (compared in constant time): a callback URL planted by someone else
  carries their state, not ours (CSRF, OAuth 2.0 Security BCP 4.7);
- the ID token's ``nonce`` must be ours likewise (replayed ID tokens fail);
- the PKCE verifier (S256) never leaves the server except to the token endpoint.

The cookie is cleared at the callback whatever the outcome, and refused after
``FLOW_TTL``. Pure: ``now`` is given.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

FLOW_TTL = 600.0  # seconds a login at the IdP may take


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Flow:
    """One login in progress."""

    tx: str
    next: str  # where to go after sign-in (already made safe)
    started: float
    max_age: int | None = None  # sent to the IdP; the returned auth_time must be at most this old
    forced: bool = False  # prompt=login was sent: a stale auth_time now is a failure, not a retry


class Flows:
    """Makes and reads the flow cookie; derives ``state``, ``nonce`` and the PKCE pair."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def start(self, next_: str, now: float, *, max_age: int | None = None, forced: bool = False) -> Flow:
        return Flow(secrets.token_urlsafe(24), next_, now, max_age, forced)

    def state(self, flow: Flow) -> str:
        return _b64(self._mac("state", flow.tx))

    def nonce(self, flow: Flow) -> str:
        return _b64(self._mac("nonce", flow.tx))

    def verifier(self, flow: Flow) -> str:
        """43 characters of the unreserved set (RFC 7636 4.1)."""
        return _b64(self._mac("pkce", flow.tx))

    def challenge(self, flow: Flow) -> str:
        return _b64(hashlib.sha256(self.verifier(flow).encode("ascii")).digest())

    def dump(self, flow: Flow) -> str:
        body = _b64(json.dumps([flow.tx, flow.next, flow.started, flow.max_age, flow.forced],
                               separators=(",", ":")).encode())
        return body + "." + _b64(self._mac("flow", body))

    def load(self, cookie: str | None, now: float) -> Flow | None:
        """The flow this cookie carries, or None if absent, tampered with or too old."""
        if not cookie or len(cookie) > 4096 or "." not in cookie:
            return None
        body, _, mac = cookie.partition(".")
        if not hmac.compare_digest(mac.encode(), _b64(self._mac("flow", body)).encode()):
            return None
        try:
            tx, next_, started, max_age, forced = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        if not (0 <= now - started <= FLOW_TTL):
            return None
        return Flow(tx, next_, float(started), max_age, bool(forced))

    def state_matches(self, flow: Flow, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.state(flow).encode())


__all__ = ["FLOW_TTL", "Flow", "Flows"]
