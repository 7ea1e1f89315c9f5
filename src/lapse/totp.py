"""The second factor: time-based one-time codes (RFC 6238) and one-time recovery codes.

A user's factor lives in ``User.extra["totp"]`` in the store, so every replica
sees it: the base32 secret, the last time step a code was accepted for, and
SHA-256 hashes of the unused recovery codes. The secret and the hashes are
sealed (``lapse.sealed``, bound to the user): a copy of the store yields
neither the seed nor hashes to search (~49-bit codes under one unsalted hash
would fall to a GPU in hours). Everything here is pure: callers pass the clock
and write back the state it returns.

Codes are accepted within one step (30 s) either side of now, and never twice:
a code's step must be later than the last accepted one (RFC 6238 §5.2), so a
code seen over a shoulder or replayed from a log is refused. Callers also claim
what they spent in the store (``spent_what`` + ``first_use``), so two replicas
checking one code at the same instant cannot both accept it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, replace
from typing import Any

import pyotp

from .sealed import Sealer

STEP = 30  # seconds per code (RFC 6238 default; what every authenticator app uses)
WINDOW = 1  # steps accepted either side of now
RECOVERY_CODES = 10
CLAIM_KEEP = 24 * 3600.0  # seconds a spent code stays claimed in the store (``spent_what``)
ISSUER = "lapse"


@dataclass(frozen=True, slots=True)
class Factor:
    secret: str  # base32
    last_step: int = -1  # the step of the last accepted code
    recovery: tuple[str, ...] = ()  # SHA-256 hex of each unused recovery code

    def to_dict(self, sealer: Sealer, user: str) -> dict[str, Any]:
        """For ``User.extra["totp"]`` of ``user`` (the stored name): secret and recovery hashes sealed to that user."""
        return {"secret": sealer.seal(self.secret, _owner(user)), "last_step": self.last_step,
                "recovery": sealer.seal(json.dumps(list(self.recovery)), _owner(user))}

    @classmethod
    def from_extra(cls, extra: dict[str, Any], sealer: Sealer, user: str) -> Factor | None:
        """The factor of ``user`` (the stored name); ``SealError`` if its secret does not open."""
        raw = extra.get("totp")
        if not raw:
            return None
        secret = sealer.open(str(raw["secret"]), _owner(user))
        recovery = raw.get("recovery", [])
        if isinstance(recovery, str):  # sealed; a list is from before sealing
            recovery = json.loads(sealer.open(recovery, _owner(user)))
        return cls(secret, int(raw.get("last_step", -1)), tuple(recovery))


def enrolled(extra: dict[str, Any]) -> bool:
    """Does this user have a factor? (Nothing is opened to tell.)"""
    return bool(extra.get("totp"))


def _owner(user: str) -> str:
    return f"totp:{user}"


def new_secret() -> str:
    return pyotp.random_base32(32)  # 160 bits, as RFC 4226 recommends


def uri(secret: str, user: str, issuer: str = ISSUER) -> str:
    """The ``otpauth://`` URI authenticator apps scan."""
    return pyotp.TOTP(secret, interval=STEP).provisioning_uri(name=user, issuer_name=issuer)


def enrol(secret: str) -> tuple[Factor, list[str]]:
    """A new factor and its recovery codes (shown once, stored hashed)."""
    codes = [_recovery_code() for _ in range(RECOVERY_CODES)]
    return Factor(secret, -1, tuple(_hash(c) for c in codes)), codes


def code_at(secret: str, now: float) -> str:
    """The code an authenticator shows at ``now`` (tests, and the enrolment check)."""
    return pyotp.TOTP(secret, interval=STEP).at(int(now))


def verify(factor: Factor, code: str, now: float) -> Factor | None:
    """The factor after accepting ``code``, or None if it is wrong or already used.

    A 6-digit code is checked against the steps around now; anything shaped
    like a recovery code against the unused ones (and that one is spent).
    """
    code = "".join(code.split())
    if code.isascii() and code.isdigit() and len(code) == 6:
        totp = pyotp.TOTP(factor.secret, interval=STEP)
        current = int(now) // STEP
        for step in range(current - WINDOW, current + WINDOW + 1):
            if step > factor.last_step and hmac.compare_digest(totp.generate_otp(step), code):
                return replace(factor, last_step=step)
        return None
    digest = _hash(code.lower())
    for i, stored in enumerate(factor.recovery):
        if hmac.compare_digest(stored, digest):
            return replace(factor, recovery=factor.recovery[:i] + factor.recovery[i + 1 :])
    return None


def spent_what(before: Factor, after: Factor) -> str:
    """What ``verify`` spent going from ``before`` to ``after``: a name for claiming it once across
    replicas (``store.first_use``), since two of them may check the same code at the same instant."""
    if after.last_step != before.last_step:
        return f"step:{after.last_step}"
    used = set(before.recovery) - set(after.recovery)
    return "recovery:" + ",".join(sorted(used))


def _recovery_code() -> str:
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud and typed by people
    raw = "".join(secrets.choice(alphabet) for _ in range(10))  # ~49 bits
    return f"{raw[:5]}-{raw[5:]}"


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()
