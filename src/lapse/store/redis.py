"""``redis://``, ``rediss://``, Sentinel and Cluster: the store for several gateway replicas.

One round trip, one clock. ``read`` is one script call that returns the
session's record together with Redis's ``TIME``, so every replica judges by
Redis's clock (skewed hosts agree) and a decision that changes nothing costs
exactly one round trip. ``decide()`` stays the only judge; the core already
coalesces writes, so the steady state is about one round trip per decision
and never more than two (read, then one compare-and-swap write). On a standalone Redis or Sentinel
the commands of one event-loop turn travel as one pipeline (``redis_batch``): the same commands, far
less client CPU each.

Writes. ``write`` carries out ``apply_write`` (store/base.py) as a
compare-and-swap (see ``redis_scripts``): atomic on one record and its
indexes, forward-only, never touching an ended record. A revocation is such a
write, so every replica sees it at its next ``read``: there is no local cache (``read`` only hands
back the Session it last decoded, or wrote, when Redis returns the very same bytes).

Expiry. Each shard's sorted set ``{NN}due`` holds the live sessions by their
sweeper deadline (``expires_at``, the most generous one); every replica's
sweeper reads all shards, and an end is a guarded write that exactly one
sweeper wins, so each ended session yields one ``session.expired``. Key TTLs
are a safety net only (``SAFETY``, ``ENDED_KEEP``): they matter only if no
sweeper runs for days.

Failure. Every connect and every reply has a timeout (``timeout`` in the URL);
a connection error, a timeout or any Redis error becomes ``StoreUnavailable``
(the gateway answers 503), logged once per outage; the client reconnects on
the next call, so recovery needs no restart.

What else lives here: users (one hash), login-failure counters (one small
hash per user or IP, expiring with their window), and the ``store`` audit sink
(a stream capped at ``audit_maxlen`` entries). docs/redis.md has the key list.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, replace
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.events import AuditEvent
from ..core.session import Session
from . import redis_scripts as lua
from .base import AuditQuery, SessionExists, SsoLink, StoreUnavailable, User, WriteResult, apply_write
from .redis_batch import AutoPipeline
from .redis_batch import pack as pack_command
from .redis_codec import (
    SHARDS,
    Damaged,
    pack,
    pack_member,
    score,
    session_keys,
    shard_keys,
    shard_of,
    tag,
    unpack,
    unpack_member,
)
from .redis_url import RedisTarget, parse_redis_url
from .watch import Callback, Watchers

log = logging.getLogger("lapse.store")

SAFETY = 7 * 86400 * 1000  # ms a live record outlives its sweeper deadline before its TTL removes it
ENDED_KEEP = 35 * 86400 * 1000  # ms an ended record is kept at most (the sweeper purges it sooner)
CAS_ATTEMPTS = 16  # compare-and-swap rounds before a write gives up (only under a storm on one session)
BATCH = 1000  # keys per pipeline or purge step
SEEN_MAX = 100_000  # sessions whose last decoded record is kept for ``read`` (forgotten at once when full)
WATCH_RETRY = 1.0  # seconds between attempts to subscribe again after the connection to Redis was lost
INDEX_GRACE = 60.0  # seconds a user's index entry is kept while its record is missing (a create in flight)
WATCH_PING = 1.0  # seconds of silence on the subscription before it asks Redis (PING) whether it is still there

Client = Redis | RedisCluster

def checked_options(client: type = Redis) -> dict[str, Any]:
    """Options that keep the pool's check of a connection before use (see ``connect``): maintenance
    notifications off, where ``client`` has that option (redis-py 8.1 on). Before 8.1 the async client
    has none (7.x and 8.0 ship the module but not the keyword) and its pool always checks."""
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:
        return {}
    if "maint_notifications_config" not in inspect.signature(client.__init__).parameters:
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


_CHECKED = checked_options()


def connect(target: RedisTarget) -> Client:
    """A client for the target, with a timeout on every connect and reply, that never sends a command twice.

    redis-py's retry sends a command again after a broken connection, even when
    Redis ran it and only the reply was lost: a second ``CREATE`` of a fresh key,
    a second ``XADD``, a counter bumped twice. So it is off here; the store sends
    again itself, once and at once, only what may run twice (``RedisStore._send``).
    A pooled connection Redis closed (a restart) is replaced by the pool before
    anything is sent on it. A timeout is never retried: every call gives up
    within about ``timeout``.

    On a standalone Redis, redis-py's maintenance notifications (a Redis Enterprise feature) are off: in
    their default ("auto") redis-py 8 skips that check of a pooled connection (``ensure_connection``), so
    the first command after a restart went out on a dead link, and one that may not run twice failed as
    "outcome unknown" (503). The auto-pipeline keeps its connections (``AutoPipeline._checkout``) and
    relies on that same check. Sentinel and Cluster keep redis-py's defaults.
    """
    common: dict[str, Any] = dict(
        socket_timeout=target.timeout,
        socket_connect_timeout=target.timeout,
        retry=Retry(NoBackoff(), 0),
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **target.tls_options,
    )
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return RedisCluster(startup_nodes=nodes, **common)
    if target.kind == "sentinel":
        sentinels = Sentinel(
            list(target.hosts),
            sentinel_kwargs={
                "password": target.sentinel_password,
                "socket_timeout": target.timeout,
                "socket_connect_timeout": target.timeout,
            },
            **common,
        )
        return sentinels.master_for(target.service, db=target.db)
    host, port = target.hosts[0]
    return Redis(host=host, port=port, db=target.db, **common, **_CHECKED)


class RedisStore:
    """The ``SessionStore`` port on Redis. ``clock`` replaces Redis's ``TIME`` (tests only)."""

    def __init__(self, url: str, clock: Callable[[], float] | None = None) -> None:
        self.target = parse_redis_url(url)
        self._r = connect(self.target)
        # Standalone and Sentinel: one pipeline per event-loop turn (redis_batch). A Cluster client routes
        # each command to its master, so there every script call stays its own command. Standalone only: the
        # pipeline keeps its connections between batches (``AutoPipeline._checkout`` says why not on Sentinel).
        self._batch = None if isinstance(self._r, RedisCluster) else AutoPipeline(
            self._r, self.target.timeout, hold=self.target.kind == "standalone")
        # key -> (record key, member, packed READ command, record bytes, Session) of the last read or write:
        # identical bytes give back the identical object, which lets Gate reuse its answer (enforce.py)
        # without decoding or judging again. Not a cache: every read still asks Redis.
        self._seen: dict[str, _Seen] = {}
        self._clock = clock
        self._prefix = self.target.prefix.encode()
        self._shards = [shard_keys(self._prefix, n) for n in range(SHARDS)]  # (tag, due, ended) by shard
        self._users = self._prefix + b"users"
        self._audit = self._prefix + b"audit"
        self._sha = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}
        self._down = False
        self._ended_channel = self._prefix + b"ended"  # the WRITE script publishes each end here
        self._watchers = Watchers()
        self._listener: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ plumbing

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        message = f"redis store {self.target.redacted()}: {what} failed: {exc or type(exc).__name__}"
        if not self._down:
            log.error("%s (failing closed until it answers)", message)
            self._down = True
        return StoreUnavailable(message)

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.warning("redis store %s answers again", self.target.redacted())

    async def _send(self, call: Callable[[], Awaitable[Any]], resend: bool) -> Any:
        """``call()``, once more at once after a broken connection if ``resend`` (running it twice is harmless).

        Otherwise the error stands: the command may have run, and the caller fails closed (503) rather
        than run it twice (finding: a revocation reported as ENDED, a sign-in as SessionExists).
        """
        try:
            return await call()
        except RedisConnectionError:
            if not resend:
                raise
        return await call()

    async def _command(self, command: tuple[Any, ...], resend: bool) -> Any:
        if self._batch is not None:  # the pipeline resends what may run twice itself
            return await self._batch.call(pack_command(command), resend=resend)
        return await self._send(lambda: self._r.execute_command(*command), resend)

    async def _eval(self, script: str, keys: Sequence[bytes], args: Iterable[Any] = (), *, resend: bool = True) -> Any:
        """Run a script; ``resend=False`` for those that must not run twice (``FAILURES``, ``FIRST_USE``)."""
        command = ("EVALSHA", self._sha[script], len(keys), *keys, *args)
        try:
            return await self._command(command, resend)
        except NoScriptError:  # a fresh or restarted Redis: load it (on every primary of a Cluster)
            await self._send(lambda: self._r.script_load(script), True)
            return await self._command(command, resend)

    async def _pipeline(self, what: str, commands: Iterable[tuple[Any, ...]], *, resend: bool = True) -> list[Any]:
        """Many single-key commands in one round trip per node (Cluster pipelines route each command).

        ``resend=False`` where running them twice would do harm (``XADD``).
        """
        out: list[Any] = []
        batch = list(commands)
        try:
            for i in range(0, len(batch), BATCH):
                chunk = batch[i : i + BATCH]
                out.extend(await self._send(lambda chunk=chunk: self._execute(chunk), resend))  # type: ignore[misc]
        except (RedisError, OSError) as exc:
            raise self._unavailable(what, exc) from exc
        return out

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._r.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    def _session_keys(self, member: bytes) -> tuple[bytes, bytes, bytes, bytes]:
        """Record, due index, ended index and write marker (``redis_scripts``): one slot. The shard's keys are
        made once (``_shards``): this runs on every write."""
        t, due, ended = self._shards[shard_of(member)]
        return t + b"s" + member, due, ended, t + b"w" + member

    def _record_key(self, member: bytes) -> bytes:
        return tag(self._prefix, shard_of(member)) + b"s" + member

    def _user_key(self, user: str) -> bytes:
        """The user's sessions as older versions kept them (a set): still read, never added to."""
        return self._prefix + b"u:" + user.encode()

    def _user_index(self, user: str) -> bytes:
        """The user's sessions, scored by creation (store clock): ``_sessions_of`` says why."""
        return self._prefix + b"uz:" + user.encode()

    def _decode(self, key: str, blob: bytes) -> Session:
        try:
            return unpack(key, blob)
        except Damaged as exc:
            raise StoreUnavailable(f"redis store: {exc}") from exc

    # ------------------------------------------------------------ sessions

    async def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        try:
            sec, usec = await self._send(self._r.time, True)
        except (RedisError, OSError) as exc:
            raise self._unavailable("now", exc) from exc
        self._answered()
        return sec + usec / 1_000_000

    async def read(self, key: str) -> tuple[Session | None, float]:
        seen = self._seen.get(key)
        if seen is not None:
            record_key, member, command = seen[0], seen[1], seen[2]
        else:
            try:
                member = pack_member(key)
            except ValueError:
                return None, await self.now()
            record_key = self._record_key(member)
            command = pack_command(("EVALSHA", self._sha[lua.READ], 1, record_key))
        try:
            if self._batch is None:
                (sec, usec), blob = await self._eval(lua.READ, (record_key,))
            else:
                try:
                    (sec, usec), blob = await self._batch.call(command, read_only=True)
                except NoScriptError:
                    (sec, usec), blob = await self._eval(lua.READ, (record_key,))  # loads it
        except (RedisError, OSError) as exc:
            raise self._unavailable("read", exc) from exc
        if self._down:
            self._answered()
        now = self._clock() if self._clock is not None else int(sec) + int(usec) / 1_000_000
        if blob is None:
            return None, now
        if seen is not None and seen[3] == blob:
            return seen[4], now
        session = self._decode(key, blob)
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen[key] = (record_key, member, command, blob, session)
        return session, now

    def _with_audit(self, keys: tuple[bytes, ...], args: tuple[Any, ...], events: Sequence[AuditEvent]
                    ) -> tuple[tuple[bytes, ...], tuple[Any, ...]]:
        """The script's keys and arguments with the audit stream and ``events``, where one script may
        touch both (not on a Cluster: the stream's slot is not the session's; ``write`` appends after)."""
        if not events or self.target.kind == "cluster":
            return keys, args
        return (*keys, self._audit), (*args, self.target.audit_maxlen, *_audit_fields(events))

    def create_parts(self, session: Session, events: Sequence[AuditEvent] = ()
                     ) -> tuple[bytes, bytes, tuple[bytes, ...], tuple[Any, ...]]:
        """What ``create`` sends: the user index key, the member, and the ``CREATE`` script's keys and
        arguments (bench/redis_store.py pipelines these to load a million sessions the adapter's way)."""
        member = pack_member(session.key)
        ended = session.ended_at is not None
        at = score(session.ended_at if ended else session.expires_at)  # type: ignore[arg-type]
        keys, args = self._with_audit(
            self._session_keys(member), (pack(session), member, int(ended), at, SAFETY, ENDED_KEEP, os.urandom(8).hex()),
            events,
        )
        return self._user_index(session.user), member, keys, args

    async def create(self, session: Session, events: Sequence[AuditEvent] = ()) -> None:
        index, member, keys, args = self.create_parts(session, events)
        try:
            # The user's index first: a crash in between leaves an index entry without a record
            # (skipped, and dropped once older than INDEX_GRACE), never a session that revoking the user
            # would miss. Scored by its creation, so ``sessions`` can tell an entry whose record is
            # about to be created (young) from one whose record is gone (old).
            await self._send(lambda: self._r.zadd(index, {member: session.created_at}), True)
            created = await self._eval(lua.CREATE, keys, args)
        except (RedisError, OSError) as exc:
            raise self._unavailable("create", exc) from exc
        if not created:
            raise SessionExists("session key already exists")
        if events and self.target.kind == "cluster":
            await self.append_audit(events)  # not atomic with the record: docs/audit.md

    async def write(self, before: Session, after: Session, events: Sequence[AuditEvent] = ()) -> WriteResult:
        result = await self._write(before, after, events)
        if events and result is WriteResult.APPLIED and self.target.kind == "cluster":
            await self.append_audit(events)  # not atomic with the write: docs/audit.md
        return result

    async def _write(self, before: Session, after: Session, events: Sequence[AuditEvent]) -> WriteResult:
        seen = self._seen.get(before.key)
        member = seen[1] if seen is not None else pack_member(before.key)
        keys = self._session_keys(member)
        written = _write_id()  # this write's id: its end, sent again after a lost reply, is known as its own
        # First guess: the record is still ``before`` (the caller has just read it). The swap checks it.
        stored: Session | None = before
        expected: bytes | None = seen[3] if seen is not None and seen[4] is before else pack(before)  # as read
        guessed = True
        try:
            for _ in range(CAS_ATTEMPTS):
                result, record = apply_write(stored, before, after)
                if record is None:
                    if not guessed:
                        return result
                    # A guess cannot prove a refusal: look (with the read script, so every round trip
                    # on the request path is one EVALSHA, which is how round trips are counted).
                    _, expected = await self._eval(lua.READ, keys[:1])
                elif stored is not None:
                    if record.ended_at is not None:
                        change, at = "end", score(record.ended_at)
                    elif record.expires_at != stored.expires_at:
                        change, at = "due", score(record.expires_at)
                    else:
                        change, at = "", ""
                    packed = pack(record)
                    reply = await self._eval(lua.WRITE, *self._with_audit(
                        keys, (expected, packed, member, change, at, SAFETY, ENDED_KEEP, self._ended_channel, written),
                        events,
                    ))
                    if reply[0] == 1:
                        seen = self._seen.get(before.key)
                        if seen is not None:  # Redis holds ``packed`` now: the next read of it needs no decoding
                            self._seen[before.key] = (keys[0], member, seen[2], packed, record)
                        return result
                    expected = reply[1] if len(reply) > 1 else None
                stored = None if expected is None else self._decode(before.key, expected)
                guessed = False
        except (RedisError, OSError) as exc:
            raise self._unavailable("write", exc) from exc
        raise StoreUnavailable(f"redis store: a session kept changing under {CAS_ATTEMPTS} attempts to write it")

    async def due(self, now: float, limit: int) -> list[Session]:
        if limit <= 0:
            return []
        bound = score(now)
        replies = await self._pipeline(
            "due", (("ZRANGEBYSCORE", tag(self._prefix, n) + b"due", "-inf", bound, "WITHSCORES", "LIMIT", 0, limit)
                    for n in range(SHARDS))
        )
        # redis-py pairs WITHSCORES replies up: [[member, score], ...] per shard.
        candidates = sorted((float(at), unpack_member(m), m) for pairs in replies for m, at in pairs)[:limit]
        found = await self._sessions([(key, member) for _, key, member in candidates], "due")
        return [s for s in found if s.ended_at is None and s.expires_at <= now]

    async def _sessions(self, wanted: list[tuple[str, bytes]], what: str) -> list[Session]:
        """The records of these (key, member) pairs, in order; index entries without a record are dropped."""
        blobs = await self._pipeline(what, (("GET", self._record_key(member)) for _, member in wanted))
        found, dangling = [], []
        for (key, member), blob in zip(wanted, blobs):
            if blob is None:
                dangling.append(member)  # its safety-net TTL ran out: forget the index entry
            else:
                found.append(self._decode(key, blob))
        if dangling:
            await self._pipeline(what, (("ZREM", session_keys(self._prefix, m)[1], m) for m in dangling))
        return found

    async def sessions(self, user: str | None = None) -> list[Session]:
        if user is None:
            shards = await self._pipeline(
                "sessions", (("ZRANGE", tag(self._prefix, n) + b"due", 0, -1) for n in range(SHARDS))
            )
            members = [m for shard in shards for m in shard]
            live = [s for s in await self._sessions([(unpack_member(m), m) for m in members], "sessions")
                    if s.ended_at is None]
        else:
            live = await self._sessions_of(user)
        return sorted(live, key=lambda s: (s.created_at, s.key))

    async def _sessions_of(self, user: str) -> list[Session]:
        """The user's live sessions, from the user's index (and the set older versions kept, ``u:``).

        An entry whose record is missing is dropped only once it is older than ``INDEX_GRACE``: a young one
        may be a sign-in between its index entry and its record (``create``), which revoking the user must
        still see once it is there. A missing entry of the older set, of unknown age, moves to the index
        scored now, so it gets the same grace. Ended records and another user's (a create that found its
        key taken) are dropped at once: they can never become this user's live session.
        """
        legacy, index = self._user_key(user), self._user_index(user)
        now = await self.now()
        old, scored = await self._pipeline("sessions", [
            ("SMEMBERS", legacy), ("ZRANGEBYSCORE", index, "-inf", "+inf", "WITHSCORES"),
        ])
        created = {member: float(at) for member, at in scored}
        members = sorted(set(created) | set(old))
        blobs = await self._pipeline("sessions", (("GET", self._record_key(m)) for m in members))
        live, stale, moved = [], [], []
        for member, blob in zip(members, blobs):
            session = None if blob is None else self._decode(unpack_member(member), blob)
            if session is not None and session.ended_at is None and session.user == user:
                live.append(session)
            elif session is not None or created.get(member, now) < now - INDEX_GRACE:
                stale.append(member)
            elif member not in created:
                moved.append(member)
        commands: list[tuple[Any, ...]] = [("ZADD", index, *(x for m in moved for x in (repr(now), m)))] if moved else []
        if stale or moved:
            commands += [("SREM", legacy, *stale, *moved)]
        if stale:
            commands += [("ZREM", index, *stale)]
        if commands:
            await self._pipeline("sessions", commands)
        return live

    async def count_live(self) -> int:
        counts = await self._pipeline("count_live", (("ZCARD", tag(self._prefix, n) + b"due") for n in range(SHARDS)))
        return sum(counts)

    async def purge(self, ended_before: float) -> int:
        """Shard by shard, in batches, yielding between them, so a big purge never stalls requests."""
        bound = b"(" + score(ended_before)
        total = 0
        for n in range(SHARDS):
            ended_index = tag(self._prefix, n) + b"end"
            while True:
                (members,) = await self._pipeline(
                    "purge", [("ZRANGEBYSCORE", ended_index, "-inf", bound, "LIMIT", 0, BATCH)]
                )
                if not members:
                    break
                blobs = await self._pipeline("purge", (("GET", self._record_key(m)) for m in members))
                commands: list[tuple[Any, ...]] = [("UNLINK", self._record_key(m)) for m in members]
                for member, blob in zip(members, blobs):
                    if blob is not None:
                        user = self._decode(unpack_member(member), blob).user
                        commands += [("ZREM", self._user_index(user), member), ("SREM", self._user_key(user), member)]
                commands.append(("ZREM", ended_index, *members))
                await self._pipeline("purge", commands)
                total += len(members)
                await asyncio.sleep(0)
                if len(members) < BATCH:
                    break
        return total

    # --------------------------------------------------------------- users

    async def get_user(self, name: str) -> User | None:
        (raw,) = await self._pipeline("get_user", [("HGET", self._users, name)])
        return None if raw is None else _user(name, raw)

    async def put_user(self, user: User) -> None:
        await self._pipeline("put_user", [("HSET", self._users, user.name, _user_json(user))])

    async def delete_user(self, name: str) -> bool:
        (gone,) = await self._pipeline("delete_user", [("HDEL", self._users, name)])
        return bool(gone)

    async def users(self) -> list[User]:
        (everyone,) = await self._pipeline("users", [("HGETALL", self._users)])
        return sorted((_user(name.decode(), raw) for name, raw in everyone.items()), key=lambda u: u.name)

    # --------------------------------------------------------------- audit

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        cap = self.target.audit_maxlen
        fields = _audit_fields(events)
        await self._pipeline("append_audit", (
            ("XADD", self._audit, "MAXLEN", "~", cap, "*", "ts", ts, "e", event)
            for ts, event in zip(fields[::2], fields[1::2])
        ), resend=False)  # an entry the lost reply hid would be appended twice

    async def tail_audit(self, n: int) -> list[AuditEvent]:
        if n <= 0:
            return []
        (entries,) = await self._pipeline("tail_audit", [("XREVRANGE", self._audit, "+", "-", "COUNT", n)])
        return [replace(AuditEvent.from_dict(json.loads(f[b"e"])), ts=float(f[b"ts"])) for _, f in reversed(entries)]

    async def search_audit(self, query: AuditQuery, limit: int | None = None) -> list[AuditEvent]:
        """Newest first through the stream in batches, filtered here (``AuditQuery.matches``).

        Entry IDs are Redis's milliseconds at append, and events carry the store's clock, which is
        Redis's too: the walk stops a minute of skew past ``since``.
        """
        found: list[AuditEvent] = []
        start = "+"
        stop_ms = None if query.since is None else int((query.since - 60) * 1000)
        while True:
            (entries,) = await self._pipeline("search_audit", [("XREVRANGE", self._audit, start, "-", "COUNT", BATCH)])
            for _, f in entries:
                event = replace(AuditEvent.from_dict(json.loads(f[b"e"])), ts=float(f[b"ts"]))
                if query.matches(event):
                    found.append(event)
                    if limit is not None and len(found) >= limit:
                        return found
            if len(entries) < BATCH:
                return found
            last = entries[-1][0].decode()
            if stop_ms is not None and int(last.split("-", 1)[0]) < stop_ms:
                return found
            start = "(" + last

    async def purge_audit(self, before: float) -> int:
        gone = 0
        while True:
            try:
                deleted, more = await self._eval(lua.PURGE_AUDIT, (self._audit,), (repr(before), BATCH))
            except (RedisError, OSError) as exc:
                raise self._unavailable("purge_audit", exc) from exc
            gone += deleted
            if not more:
                return gone
            await asyncio.sleep(0)

    # ------------------------------------------------------------ failures

    async def failures(self, key: str, now: float, window: float, *, add: int = 0) -> int:
        try:
            return int(await self._eval(lua.FAILURES, (self._prefix + b"f:" + key.encode(),),
                                        (repr(now), repr(window), int(add)), resend=False))
        except (RedisError, OSError) as exc:
            raise self._unavailable("failures", exc) from exc

    async def clear_failures(self, key: str) -> None:
        await self._pipeline("clear_failures", [("DEL", self._prefix + b"f:" + key.encode())])

    # ------------------------------------------------------------- SSO links
    # One JSON string per link, sets by (issuer, sid) and (issuer, subject) to find them, and sorted
    # sets by expiry for purge_links (no native TTLs: they would follow Redis's clock, not the store's).

    def _link_key(self, session: str) -> bytes:
        return self._prefix + b"l:" + session.encode()

    def _link_index(self, issuer: str, by: str, value: str) -> bytes:
        return self._prefix + f"l{by}:{issuer}\x1f{value}".encode()

    def _link_indexes(self, link: SsoLink) -> list[bytes]:
        keys = [self._link_index(link.issuer, "u", link.subject)]
        return keys + ([self._link_index(link.issuer, "s", link.sid)] if link.sid else [])

    async def put_link(self, link: SsoLink) -> None:
        old = await self.get_link(link.session)
        commands: list[tuple[Any, ...]] = [("SREM", k, link.session) for k in self._link_indexes(old)] if old else []
        commands += [("SET", self._link_key(link.session), json.dumps(asdict(link), separators=(",", ":")))]
        commands += [("SADD", k, link.session) for k in self._link_indexes(link)]
        commands += [("ZADD", self._prefix + b"links", repr(link.keep_until), link.session)]
        await self._pipeline("put_link", commands)

    async def get_link(self, session: str) -> SsoLink | None:
        (raw,) = await self._pipeline("get_link", [("GET", self._link_key(session))])
        return None if raw is None else SsoLink(**json.loads(raw))

    async def find_links(self, issuer: str, *, sid: str | None = None, subject: str | None = None) -> list[SsoLink]:
        if sid is None and subject is None:
            return []
        index = self._link_index(issuer, "s", sid) if sid is not None else self._link_index(issuer, "u", subject or "")
        (members,) = await self._pipeline("find_links", [("SMEMBERS", index)])
        names = sorted(m.decode() for m in members)
        raws = await self._pipeline("find_links", (("GET", self._link_key(n)) for n in names))
        found = [SsoLink(**json.loads(r)) for r in raws if r is not None]
        return [x for x in found if x.issuer == issuer and (x.sid == sid if sid is not None else x.subject == subject)]

    async def first_use(self, key: str, until: float) -> bool:
        now = await self.now()
        marker = self._prefix + b"o:" + key.encode()
        keep_ms = max(1, int((until - now) * 1000)) + ENDED_KEEP  # a safety net only; purge_links is the rule
        try:
            fresh = await self._eval(lua.FIRST_USE, (marker,), (repr(now), repr(until), keep_ms), resend=False)
        except (RedisError, OSError) as exc:
            raise self._unavailable("first_use", exc) from exc
        if fresh:
            await self._pipeline("first_use", [("ZADD", self._prefix + b"once", repr(until), key)])
        return bool(fresh)

    async def forget(self, key: str) -> None:
        await self._pipeline("forget", [("DEL", self._prefix + b"o:" + key.encode()),
                                        ("ZREM", self._prefix + b"once", key)])

    async def claim(self, key: str, value: str) -> str:
        """``SET NX`` then ``GET`` of one key (one Cluster slot): a claim is never changed, so the ``GET`` sees
        whichever ``SET`` won."""
        held = self._prefix + b"c:" + key.encode()
        _set, raw = await self._pipeline("claim", [("SET", held, value, "NX"), ("GET", held)])
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def release(self, key: str) -> bool:
        try:
            return bool(await self._send(lambda: self._r.delete(self._prefix + b"c:" + key.encode()), False))
        except (RedisError, OSError) as exc:
            raise self._unavailable("release", exc) from exc

    async def purge_links(self, before: float) -> int:
        links_index, once_index = self._prefix + b"links", self._prefix + b"once"
        stale_links, stale_once = await self._pipeline("purge_links", [
            ("ZRANGEBYSCORE", links_index, "-inf", f"({before!r}"),
            ("ZRANGEBYSCORE", once_index, "-inf", f"({before!r}"),
        ])
        gone = 0
        for raw_name in stale_links:
            name = raw_name.decode()
            link = await self.get_link(name)
            commands: list[tuple[Any, ...]] = [("ZREM", links_index, name)]
            if link is not None and link.keep_until < before:
                commands += [("DEL", self._link_key(name))] + [("SREM", k, name) for k in self._link_indexes(link)]
                gone += 1
            await self._pipeline("purge_links", commands)
        for raw_key in stale_once:
            await self._pipeline("purge_links", [("DEL", self._prefix + b"o:" + raw_key), ("ZREM", once_index, raw_key)])
            gone += 1
        return gone

    # ---------------------------------------------------------------- misc

    async def ping(self) -> None:
        try:
            await self._send(self._r.ping, True)
        except (RedisError, OSError) as exc:
            raise self._unavailable("ping", exc) from exc
        self._answered()

    # ---------------------------------------------------------------- watch

    def watch(self, callback: Callback) -> Callable[[], None]:
        """Ends by any replica, pushed over pub/sub by the script that writes them (see ``store.watch``).

        Call from the event loop: one subscription per store handle, alive while anyone watches. After a
        lost subscription every watcher re-checks (an end may have been published meanwhile).
        """
        unsubscribe = self._watchers.add(callback)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

        def stop() -> None:
            unsubscribe()
            if not self._watchers and self._listener is not None:
                self._listener.cancel()
                self._listener = None

        return stop

    async def _listen(self) -> None:
        """Subscribe, and again whenever the subscription is lost, or silent past a PING: a master that froze
        or was cut off closes nothing, and after a Sentinel failover the ends are published elsewhere."""
        loop = asyncio.get_running_loop()
        subscribed_before = False
        while self._watchers:
            pubsub = self._r.pubsub()
            try:
                await self._r.ping()  # a Cluster client learns its slots before it can route a subscription
                await pubsub.subscribe(self._ended_channel)
                if subscribed_before:
                    self._watchers.notify(None)
                subscribed_before = True
                heard, pinged = loop.time(), False
                while self._watchers:
                    due = heard + WATCH_PING + (self.target.timeout if pinged else 0.0)
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=max(due - loop.time(), 0.0))
                    if message is not None:
                        heard, pinged = loop.time(), False  # a message or the PING's pong
                        if message.get("type") == "message":
                            self._watchers.notify((unpack_member(message["data"]),))
                    elif loop.time() >= due:
                        if pinged:
                            raise RedisTimeoutError(f"no answer to PING within {self.target.timeout} s")
                        await pubsub.ping()
                        pinged = True
            except Exception as exc:  # noqa: BLE001 - whatever broke it, monitors must not go deaf silently
                log.warning("session watch: redis subscription lost, every connection re-checks: %s", exc)
                self._watchers.notify(None)
                await asyncio.sleep(WATCH_RETRY)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError, RuntimeError):
                    pass

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        try:
            await self._r.aclose()
        except (RedisError, OSError, RuntimeError):
            pass  # closing after the event loop that opened the connections ended: nothing left to flush


_SCRIPTS = (lua.READ, lua.CREATE, lua.WRITE, lua.FAILURES, lua.PURGE_AUDIT, lua.FIRST_USE)

# record key, member, packed READ command, record bytes, Session
_Seen = tuple[bytes, bytes, bytes, bytes, Session]


class _WriteIds:
    """Write ids unique to this process: a random prefix (drawn again in a forked child) and a counter.

    Why not ``os.urandom`` per write: a system call on the request path, and dear on this project's test VM;
    an id only has to differ from every other writer's (``redis_scripts.WRITE``), which prefix and counter
    guarantee, where random draws only make a clash unlikely.
    """

    def __init__(self) -> None:
        self.draw()
        os.register_at_fork(after_in_child=self.draw)

    def draw(self) -> None:
        self.prefix, self.count = os.urandom(8).hex(), itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.count):x}"


_write_id = _WriteIds()


def _audit_fields(events: Sequence[AuditEvent]) -> list[str]:
    """ts, event JSON, ts, event JSON, ...: one stream entry per event (``ts`` exact, for search and purge)."""
    return [x for e in events for x in (repr(e.ts), json.dumps(e.to_dict(), separators=(",", ":")))]


def _user_json(user: User) -> str:
    return json.dumps({
        "password_hash": user.password_hash, "admin": user.admin, "disabled": user.disabled,
        "groups": list(user.groups), "created_at": user.created_at, "extra": user.extra,
    }, separators=(",", ":"))


def _user(name: str, raw: bytes) -> User:
    data = json.loads(raw)
    return User(name=name, password_hash=data["password_hash"], admin=data["admin"], disabled=data["disabled"],
                groups=tuple(data["groups"]), created_at=data["created_at"], extra=data["extra"])


__all__ = ["RedisStore", "connect"]
