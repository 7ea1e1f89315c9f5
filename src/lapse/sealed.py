"""Secrets lapse keeps for later, sealed at rest: TOTP seeds and OIDC tokens.

A copy of the store (a backup, a stolen disk, a Redis replica, a database
dump) must not hand out users' second factors or tokens the IdP would honour.
So these values are sealed with AES-256-GCM under a key derived from the secret
file (``Secrets.derive("seal")``), and bound to what they belong to (the user,
the session) as associated data: a sealed value copied into another record does
not open. Values written before sealing existed are plain text; they are still
read, and sealed the next time they are written.

The secret file now protects these too: keep it with the store's backups. A
value that no longer opens (the secret file was replaced, or the value was
altered) raises ``SealError``; callers refuse what depended on it and say so.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "sealed:v1:"
_NONCE = 12  # bytes: GCM's standard nonce, random per value (2^-32 collision bound is far off at these counts)


class SealError(Exception):
    """A sealed value that does not open: another secret file, another owner, or altered."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plain: str, owner: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, _bytes(plain), _bytes(owner))
        return PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def open(self, value: str, owner: str) -> str:
        """The plain value (a value written before sealing is returned as it is)."""
        if not value.startswith(PREFIX):
            return value
        text = value[len(PREFIX):]
        try:
            raw = base64.urlsafe_b64decode(text.encode("ascii"))
            if base64.urlsafe_b64encode(raw).decode("ascii") != text:  # only the encoding seal() writes
                raise ValueError("not canonical base64")
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _bytes(owner)).decode("utf-8", "surrogatepass")
        except (InvalidTag, ValueError, binascii.Error) as exc:  # UnicodeError is a ValueError
            raise SealError("a sealed value does not open with this secret file (replaced, or the value "
                            "was altered)") from exc


def _bytes(text: str) -> bytes:
    """UTF-8, lone surrogates included: whatever str an IdP's JSON decoded to seals and opens unchanged."""
    return text.encode("utf-8", "surrogatepass")
