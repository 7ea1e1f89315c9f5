"""Cookies and CSRF tokens: small, with the safe choice as the only choice.

The session cookie carries only the opaque ID; CSRF tokens are HMACs with
their own derived key, bound to the session (signed in) or to a random
pre-login cookie (the login form), and compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

_ID = re.compile(r"[A-Za-z0-9_-]{20,128}")
_SEEN_MAX = 4096  # Cookie headers remembered (forgotten at once when full)
_SEEN_LONGEST = 4096  # longer headers are parsed every time, never remembered


def valid_id(value: str | None) -> bool:
    """Could this be an ID lapse issued? (Anything else is refused before it is hashed.)"""
    return value is not None and _ID.fullmatch(value) is not None


def presented(sid: str | None) -> str | None:
    """The ID to judge: a cookie lapse could never have issued is judged as unknown without being hashed whole."""
    return sid if sid is None or valid_id(sid) else "invalid"


def parse_cookies(header: str) -> dict[str, str]:
    """``Cookie`` header -> dict; a malformed header yields what could be read, never an error."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in out:
            out[name] = value.strip().strip('"')
    return out


class Cookies:
    """The session cookie and the login form's CSRF cookie (CONTRACT.md §4)."""

    def __init__(self, name: str, secure: bool) -> None:
        self.name = name
        self.secure = secure
        self.csrf_name = ("__Host-" if secure else "") + "lapse-csrf"
        self._attrs = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
        # Every cookie lapse sets (the OIDC flow's too): never passed on to an upstream.
        self.names = frozenset({name, self.csrf_name, ("__Host-" if secure else "") + "lapse-oidc"})
        self._seen: dict[str, tuple[str | None, str | None]] = {}

    def session_id(self, header: str) -> str | None:
        """The session cookie's value from a ``Cookie`` header."""
        return self.presented(header)[0]

    def presented(self, header: str) -> tuple[str | None, str | None]:
        """(the session cookie's value, the ID to judge) from a ``Cookie`` header: a value lapse could
        never have issued is judged as ``invalid``, never hashed whole. Remembered per header: a
        browser sends the same one request after request, and this runs on every request."""
        try:
            return self._seen[header]
        except KeyError:
            pass
        sid = parse_cookies(header).get(self.name) if self.name in header else None
        found = (sid, presented(sid))
        if len(header) <= _SEEN_LONGEST:
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[header] = found
        return found

    def session(self, session_id: str) -> str:
        """A session cookie: no Expires/Max-Age (the server, not the browser, ends sessions)."""
        return f"{self.name}={session_id}{self._attrs}"

    def clear(self) -> str:
        return f"{self.name}={self._attrs}; Max-Age=0"

    def login_nonce(self, nonce: str) -> str:
        return f"{self.csrf_name}={nonce}{self._attrs}"


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


class Csrf:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, value: str) -> str:
        digest = hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def for_session(self, session_key: str) -> str:
        return self._mac("session", session_key)

    def for_login(self, nonce: str) -> str:
        return self._mac("login", nonce)

    def bind(self, purpose: str, value: str) -> str:
        """A MAC tying ``value`` to this gateway's secret, for values a form carries and must get back unchanged."""
        return self._mac(purpose, value)

    @staticmethod
    def same(given: str | None, expected: str) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())


__all__ = ["Cookies", "Csrf", "new_nonce", "parse_cookies", "valid_id"]
