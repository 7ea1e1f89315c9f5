"""How a session is laid out in Redis: one packed string per session, and its keys.

Why a packed string and not a hash. A Redis hash of a dozen fields costs a
few hundred bytes of listpack and field names per session; the same record
packed with ``struct`` is ~80 bytes (target: at most 512 bytes of Redis
memory per live session, indexes included). Nothing in Redis needs to look
inside it: the write script compares and swaps whole records, so the layout
is Python's business alone.

Layout (little-endian): a version byte, flags (mfa, ended), the number of
staircase steps, five float64 (auth_time, created_at, last_seen_at,
expires_at, ended_at or 0), the staircase as float64 pairs, then four
length-prefixed UTF-8 strings: user, ip, end_reason, groups (joined by
U+001F, as in SQLite), and in version 2 a fifth, the device label; then the
activity statistics, once a write has made some. ``None`` strings are a
length of 0xFFFF. A session without a device is still written as version 1,
so during a rolling upgrade older replicas read every session they could read
before; only sessions signed in with a device need the newer reader.

Version 3 is version 2 with a 4-byte length before the groups, for the rare
session whose joined groups take 65,535 bytes or more (an IdP's ``groups``
claim of thousands of entries): SQLite and memory store any groups, so Redis
does too rather than fail the sign-in. Only such sessions are written as
version 3; a replica from before it refuses them as damaged (503 for that
session alone), as version 1 readers do version 2. The other strings (user,
IP, end reason, device) keep the 2-byte length: lapse bounds them far below.

Keys. A session lives under ``PREFIX{NN}s<member>``, where ``{NN}`` is a hash
tag naming one of ``SHARDS`` shards (from the session key) and ``member`` is
the session key itself, packed: the keyed hash (32 lowercase hex digits) as
its 16 raw bytes, anything else as its UTF-8 text. The shard's sweeper index
``PREFIX{NN}due`` and ended index ``PREFIX{NN}end`` share the hash tag, so on a
Cluster one script can update a session and its indexes atomically, and the
indexes are spread over ``SHARDS`` slots instead of one hot key.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
import zlib
from functools import lru_cache

from ..core import activity as activity_stats
from ..core.session import Session, Staircase

VERSION = 3  # the newest record version: 1 (no device), 2 (device), 3 (2 with a 4-byte groups length), all read
SHARDS = 64  # fixed: every replica must agree; more shards spread a Cluster's indexes over more slots
GROUP_SEP = "\x1f"
_NONE = 0xFFFF
_HEAD = struct.Struct("<BBB5d")
_LEN = struct.Struct("<H")
_LONG = struct.Struct("<I")  # the groups' length in version 3
_HEX = re.compile(r"[0-9a-f]{32}")
_MFA, _ENDED = 1, 2


class Damaged(ValueError):
    """A stored record this code cannot read (written by another version, or by hand)."""


def pack_member(key: str) -> bytes:
    """The session key as stored: 16 raw bytes for the keyed hash, else its text.

    A text key whose UTF-8 is exactly 16 bytes gets a trailing NUL so it never
    reads back as a raw hash; NUL is refused in text keys.
    """
    if _HEX.fullmatch(key):
        return bytes.fromhex(key)
    if "\x00" in key:
        raise ValueError("session keys may not contain NUL")
    raw = key.encode()
    return raw + b"\x00" if len(raw) == 16 else raw


def unpack_member(member: bytes) -> str:
    if len(member) == 16:
        return member.hex()
    if len(member) == 17 and member.endswith(b"\x00"):
        return member[:-1].decode()
    return member.decode()


def shard_of(member: bytes) -> int:
    """Which shard a session belongs to: a hash of its key, the same on every replica."""
    if len(member) == 16:
        return member[0] % SHARDS  # the keyed hash is uniform already
    return zlib.crc32(member) % SHARDS


def tag(prefix: bytes, shard: int) -> bytes:
    return prefix + b"{%02d}" % shard


def session_keys(prefix: bytes, member: bytes) -> tuple[bytes, bytes, bytes]:
    """(record, due index, ended index) of one session: all three in one hash slot."""
    t, due, ended = shard_keys(prefix, shard_of(member))
    return t + b"s" + member, due, ended


def shard_keys(prefix: bytes, shard: int) -> tuple[bytes, bytes, bytes]:
    """(hash tag, due index, ended index) of one shard; a session's record is the tag, ``s`` and its member."""
    t = tag(prefix, shard)
    return t, t + b"due", t + b"end"


@lru_cache(maxsize=64)
def _pairs(n: int) -> struct.Struct:
    return struct.Struct(f"<{2 * n}d")


def _text(value: str | None) -> bytes:
    if value is None:
        return _NO_TEXT
    raw = value.encode()
    if len(raw) >= _NONE:
        raise ValueError("string too long for a session record")
    return _LEN_PACK(len(raw)) + raw


def _finite_or_inf(x: float) -> float:
    if math.isnan(x):
        raise ValueError("NaN is not a timestamp")
    return x


# Bound once: ``pack`` runs on every write and ``unpack`` on every record a replica has not seen yet, so
# their attribute look-ups and calls are a good part of their cost (bench/README.md, Redis over HTTP).
_HEAD_PACK, _HEAD_FROM, _HEAD_SIZE = _HEAD.pack, _HEAD.unpack_from, _HEAD.size
_LEN_PACK, _LEN_FROM, _LONG_FROM = _LEN.pack, _LEN.unpack_from, _LONG.unpack_from
_NO_TEXT = _LEN.pack(_NONE)
_STEPS = itertools.chain.from_iterable
_ISNAN = math.isnan
_STATS_PACK, _STATS_UNPACK = activity_stats.pack, activity_stats.unpack
# Per record version: which of its strings (user, ip, end_reason, groups[, device]) has a 4-byte length.
_LONG_FIELDS = (None, (False,) * 4, (False,) * 5, (False, False, False, True, False))
_SESSION = Session._make  # positional, in this order:
_FIELDS = ("key", "user", "auth_time", "created_at", "activity", "last_seen_at", "expires_at", "ip", "mfa", "groups",
           "ended_at", "end_reason", "stats", "device")
assert Session._fields == _FIELDS, "redis_codec builds Session positionally: update _unpack with its fields"


def pack(s: Session) -> bytes:
    for group in s.groups:
        if GROUP_SEP in group:
            raise ValueError(f"group name {group!r} contains a control character (U+001F)")
    if _ISNAN(s.auth_time) or _ISNAN(s.created_at) or _ISNAN(s.last_seen_at) or _ISNAN(s.expires_at) or (
        s.ended_at is not None and _ISNAN(s.ended_at)
    ):
        raise ValueError("NaN is not a timestamp")
    flags = (_MFA if s.mfa else 0) | (_ENDED if s.ended_at is not None else 0)
    groups = GROUP_SEP.join(s.groups).encode() if s.groups else None
    long_groups = groups is not None and len(groups) >= _NONE
    n = len(s.activity)
    head = _HEAD_PACK(
        3 if long_groups else 1 if s.device is None else 2, flags, n,
        s.auth_time, s.created_at, s.last_seen_at, s.expires_at, 0.0 if s.ended_at is None else s.ended_at,
    )
    parts = [head, _pairs(n).pack(*_STEPS(s.activity)), _text(s.user), _text(s.ip), _text(s.end_reason)]
    if long_groups:
        parts += [_LONG.pack(len(groups)), groups, _text(s.device)]  # type: ignore[arg-type]
    else:
        parts.append(_NO_TEXT if groups is None else _LEN_PACK(len(groups)) + groups)
        if s.device is not None:
            parts.append(_text(s.device))
    stats = _STATS_PACK(s.stats)
    if stats is not None:  # absent until the first write
        parts += [_LEN_PACK(len(stats)), stats]
    return b"".join(parts)


def unpack(key: str, blob: bytes) -> Session:
    try:
        return _unpack(key, blob)
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise Damaged(f"the session record under {key[:12]}... is damaged: {exc}") from exc


def _unpack(key: str, blob: bytes) -> Session:
    version, flags, n, auth, created, seen, expires, ended_at = _HEAD_FROM(blob)
    if not 1 <= version <= VERSION:
        raise ValueError(f"record version {version}, this lapse reads 1 to {VERSION}")
    at = _HEAD_SIZE
    flat = _pairs(n).unpack_from(blob, at)
    at += 16 * n
    activity: Staircase = tuple(zip(flat[::2], flat[1::2]))
    strings: list[str | None] = []
    for long in _LONG_FIELDS[version]:
        if long:
            (length,) = _LONG_FROM(blob, at)
            at += 4
        else:
            (length,) = _LEN_FROM(blob, at)
            at += 2
            if length == _NONE:
                strings.append(None)
                continue
        strings.append(blob[at : at + length].decode())
        at += length
    stats = None
    if at < len(blob):  # the activity statistics (core.activity), once a write has made some
        (length,) = _LEN_FROM(blob, at)
        at += 2
        stats = _STATS_UNPACK(blob[at : at + length])
        at += length
    if at != len(blob):
        raise ValueError("trailing bytes")
    user, ip, reason, groups, device = strings if version > 1 else (*strings, None)
    return _SESSION((
        key, user or "", auth, created, activity, seen, expires, ip, bool(flags & _MFA),
        () if groups is None else tuple(groups.split(GROUP_SEP)), ended_at if flags & _ENDED else None, reason,
        stats, device,
    ))


def score(x: float) -> bytes:
    """A float as Redis reads a sorted-set score, exactly (``repr`` round-trips; inf as ``+inf``)."""
    if math.isinf(x):
        return b"+inf" if x > 0 else b"-inf"
    return repr(float(x)).encode()
