"""The few pieces of the PostgreSQL wire protocol (v3) the gateway reads and writes.

It frames messages (one type byte, then an Int32 length that counts itself)
so that lapse's own notices and errors go between whole messages, reads the
startup packet for the user and database, and builds NoticeResponse and
ErrorResponse. Everything else passes through as bytes.
"""

from __future__ import annotations

import struct

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP = 10_000  # PostgreSQL's own limit for a startup packet
MAX_AUTH_MESSAGE = 65_535  # a client message before AuthenticationOk: PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH
MAX_MESSAGE = 1 << 30  # any message after it: PostgreSQL's own limit is 1 GB (MaxAllocSize)
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
READY = ord("Z")

SQLSTATE_IDLE = "57P05"  # idle_session_timeout
SQLSTATE_ADMIN = "57P01"  # admin_shutdown: an absolute limit or a revocation ended the session
SQLSTATE_DENIED = "28000"  # invalid_authorization_specification
SQLSTATE_PROTOCOL = "08P01"  # protocol_violation
SQLSTATE_TOO_MANY = "53300"  # too_many_connections


class ProtocolViolation(ValueError):
    """A peer broke the protocol (a bad or oversized length, a repeated SSLRequest, too slow to authenticate)."""


def startup_params(body: bytes) -> dict[str, str]:
    """The key/value pairs of a v3 startup packet (after its length and protocol code)."""
    parts = body.split(b"\x00")
    out: dict[str, str] = {}
    for k, v in zip(parts[0::2], parts[1::2], strict=False):
        if not k:
            break
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


def split(buffer: bytearray, max_length: int = MAX_MESSAGE) -> tuple[list[bytes], int]:
    """Whole messages at the start of ``buffer`` and how many bytes they take (the rest is partial).

    A length below 4 or above ``max_length`` is a ``ProtocolViolation`` as soon as the 5-byte header is
    in: the body is never waited for, so the caller buffers at most ``max_length`` plus one read.
    """
    out: list[bytes] = []
    at = 0
    while len(buffer) - at >= 5:
        (length,) = struct.unpack_from("!I", buffer, at + 1)
        if length < 4 or length > max_length:
            raise ProtocolViolation(f"bad message length {length} (at most {max_length})")
        end = at + 1 + length
        if end > len(buffer):
            break
        out.append(bytes(buffer[at:end]))
        at = end
    return out, at


def _fields(severity: str, code: str, message: str, detail: str | None = None) -> bytes:
    body = b"S" + severity.encode() + b"\x00" + b"V" + severity.encode() + b"\x00"
    body += b"C" + code.encode() + b"\x00" + b"M" + message.encode() + b"\x00"
    if detail:
        body += b"D" + detail.encode() + b"\x00"
    return body + b"\x00"


def notice(message: str, code: str = "01000") -> bytes:
    """NoticeResponse (severity WARNING; SQLSTATE 01000: warning)."""
    body = _fields("WARNING", code, message)
    return b"N" + struct.pack("!I", len(body) + 4) + body


def error(message: str, code: str, severity: str = "FATAL", detail: str | None = None) -> bytes:
    """ErrorResponse; FATAL ends the connection (the client expects the server to close)."""
    body = _fields(severity, code, message, detail)
    return b"E" + struct.pack("!I", len(body) + 4) + body


TERMINATE = b"X\x00\x00\x00\x04"
