"""``sqlite:///PATH``: the embedded default store, one file on the local disk.

Why no threads. The methods are ``async def`` but call the stdlib ``sqlite3``
module directly on the event loop. Every call is one or a few indexed
statements on a local file (microseconds); handing each to a worker thread,
as aiosqlite does, costs more than the work itself. The one way a call can
take long is waiting for another process's write lock, and that wait is
bounded by ``busy_timeout`` (then ``StoreUnavailable``: callers fail closed).
Use one handle from one event loop at a time. Every method but ``write``
runs to completion without yielding; ``write`` waits for its group commit
(below), and its guard makes it atomic all the same.

Durability. The file runs in WAL mode with ``synchronous=NORMAL``: a commit
is in the WAL (in the OS page cache) before ``write`` returns, so killing the
process (``kill -9``, a crash) loses no committed transaction. Only a power
loss or OS crash can roll back the last few commits (the WAL is fsynced at
checkpoints, not at every commit); the file itself is never corrupted. That
is the right trade for session clocks: a lost last write judges a session
idle early, never late.

Atomic writes. The hot path of ``write`` is ONE statement (in autocommit, or
in its turn's group commit, below): an optimistic ``UPDATE ... WHERE key = ? AND ended_at IS NULL AND activity = ?
AND auth_time = ?`` guarded by ``before``'s clocks. When it matches, the
stored staircase is ``before``'s, so the merged staircase can be computed
here, and the other clocks are merged forward by SQL (``max``) against the
stored row; the row written is exactly ``apply_write``'s. Only when it touches
no row (the clocks moved, the session ended or is gone) does ``write`` fall
back to reading the row and writing ``apply_write``'s record, in a transaction. A write
that carries audit events (an end: the ``store`` sink) runs the same UPDATE
(or that fallback) and the audit INSERT in one short transaction instead, so
the end and its event commit together; requests that are allowed carry none
and keep the one-statement path.

Group commit. The event-free writes of one event-loop turn (the requests
that moved a session's clocks) share one transaction: each caller queues its
write and waits; at the end of the turn one ``BEGIN IMMEDIATE`` runs their
guarded UPDATEs one by one (each with its own outcome, the slow path
included), one ``COMMIT`` and one bump of the change counter answer them all.
No caller hears APPLIED before its write is committed, so what other handles
see, and when, is as before; under load, with every request writing (100k
sessions), it took 15-20% off a request's cost (bench/README.md, "Fifth session"). Nothing overtakes a queued write on this
handle: reading a session with a write queued, an immediate write (an end,
or one with events) and ``close`` commit the queue first, so this handle never
judges from a record older than what it already decided. If one write in the
batch is refused (a bug), each is tried again on its own, so it fails no
other; if the store is in trouble (locked past ``busy_timeout``, I/O), every
write of the turn is told so. ``group_commit = False`` writes each at once
(the sync middleware's bridge, whose request threads run the store without a loop).

Off the request path. SQLite's automatic WAL checkpoint runs inside whichever
commit crosses its threshold and waits for the disk to sync; here it is off on
the serving connection, and a small thread with its own connection checkpoints
once a second instead (``CHECKPOINT_EVERY``), so no request waits for a sync.
Requests do not move ``expires_at`` either (the sweeper does, see
``core.decide.sweep``), so the common write touches the row and no index.

Layout, kept small per session: the key is the keyed hash (the raw session ID
never reaches the store) stored as 16 raw bytes when it is lowercase hex; the
activity staircase is packed float64 pairs (``inf`` round-trips); groups are
one string joined by U+001F. ``sessions`` is ``WITHOUT ROWID``, so a row lives
once, in its primary-key b-tree.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import mmap
import os
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..core import activity as stats_codec
from ..core.events import AuditEvent
from ..core.session import Session, Staircase, merge_activity
from .base import AuditQuery, SessionExists, SsoLink, StoreUnavailable, User, WriteResult, apply_write
from .watch import Callback, Watchers

log = logging.getLogger("lapse.store")

SCHEMA_VERSION = 3  # 2: sessions.stats (activity statistics, issue 8); 3: sessions.device
GROUP_SEP = "\x1f"  # ASCII unit separator: never part of a sane group name
PURGE_BATCH = 1000
CHECKPOINT_EVERY = 1.0  # seconds between background WAL checkpoints
CACHE_KIB = 65536  # page cache per connection (SQLite's default is 2 MiB)
CACHE_SESSIONS = 100_000  # decoded sessions kept per connection (forgotten at once when full)
TRUST = 0.1  # seconds the decoded sessions are trusted before PRAGMA data_version is asked again
MMAP_BYTES = 1 << 30  # map the file (up to 1 GiB): reads without a syscall per page
WATCH_POLL = 0.25  # seconds between looks at the change counter while connections watch (store.watch)
WATCH_MARGIN = 5.0  # ends written up to this long before the last look are asked for again (clock skew)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sessions (
    key          BLOB PRIMARY KEY,      -- keyed hash: 16 raw bytes, or the text as given
    user         TEXT NOT NULL,
    auth_time    REAL NOT NULL,
    created_at   REAL NOT NULL,
    activity     BLOB NOT NULL,         -- staircase: little-endian float64 (limit, ts) pairs
    last_seen_at REAL NOT NULL,
    expires_at   REAL NOT NULL,
    ip           TEXT,
    mfa          INTEGER NOT NULL,
    groups       TEXT,                  -- NULL: none, else joined by U+001F
    ended_at     REAL,
    end_reason   TEXT,
    stats        BLOB,                  -- core.activity.pack: NULL until the first activity write
    device       TEXT                   -- core.device label (at most 40 characters), NULL: not known
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS sessions_due   ON sessions (expires_at) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS sessions_user  ON sessions (user)       WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (ended_at)   WHERE ended_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    admin         INTEGER NOT NULL,
    disabled      INTEGER NOT NULL,
    groups        TEXT,
    created_at    REAL NOT NULL,
    extra         TEXT NOT NULL         -- JSON object
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    ts    REAL NOT NULL,                -- exact (the JSON's ts is RFC 3339 to the millisecond)
    event TEXT NOT NULL                 -- AuditEvent.to_dict() as JSON
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);

CREATE TABLE IF NOT EXISTS failures (
    key   TEXT PRIMARY KEY,             -- "user:NAME", "ip:NETWORK", "totp:NAME", "cookie:ADDRESS"
    start REAL NOT NULL,                -- when the current window began
    count INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sso_links (   -- OIDC sign-ins beside their sessions (store.base.SsoLink)
    session       TEXT PRIMARY KEY,      -- the session key (keyed hash)
    issuer        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    sid           TEXT,
    id_token      TEXT,
    refresh_token TEXT,
    admin         INTEGER NOT NULL,
    checked_at    REAL NOT NULL,
    keep_until    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sso_links_sid     ON sso_links (issuer, sid) WHERE sid IS NOT NULL;
CREATE INDEX IF NOT EXISTS sso_links_subject ON sso_links (issuer, subject);
CREATE INDEX IF NOT EXISTS sso_links_keep    ON sso_links (keep_until);

CREATE TABLE IF NOT EXISTS seen_once (   -- first_use markers (logout-token jti)
    key   TEXT PRIMARY KEY,
    until REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS claims (      -- claim: set-once values (OIDC user-name bindings), never purged
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

_LINK_COLUMNS = "session, issuer, subject, sid, id_token, refresh_token, admin, checked_at, keep_until"

_COLUMNS = (
    "key, user, auth_time, created_at, activity, last_seen_at, expires_at, ip, mfa, groups, ended_at, end_reason, "
    "stats, device"
)
_SELECT = f"SELECT {_COLUMNS} FROM sessions"
_SELECT_ONE = _SELECT + " WHERE key = ?"
_ENDED_SINCE = "SELECT key FROM sessions WHERE ended_at IS NOT NULL AND ended_at >= ?"  # the sessions_ended index
_INSERT = f"INSERT INTO sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_REWRITE = (
    "UPDATE sessions SET user = ?, auth_time = ?, created_at = ?, activity = ?, last_seen_at = ?, "
    "expires_at = ?, ip = ?, mfa = ?, groups = ?, ended_at = ?, end_reason = ?, stats = ?, device = ? WHERE key = ?"
)
_GUARD = "WHERE key = :key AND ended_at IS NULL AND activity = :before_activity AND auth_time = :before_auth"
# apply_write when stored.activity == before.activity (the guard): SET expressions see the row before the update.
_MERGE_FORWARD = (
    "UPDATE sessions SET activity = :activity, last_seen_at = max(last_seen_at, :last_seen_at), "
    "ip = CASE WHEN :last_seen_at >= last_seen_at THEN :ip ELSE ip END, end_reason = :end_reason " + _GUARD
)
# The same, for the rare write that moves the sweeper's bound (only then is its index touched).
_MERGE_FORWARD_DEADLINE = _MERGE_FORWARD.replace("end_reason = :end_reason", "end_reason = :end_reason, expires_at = :expires_at")
# Activity moved: its statistics move with it (core.activity), in the same statement.
_MERGE_FORWARD_STATS = _MERGE_FORWARD.replace("end_reason = :end_reason", "end_reason = :end_reason, stats = :stats")
_MERGE_FORWARD_DEADLINE_STATS = _MERGE_FORWARD_DEADLINE.replace(
    "end_reason = :end_reason", "end_reason = :end_reason, stats = :stats"
)
# apply_write's end: the stored record as it is, with the end recorded.
_END = "UPDATE sessions SET ended_at = :ended_at, end_reason = :end_reason " + _GUARD
_INSERT_AUDIT = "INSERT INTO audit (ts, event) VALUES (?, ?)"

_HEX = re.compile(r"(?:[0-9a-f]{2})+")


class SchemaError(StoreUnavailable):
    """The database file was written by a newer lapse (or is not a lapse database)."""


# ------------------------------------------------------------------ encoding


def _pack_key(key: str) -> bytes | str:
    """Lowercase hex (the keyed hash) as raw bytes, half the size; anything else as text."""
    return bytes.fromhex(key) if _HEX.fullmatch(key) else key


def _unpack_key(value: bytes | str) -> str:
    return value.hex() if isinstance(value, bytes) else value


@lru_cache(maxsize=64)
def _pairs(n: int) -> struct.Struct:
    return struct.Struct(f"<{2 * n}d")


def _pack_activity(activity: Staircase) -> bytes:
    return _pairs(len(activity)).pack(*(x for step in activity for x in step))


def _unpack_activity(blob: bytes) -> Staircase:
    flat = _pairs(len(blob) // 16).unpack(blob)
    return tuple(zip(flat[::2], flat[1::2]))


def _pack_groups(groups: Sequence[str]) -> str | None:
    if not groups:
        return None
    for group in groups:
        if GROUP_SEP in group:
            raise ValueError(f"group name {group!r} contains a control character (U+001F)")
    return GROUP_SEP.join(groups)


def _unpack_groups(value: str | None) -> tuple[str, ...]:
    return () if value is None else tuple(value.split(GROUP_SEP))


def _row(s: Session) -> tuple[Any, ...]:
    return (
        _pack_key(s.key),
        s.user,
        s.auth_time,
        s.created_at,
        _pack_activity(s.activity),
        s.last_seen_at,
        s.expires_at,
        s.ip,
        int(s.mfa),
        _pack_groups(s.groups),
        s.ended_at,
        s.end_reason,
        stats_codec.pack(s.stats),
        s.device,
    )


def _session(row: tuple[Any, ...]) -> Session:
    try:
        return _decode(row)
    except (TypeError, ValueError, struct.error, IndexError) as exc:  # someone edited the file by hand
        raise StoreUnavailable(f"sqlite store: the session record under {row[0]!r} is damaged: {exc}") from exc


def _decode(row: tuple[Any, ...]) -> Session:
    key, user, auth, created, activity, seen, expires, ip, mfa, groups, ended_at, reason, stats, device = row
    return Session(
        key=_unpack_key(key),
        user=user,
        auth_time=auth,
        created_at=created,
        activity=_unpack_activity(activity),
        last_seen_at=seen,
        expires_at=expires,
        ip=ip,
        mfa=bool(mfa),
        groups=_unpack_groups(groups),
        ended_at=ended_at,
        end_reason=reason,
        stats=stats_codec.unpack(stats),
        device=device,
    )


def _link(row: tuple[Any, ...]) -> SsoLink:
    session, issuer, subject, sid, id_token, refresh_token, admin, checked_at, keep_until = row
    return SsoLink(session, issuer, subject, sid, id_token, refresh_token, bool(admin), checked_at, keep_until)


def _float(x: float) -> float:
    """SQLite stores NaN as NULL; refuse it before it breaks a NOT NULL column or a comparison."""
    if math.isnan(x):
        raise ValueError("NaN is not a timestamp")
    return x


# --------------------------------------------------------------------- store


class SqliteStore:
    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time, *, busy_timeout: float = 2.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        with self._errors("open"):
            _private_file(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout, check_same_thread=False)
            self._db = db
            try:
                db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreUnavailable(f"sqlite store {self.path}: cannot use WAL journaling (got {mode!r})")
                _tune(db)
                self._migrate(db)
            except BaseException:
                self._db = None
                db.close()
                raise
        self._checkpointer = _Checkpointer(self.path, busy_timeout)
        # Sessions as this handle last read or wrote them, trusted only while no other handle
        # (another worker, the CLI) has changed sessions since: the shared counter says so. Its name
        # comes from the file's real path, so handles opened through a symlink (or ``..``) share it.
        with self._errors("open"):
            real = Path(os.path.realpath(self.path))
            self._changes = _Changes(real.with_name(real.name + "-changes"))
        self._cache: dict[str, Session] = {}
        self._seen = self._changes.current()
        # And at most TRUST seconds at a time without asking SQLite whether anyone committed meanwhile
        # (``PRAGMA data_version``): this covers changes the counter never heard of (another program, a
        # writer killed between its commit and its bump).
        self._version = self._db.execute("PRAGMA data_version").fetchone()[0]  # type: ignore[union-attr]
        self._verify_at = time.monotonic() + TRUST
        self._watchers = Watchers()
        self._poller: asyncio.Task[None] | None = None
        # Event-free writes waiting for this turn's group commit (``_commit_queued``), and their keys.
        self.group_commit = True
        self._queued: list[tuple[Session, Session, asyncio.Future[WriteResult]]] = []
        self._queued_keys: set[str] = set()

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")  # two processes opening a fresh file at once: one creates
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise SchemaError(
                        f"sqlite store {self.path}: schema version {version} was written by a newer lapse "
                        f"(this one understands up to {SCHEMA_VERSION}); upgrade lapse or use another file"
                    )
            elif tables - {"sqlite_sequence"}:
                raise SchemaError(f"sqlite store {self.path}: not a lapse database (tables: {sorted(tables)})")
            for statement in _statements(_SCHEMA):  # not executescript: it would COMMIT first
                db.execute(statement)
            columns = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
            if "stats" not in columns:  # schema 1 -> 2: a NULL column, no rewrite of existing rows
                db.execute("ALTER TABLE sessions ADD COLUMN stats BLOB")
            if "device" not in columns:  # 2 -> 3: the same (sessions from before read "not known")
                db.execute("ALTER TABLE sessions ADD COLUMN device TEXT")
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """I/O trouble (locked past the timeout, disk I/O, not a database) becomes ``StoreUnavailable``."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # a bug or a duplicate key, not an unavailable store
        except sqlite3.DatabaseError as exc:  # OperationalError included
            raise StoreUnavailable(f"sqlite store {self.path}: {what} failed: {exc}") from exc
        except OSError as exc:  # the folder cannot be created
            raise StoreUnavailable(f"sqlite store {self.path}: {what} failed: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (tests and maintenance commands); ``StoreUnavailable`` once closed."""
        if self._db is None:
            raise StoreUnavailable(f"sqlite store {self.path}: closed")
        return self._db

    # ---------------------------------------------------------- sessions

    async def now(self) -> float:
        return self._clock()

    def _unavailable(self, what: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"sqlite store {self.path}: {what} failed: {exc}")

    async def read(self, key: str) -> tuple[Session | None, float]:
        try:  # inline, not _errors(): this is the hot path
            db = self.db
            seen = self._changes.current()
            if seen != self._seen:  # another handle changed sessions: what we remember may be stale
                self._cache.clear()
                self._seen = seen
            if time.monotonic() >= self._verify_at:
                self._verify()
            if key in self._queued_keys:  # read what this handle already decided: commit it first
                self._commit_queued()
            session = self._cache.get(key)
            if session is None:
                row = db.execute(_SELECT_ONE, (_pack_key(key),)).fetchone()
                if row is None:
                    return None, self._clock()
                session = self._remember(_session(row))
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as exc:
            raise self._unavailable("read", exc) from exc
        return session, self._clock()

    def _verify(self) -> None:
        """Forget what we remember if any other connection committed since we last asked."""
        self._verify_at = time.monotonic() + TRUST
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version = version
            self._cache.clear()

    def _changed(self) -> bool:
        """After every commit that touches sessions: tell the other handles. False (and what we
        remember forgotten) if one of them had changed sessions since we last looked."""
        before, after = self._changes.bump()
        alone = before == self._seen
        if not alone:
            self._cache.clear()
        self._seen = after
        return alone

    def _remember(self, session: Session) -> Session:
        if len(self._cache) >= CACHE_SESSIONS:
            self._cache.clear()
        self._cache[session.key] = session
        return session

    async def create(self, session: Session, events: Sequence[AuditEvent] = ()) -> None:
        for x in (session.auth_time, session.created_at, session.last_seen_at, session.expires_at):
            _float(x)
        row = _row(session)
        with self._errors("create"):
            db = self.db
            if events:  # the session and its events (session.created), in one transaction
                db.execute("BEGIN IMMEDIATE")
            try:
                try:
                    db.execute(_INSERT, row)
                except sqlite3.IntegrityError as exc:
                    raise SessionExists("session key already exists") from exc
                if events:
                    db.executemany(_INSERT_AUDIT, _audit_rows(events))
                    db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self._changed()
        self._remember(session)

    async def write(self, before: Session, after: Session, events: Sequence[AuditEvent] = ()) -> WriteResult:
        if events or after.ended or not self.group_commit:
            # An end is written at once (a caller cancelled after it cannot lose its event), after the
            # writes queued before it (it must not overtake an activity it did not see).
            if self._queued:
                self._commit_queued()
            result = self._write_audited(before, after, events) if events else self._write(before, after)
        else:
            queued = self._queue(before, after)
            result = queued if isinstance(queued, WriteResult) else await queued
        if after.ended and result is WriteResult.APPLIED and self._watchers:
            self._watchers.notify((before.key,))  # this process's own ends: at once
        return result

    def _guarded_update(self, before: Session, after: Session) -> sqlite3.Cursor:
        """``apply_write`` as ONE statement, guarded by ``before``'s clocks: it touches no row if they moved."""
        guard = {
            "key": _pack_key(before.key),
            "before_activity": _pack_activity(before.activity),
            "before_auth": before.auth_time,
        }
        if after.ended:
            ended = {"ended_at": _float(after.ended_at), "end_reason": after.end_reason}  # type: ignore[arg-type]
            return self.db.execute(_END, {**guard, **ended})
        guard["activity"] = (
            guard["before_activity"]
            if after.activity == before.activity
            else _pack_activity(merge_activity(before.activity, after.activity))
        )
        guard["last_seen_at"] = _float(after.last_seen_at)
        guard["ip"] = after.ip
        guard["end_reason"] = after.end_reason
        # merge(): statistics go with the newer activity (stored == before's here, by the guard).
        moved = after.stats is not before.stats and after.last_active_at > before.last_active_at
        if moved:
            guard["stats"] = stats_codec.pack(after.stats)
        if after.expires_at == before.expires_at:
            return self.db.execute(_MERGE_FORWARD_STATS if moved else _MERGE_FORWARD, guard)
        guard["expires_at"] = _float(after.expires_at)
        return self.db.execute(_MERGE_FORWARD_DEADLINE_STATS if moved else _MERGE_FORWARD_DEADLINE, guard)

    def _queue(self, before: Session, after: Session) -> asyncio.Future[WriteResult] | WriteResult:
        """A write for this turn's group commit: its outcome once that has committed. Driven without an
        event loop (the sync middleware's request thread, ``middleware/sync.py``): written at once."""
        if self._queued and not self._queued[0][2].get_loop().is_running():  # stranded: its loop stopped mid-turn
            self._queued, self._queued_keys = [], set()
        if self._queued:  # this turn's commit is scheduled: its loop is ours (no get_running_loop: a getpid)
            future: asyncio.Future[WriteResult] = self._queued[0][2].get_loop().create_future()
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return self._write(before, after)
            future = loop.create_future()
            loop.call_soon(self._commit_queued)
        self._queued.append((before, after, future))
        self._queued_keys.add(before.key)
        return future

    def _commit_queued(self) -> None:
        """This turn's event-free writes: one transaction, each guarded UPDATE with its own outcome."""
        batch, self._queued, self._queued_keys = self._queued, [], set()
        batch = [queued for queued in batch if not queued[2].done()]  # a caller that gave up: its write is not made
        if len(batch) < 2:  # alone: one UPDATE in autocommit, no BEGIN and COMMIT around it
            for before, after, future in batch:
                _settle(future, self._attempt(before, after))
            return
        try:
            results = self._transaction_of(batch)
            alone = self._changed()
        except (sqlite3.OperationalError, OSError, StoreUnavailable) as exc:  # locked, I/O, closed: all hear it
            failure = exc if isinstance(exc, StoreUnavailable) else self._unavailable("write", exc)
            for _, _, future in batch:
                _settle(future, failure)
            return
        except Exception:  # noqa: BLE001 - one write's own trouble (a bug): each alone, so it fails no other
            for before, after, future in batch:
                _settle(future, self._attempt(before, after))
            return
        once = len({before.key for before, _, _ in batch}) == len(batch)
        for (before, after, future), (result, guarded) in zip(batch, results):
            self._remembered(before, after, applied=guarded and alone and once)
            _settle(future, result)

    def _attempt(self, before: Session, after: Session) -> WriteResult | BaseException:
        try:
            return self._write(before, after)
        except Exception as exc:  # noqa: BLE001 - handed to its caller
            return exc

    def _transaction_of(
        self, batch: list[tuple[Session, Session, asyncio.Future[WriteResult]]]
    ) -> list[tuple[WriteResult, bool]]:
        """(outcome, whether the guarded UPDATE alone made it) per write, all in one transaction."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            results = []
            for before, after, _ in batch:
                if self._guarded_update(before, after).rowcount == 1:
                    results.append((WriteResult.APPLIED, True))
                else:
                    results.append((self._rewrite(before, after), False))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return results

    def _remembered(self, before: Session, after: Session, *, applied: bool) -> None:
        """After a guarded UPDATE applied (and no other handle wrote meanwhile: the counter says so), the
        row is what ``before`` became; otherwise what we remember of it may be stale."""
        if applied and self._cache.get(before.key) == before:
            self._remember(apply_write(before, before, after)[1])  # type: ignore[arg-type]
        else:
            self._cache.pop(before.key, None)

    def _write(self, before: Session, after: Session) -> WriteResult:
        """One event-free write in its own transaction: the guarded UPDATE alone, in autocommit."""
        try:
            if self._guarded_update(before, after).rowcount == 1:
                self._remembered(before, after, applied=self._changed())
                return WriteResult.APPLIED
            self._cache.pop(before.key, None)
            result = self._transaction(lambda: self._rewrite(before, after))
            self._changed()
            return result
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except (sqlite3.DatabaseError, OSError) as exc:
            raise self._unavailable("write", exc) from exc

    def _write_audited(self, before: Session, after: Session, events: Sequence[AuditEvent]) -> WriteResult:
        """With events (an end, mostly): the same UPDATE (or the slow path) and their INSERT in ONE transaction."""
        rows = _audit_rows(events)

        def body() -> WriteResult:
            applied = self._guarded_update(before, after).rowcount == 1
            result = WriteResult.APPLIED if applied else self._rewrite(before, after)
            if result is WriteResult.APPLIED:
                self.db.executemany(_INSERT_AUDIT, rows)
            return result

        self._cache.pop(before.key, None)
        with self._errors("write"):
            result = self._transaction(body)
            self._changed()
        return result

    def _transaction(self, body: Callable[[], WriteResult]) -> WriteResult:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        return result

    def _rewrite(self, before: Session, after: Session) -> WriteResult:
        """The slow path, inside a transaction: the clocks moved (or the session ended): judge the stored record."""
        row = self.db.execute(_SELECT_ONE, (_pack_key(before.key),)).fetchone()
        result, record = apply_write(None if row is None else _session(row), before, after)
        if record is not None:
            fields = _row(record)
            self.db.execute(_REWRITE, fields[1:] + fields[:1])
        return result

    async def due(self, now: float, limit: int) -> list[Session]:
        with self._errors("due"):
            rows = self.db.execute(
                _SELECT + " WHERE ended_at IS NULL AND expires_at <= ? ORDER BY expires_at, key LIMIT ?",
                (now, max(limit, 0)),
            ).fetchall()
        return [_session(r) for r in rows]

    async def sessions(self, user: str | None = None) -> list[Session]:
        with self._errors("sessions"):
            if user is None:
                rows = self.db.execute(_SELECT + " WHERE ended_at IS NULL ORDER BY created_at, key").fetchall()
            else:
                rows = self.db.execute(
                    _SELECT + " WHERE user = ? AND ended_at IS NULL ORDER BY created_at, key", (user,)
                ).fetchall()
        return [_session(r) for r in rows]

    async def count_live(self) -> int:
        with self._errors("count_live"):
            return int(self.db.execute("SELECT count(*) FROM sessions WHERE ended_at IS NULL").fetchone()[0])

    async def purge(self, ended_before: float) -> int:
        """In batches, yielding to the event loop between them, so a big purge never stalls requests."""
        total = 0
        while True:
            with self._errors("purge"):
                gone = self.db.execute(
                    "DELETE FROM sessions WHERE key IN (SELECT key FROM sessions "
                    "WHERE ended_at IS NOT NULL AND ended_at < ? LIMIT ?)",
                    (ended_before, PURGE_BATCH),
                ).rowcount
                if gone:
                    self._changed()
                    self._cache.clear()
            total += gone
            if gone < PURGE_BATCH:
                return total
            await asyncio.sleep(0)

    # ------------------------------------------------------------- users

    async def get_user(self, name: str) -> User | None:
        with self._errors("get_user"):
            row = self.db.execute(
                "SELECT name, password_hash, admin, disabled, groups, created_at, extra FROM users WHERE name = ?",
                (name,),
            ).fetchone()
        return None if row is None else _user(row)

    async def put_user(self, user: User) -> None:
        row = (
            user.name,
            user.password_hash,
            int(user.admin),
            int(user.disabled),
            _pack_groups(user.groups),
            user.created_at,
            json.dumps(user.extra, separators=(",", ":")),
        )
        with self._errors("put_user"):
            self.db.execute(
                "INSERT OR REPLACE INTO users (name, password_hash, admin, disabled, groups, created_at, extra) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    async def delete_user(self, name: str) -> bool:
        with self._errors("delete_user"):
            return self.db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    async def users(self) -> list[User]:
        with self._errors("users"):
            rows = self.db.execute(
                "SELECT name, password_hash, admin, disabled, groups, created_at, extra FROM users ORDER BY name"
            ).fetchall()
        return [_user(r) for r in rows]

    # ------------------------------------------------------------- audit

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        rows = _audit_rows(events)
        if not rows:
            return
        with self._errors("append_audit"):
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT_AUDIT, rows)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise

    async def tail_audit(self, n: int) -> list[AuditEvent]:
        if n <= 0:
            return []
        with self._errors("tail_audit"):
            rows = self.db.execute("SELECT ts, event FROM audit ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [replace(AuditEvent.from_dict(json.loads(event)), ts=ts) for ts, event in reversed(rows)]

    async def search_audit(self, query: AuditQuery, limit: int | None = None) -> list[AuditEvent]:
        """Filtered in SQL (``json_extract``), so only matching events are decoded in Python."""
        where, args = [], []  # type: ignore[var-annotated]
        if query.since is not None:
            where.append("ts >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("ts < ?")
            args.append(query.until)
        if query.events:
            where.append(f"json_extract(event, '$.event') IN ({', '.join('?' * len(query.events))})")
            args.extend(query.events)
        for name in ("user", "app", "reason"):
            value = getattr(query, name)
            if value is not None:
                where.append(f"json_extract(event, '$.{name}') = ?")
                args.append(value)
        if query.session is not None:
            where.append("substr(json_extract(event, '$.session'), 1, ?) = ?")
            args.extend((len(query.session), query.session))
        sql = "SELECT ts, event FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(limit, 0))
        with self._errors("search_audit"):
            rows = self.db.execute(sql, args).fetchall()
        return [_audit_event(ts, text) for ts, text in rows]

    async def failures(self, key: str, now: float, window: float, *, add: int = 0) -> int:
        args = {"key": key, "now": now, "window": window, "add": int(add)}
        with self._errors("failures"):
            if add < 0:  # give back: only within a live window, never below 0
                row = self.db.execute(
                    "UPDATE failures SET count = MAX(0, count + :add) WHERE key = :key AND :now - start < :window "
                    "RETURNING count", args,
                ).fetchone()
                return 0 if row is None else int(row[0])
            if not add:
                row = self.db.execute("SELECT start, count FROM failures WHERE key = ?", (key,)).fetchone()
                return 0 if row is None or now - row[0] >= window else int(row[1])
            row = self.db.execute(
                "INSERT INTO failures (key, start, count) VALUES (:key, :now, :add) "
                "ON CONFLICT (key) DO UPDATE SET "
                "count = CASE WHEN :now - start >= :window THEN :add ELSE count + :add END, "
                "start = CASE WHEN :now - start >= :window THEN :now ELSE start END "
                "RETURNING count",
                args,
            ).fetchone()
            return int(row[0])

    async def clear_failures(self, key: str) -> None:
        with self._errors("clear_failures"):
            self.db.execute("DELETE FROM failures WHERE key = ?", (key,))

    async def purge_audit(self, before: float) -> int:
        gone = 0
        while True:
            with self._errors("purge_audit"):
                cur = self.db.execute(
                    "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE ts < ? LIMIT ?)", (before, PURGE_BATCH)
                )
            gone += cur.rowcount
            if cur.rowcount < PURGE_BATCH:
                return gone
            await asyncio.sleep(0)

    # -------------------------------------------------------------- sso

    async def put_link(self, link: SsoLink) -> None:
        row = (link.session, link.issuer, link.subject, link.sid, link.id_token, link.refresh_token,
               int(link.admin), _float(link.checked_at), _float(link.keep_until))
        with self._errors("put_link"):
            self.db.execute(f"INSERT OR REPLACE INTO sso_links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            row)

    async def get_link(self, session: str) -> SsoLink | None:
        with self._errors("get_link"):
            row = self.db.execute(f"SELECT {_LINK_COLUMNS} FROM sso_links WHERE session = ?", (session,)).fetchone()
        return None if row is None else _link(row)

    async def find_links(self, issuer: str, *, sid: str | None = None, subject: str | None = None) -> list[SsoLink]:
        if sid is None and subject is None:
            return []
        column, value = ("sid", sid) if sid is not None else ("subject", subject)
        with self._errors("find_links"):
            rows = self.db.execute(
                f"SELECT {_LINK_COLUMNS} FROM sso_links WHERE issuer = ? AND {column} = ? ORDER BY session",
                (issuer, value),
            ).fetchall()
        return [_link(r) for r in rows]

    async def first_use(self, key: str, until: float) -> bool:
        with self._errors("first_use"):
            cur = self.db.execute(
                "INSERT INTO seen_once (key, until) VALUES (:key, :until) "
                "ON CONFLICT (key) DO UPDATE SET until = :until WHERE seen_once.until <= :now",
                {"key": key, "until": _float(until), "now": self._clock()},
            )
            return cur.rowcount == 1

    async def forget(self, key: str) -> None:
        with self._errors("forget"):
            self.db.execute("DELETE FROM seen_once WHERE key = ?", (key,))

    async def claim(self, key: str, value: str) -> str:
        with self._errors("claim"):
            row = self.db.execute(
                "INSERT INTO claims (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = claims.value "
                "RETURNING value", (key, value),
            ).fetchone()
        return str(row[0])

    async def release(self, key: str) -> bool:
        with self._errors("release"):
            return self.db.execute("DELETE FROM claims WHERE key = ?", (key,)).rowcount == 1

    async def purge_links(self, before: float) -> int:
        with self._errors("purge_links"):
            gone = self.db.execute("DELETE FROM sso_links WHERE keep_until < ?", (before,)).rowcount
            gone += self.db.execute("DELETE FROM seen_once WHERE until < ?", (before,)).rowcount
        return gone

    # -------------------------------------------------------------- misc

    async def ping(self) -> None:
        with self._errors("ping"):
            self.db.execute("SELECT 1").fetchone()

    # ------------------------------------------------------------ watch

    def watch(self, callback: Callback) -> Callable[[], None]:
        """Ends by this handle at once; by other handles within ``WATCH_POLL`` (see ``store.watch``).

        Call from the event loop: the poller is a task of the running loop, alive while anyone watches.
        """
        unsubscribe = self._watchers.add(callback)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

        def done() -> None:
            unsubscribe()
            if not self._watchers and self._poller is not None:
                self._poller.cancel()
                self._poller = None

        return done

    async def _poll(self) -> None:
        seen = self._changes.current()
        since = self._clock() - WATCH_MARGIN
        while self._watchers and self._db is not None:
            await asyncio.sleep(WATCH_POLL)
            try:
                current = self._changes.current()
                if current == seen:
                    continue
                seen = current
                now = self._clock()
                rows = self.db.execute(_ENDED_SINCE, (since,)).fetchall()
                since = now - WATCH_MARGIN
            except (StoreUnavailable, sqlite3.DatabaseError, ValueError) as exc:
                log.warning("session watch: cannot read the store, every connection re-checks: %s", exc)
                self._watchers.notify(None)
                continue
            self._watchers.notify(_unpack_key(r[0]) for r in rows)

    async def close(self) -> None:
        if self._queued:  # written, not dropped
            self._commit_queued()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._checkpointer.stop()
        self._changes.close()
        db, self._db = self._db, None
        if db is not None:
            with self._errors("close"):
                db.close()


def _private_file(path: Path) -> None:
    """The database holds password hashes, the audit log and client IPs: its folder is created 0700 and the
    file 0600 (SQLite gives its ``-wal`` and ``-shm`` files the database's mode). One that others can
    already read is used as it is, with a warning: changing an operator's file modes is theirs to do."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if os.stat(path).st_mode & 0o077:
            log.warning("sqlite store %s: readable by others than its owner (mode %o): chmod 600 it", path,
                        os.stat(path).st_mode & 0o777)


def _tune(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    db.execute("PRAGMA journal_size_limit = 67108864")  # trim the WAL to 64 MiB after checkpoints
    db.execute("PRAGMA wal_autocheckpoint = 0")  # the _Checkpointer thread does it, off the request path
    db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    db.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")


class _Changes:
    """A counter beside the database file that every handle moves after it changes sessions.

    Why not ``PRAGMA data_version``: it is a statement per request (a few
    microseconds, more under load), while this is one read of a shared memory
    page. Readers compare it with the value they saw when they last trusted
    their memory. Writers increment it under an exclusive ``flock`` after their
    commit, so no increment is ever lost: any commit after a reader's look is
    followed by a value that reader has not seen. Changes made to the file by
    other programs (the ``sqlite3`` shell), and a commit whose writer died
    before its increment, are not announced here: ``PRAGMA data_version``,
    asked at most every ``TRUST`` seconds, bounds how long they go unseen.
    The counter is named after the database's real path (symlinks resolved).
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(self._fd).st_size < 8:
                os.ftruncate(self._fd, 8)
            self._map = mmap.mmap(self._fd, 8)
        except BaseException:
            os.close(self._fd)
            raise

    def current(self) -> bytes:
        return self._map[:8]

    def bump(self) -> tuple[bytes, bytes]:
        """Increment; (the value before, the value after)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            before = self._map[:8]
            after = ((int.from_bytes(before, "little") + 1) % (1 << 64)).to_bytes(8, "little")
            self._map[:8] = after
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return before, after

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)


class _Checkpointer:
    """Copies the WAL back into the database once a second, on its own connection and thread.

    A checkpoint syncs the disk; in a thread, it releases the GIL and keeps
    the wait out of every request. If it fails (say, a long reader), the next
    tick tries again; the WAL only grows meanwhile.
    """

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self._path = path
        self._timeout = busy_timeout
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lapse-checkpoint {path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self._path, isolation_level=None, timeout=self._timeout, check_same_thread=False)
        except sqlite3.Error:
            return
        try:
            db.execute("PRAGMA wal_autocheckpoint = 0")
            while not self._stopped.wait(CHECKPOINT_EVERY):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    continue
        finally:
            db.close()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self._timeout + CHECKPOINT_EVERY)


def _audit_rows(events: Sequence[AuditEvent]) -> list[tuple[float, str]]:
    return [(e.ts, json.dumps(e.to_dict(), separators=(",", ":"))) for e in events]


def _audit_event(ts: float, text: str) -> AuditEvent:
    """A stored event, with its exact ``ts`` from the column (no RFC 3339 parse)."""
    d = json.loads(text)
    return AuditEvent(ts, d["event"], d["outcome"], d.get("user"), d.get("session"), d.get("app"), d.get("ip"),
                      d.get("resource"), d.get("reason"), d.get("activity"))


def _user(row: tuple[Any, ...]) -> User:
    name, password_hash, admin, disabled, groups, created_at, extra = row
    return User(
        name=name,
        password_hash=password_hash,
        admin=bool(admin),
        disabled=bool(disabled),
        groups=_unpack_groups(groups),
        created_at=created_at,
        extra=json.loads(extra),
    )


def _statements(script: str) -> Iterator[str]:
    """Split a script into complete statements (a ``;`` inside a comment does not end one)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete statement in schema: {pending!r}")


def _settle(future: asyncio.Future[WriteResult], outcome: WriteResult | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _rollback(db: sqlite3.Connection) -> None:
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the connection is already broken; the original error says why


__all__ = ["SCHEMA_VERSION", "SchemaError", "SqliteStore"]
