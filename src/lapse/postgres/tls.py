"""TLS for the client side of a ``[[postgres]]`` listener: the server context, from PEM files checked up front.

Why its own module: ``lapse policy check`` (config validation) and the gateway load the files the same way, so a
pair that passes the check is the pair that serves, and every way it can be wrong (unreadable, not PEM, a key
under a passphrase, a key that is not the certificate's) is said in words, naming the config key. The gateway
re-reads the files when they change, so a renewed certificate is served without a restart (PostgreSQL itself
needs a reload for that).
"""

from __future__ import annotations

import logging
import os
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("lapse.postgres")

ALPN = "postgresql"  # what PostgreSQL 17+ servers and libpq 17+ clients negotiate
TlsKey = Literal["tls_cert", "tls_key"]


class TlsFileError(ValueError):
    """The certificate or key file cannot serve; ``key`` is the config key to blame."""

    def __init__(self, key: TlsKey, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def _read(path: Path, key: TlsKey) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for ``cert`` (PEM: the certificate, then any intermediates) and ``key`` (PEM, unencrypted).

    TLS 1.2 or later, Python's defaults otherwise (no compression, strong ciphers); ALPN ``postgresql``.
    Client certificates are not asked for: PostgreSQL authenticates the client, and lapse's TLS ends here.
    """
    cert_pem, key_pem = _read(cert, "tls_cert"), _read(key, "tls_key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsFileError("tls_cert", f"{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsFileError("tls_key", f"{key} is protected by a passphrase; lapse needs the key unencrypted "
                                      "(protect the file instead: chmod 600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError("tls_key", f"{key} holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    try:
        matches = _public(private.public_key()) == _public(chain[0].public_key())
    except (ValueError, UnsupportedAlgorithm) as exc:  # a key type this cryptography cannot handle
        raise TlsFileError("tls_cert", f"{cert}: its key type is not supported ({exc})") from None
    if not matches:
        raise TlsFileError("tls_key", f"{key} is not the private key of the certificate in {cert} "
                                      f"({chain[0].subject.rfc4514_string()})")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN])
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFileError("tls_cert", f"OpenSSL refused {cert} with {key}: {exc}") from None
    return context


def tls_warnings(cert: Path, key: Path) -> list[tuple[TlsKey, str]]:
    """What is allowed but deserves a word: a certificate outside its validity, a key others may read."""
    out: list[tuple[TlsKey, str]] = []
    try:
        first = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        stat = key.stat()
    except (OSError, ValueError):
        return out  # the errors are reported on their own
    now = datetime.now(UTC)
    if first.not_valid_after_utc < now:
        out.append(("tls_cert", f"the certificate in {cert} expired on {first.not_valid_after_utc:%Y-%m-%d}: "
                                "clients that verify it (sslmode=verify-ca, verify-full) will refuse to connect"))
    elif first.not_valid_before_utc > now:
        out.append(("tls_cert", f"the certificate in {cert} is not valid before "
                                f"{first.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"))
    if stat.st_mode & (0o037 if stat.st_uid == 0 else 0o077):  # PostgreSQL's own rule for its ssl_key_file
        out.append(("tls_key", f"{key} may be read by others (mode {stat.st_mode & 0o777:o}); PostgreSQL would "
                               "refuse such a key: chmod 600 (or 640 when owned by root)"))
    return out


class ServerTls:
    """One listener's certificate, re-read when either file changes (checked at each TLS handshake: two stats).

    A new pair that does not load (certificate renewed before its key, say) is logged and the previous one kept.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._stamp = self._stat()
        self._context = server_context(cert, key)

    def _stat(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, (self.cert, self.key)))
        except OSError:
            return None

    def context(self) -> ssl.SSLContext:
        """The context to serve this handshake with."""
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            self._stamp = stamp
            try:
                self._context = server_context(self.cert, self.key)
                log.info("postgres gateway: reloaded TLS certificate %s", self.cert)
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with the new pair, the old one serves
                log.error("postgres gateway: the changed TLS files do not load (%s); still serving the previous "
                          "certificate", exc)
        return self._context
