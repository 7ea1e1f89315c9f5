"""The secret file: keys for session-ID hashing and CSRF (CONTRACT.md §2 ``secret_file``).

One random master key, created 0600 on first start and shared by replicas.
Purpose keys are derived from it, so a key used to hash session IDs is never
also used to sign CSRF tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

MASTER_BYTES = 32


class SecretError(Exception):
    """The secret file is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Secrets:
    master: bytes

    def derive(self, purpose: str) -> bytes:
        return hmac.new(self.master, b"lapse/" + purpose.encode(), hashlib.sha256).digest()

    @property
    def session_hash_key(self) -> bytes:
        return self.derive("session-id-hash")

    @property
    def csrf_key(self) -> bytes:
        return self.derive("csrf")

    @property
    def seal_key(self) -> bytes:
        """AES-256 key for values kept sealed at rest (``lapse.sealed``)."""
        return self.derive("seal")


def load_or_create(path: Path) -> tuple[Secrets, list[str]]:
    """Read the secret file, creating it (0600, atomically) if absent. Returns warnings too."""
    warnings: list[str] = []
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(MASTER_BYTES) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a file another process just made
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        text = path.read_text().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
    try:
        master = bytes.fromhex(text)
    except ValueError:
        master = b""
    if len(master) < 16:
        raise SecretError(f"secret file {path} must hold at least 32 hex digits (128 bits)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"secret file {path} is readable by others: chmod 600 it")
    return Secrets(master), warnings
