"""Local users, the embedded identity source: argon2id password hashes in the store."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .store.base import User

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY = _hasher.hash("lapse-timing-equaliser")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class UserError(Exception):
    """A user-management request that cannot be carried out; the message says why."""


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UserError(f"bad user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
    return name


def check_password(password: str) -> str:
    if len(password) < 8:
        raise UserError("password too short: at least 8 characters")
    if len(password) > 1024:
        raise UserError("password too long: at most 1024 characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def verify_password(user: User | None, password: str) -> bool:
    """True if ``password`` is the user's; costs the same when the user does not exist."""
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False
