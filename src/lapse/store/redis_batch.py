"""Auto-pipelining: the commands issued in one event-loop turn go to Redis as one pipeline.

Why. redis-py's per-command path (a pool checkout, the retry wrapper, a timeout
context and a parse per call) costs far more CPU than the round trip itself:
~55-90 µs per command with 32 concurrent requests on this project's 2-vCPU test
machine. Here every caller still sends its own command and gets its own reply
(nothing is cached, merged or reordered: Redis answers a pipeline in order, as
if the commands came one by one on one connection), but the commands queued in
one turn share one connection checkout, one socket write, one timeout and one
read loop. bench/README.md, "Redis (issue 5)", has the figures.

What a batch costs beyond its socket write and replies was itself most of a
replica's Redis CPU over HTTP, so it is kept small: on a standalone Redis the
connections stay with the pipeline between batches (checked before each use as
the pool checks its own, see ``_checkout``), and one timer handle bounds the
write and the replies together (no ``asyncio.timeout`` context, no per-write
``wait_for`` task).

Failure is what it was per command: the whole batch must be answered within
the store's ``timeout`` (a timeout is not retried). A broken connection (Redis
restarted, say) is retried once at once, on a fresh connection, but only for
the commands that may safely run twice: all of them if the batch never left
(no connection), else only those not yet answered that their caller marked
``resend`` (reads, and the scripts written to recognise their own earlier run).
Any other command not answered may have run: its caller gets the connection
error (outcome unknown, the store answers 503), never a second run. An error
reply (``NOSCRIPT``, say) fails only its caller.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

# a command, the callers waiting for its reply, and whether it may be sent again after a broken link
_Queued = list[tuple[bytes, "list[asyncio.Future[Any]]", bool]]


class AutoPipeline:
    """``await call(pack(command))``: sent with the others of this loop turn, on one pooled connection.

    ``hold``: keep the connections between batches instead of handing each back to the pool (standalone
    Redis only, see ``_checkout``).
    """

    def __init__(self, client: Redis, timeout: float, *, hold: bool = False) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
        self._hold = hold
        self._idle: list[AbstractConnection] = []  # held between batches (``hold``), each checked before use
        self._queue: _Queued = []
        self._shared: dict[bytes, list[asyncio.Future[Any]]] = {}  # read-only commands in ``_queue``
        self._next: asyncio.Task[None] | None = None  # the flush that will take ``_queue``
        self._flushing: set[asyncio.Task[None]] = set()  # held so they are not garbage-collected mid-flight

    def call(self, packed: bytes, *, read_only: bool = False, resend: bool = False) -> asyncio.Future[Any]:
        """The reply to ``packed`` (one command), sent with the others queued in this turn.

        ``read_only``: the same command already queued in this turn (not sent yet) is sent once and its
        reply given to every caller: as fresh as separate reads, since Redis runs it after all of them
        asked (a page's parallel requests with one cookie read the session once).
        ``resend``: running it twice does what running it once does (implied by ``read_only``), so it may
        be sent again when the connection broke after it was written.
        """
        waiters = self._shared.get(packed) if read_only else None
        if self._next is not None:
            # Its flush has not started, so this is its turn and its loop. (Not get_running_loop(): on
            # Python 3.11 that is a getpid() system call, a tenth of a decision's CPU on this machine.)
            future = self._next.get_loop().create_future()
        else:  # the first of this turn: the flush runs once the turn's callers have queued
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._next = task = loop.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._finished)
        if waiters is not None:
            waiters.append(future)  # each caller its own future: one cancelled caller cancels no other
            return future
        waiters = [future]
        self._queue.append((packed, waiters, read_only or resend))
        if read_only:
            self._shared[packed] = waiters
        return future

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._flushing.discard(task)
        if task is self._next:  # cancelled before it took its batch (its event loop is closing)
            self._next = None
            batch, self._queue, self._shared = self._queue, [], {}
            for _, waiters, _ in batch:
                for future in waiters:
                    future.cancel()

    async def _flush(self) -> None:
        task, self._next = self._next, None  # (not current_task(): on Python 3.11 that is a getpid() call too)
        assert task is not None
        batch, self._queue, self._shared = self._queue, [], {}
        try:
            try:
                await self._send(batch, task)
            except _Broken as broken:  # once more, at once, on a fresh connection, for those that may run twice
                again = broken.left
                if broken.sent:
                    again = [queued for queued in broken.left if queued[2]]
                    for _, waiters, resend in broken.left:
                        if not resend:  # it may have run: its caller must not be told it did not
                            _fail(waiters, RedisConnectionError(f"the outcome is unknown: {broken.cause}"))
                await self._send(again, task)
        except BaseException as exc:  # noqa: BLE001 - every caller left must hear of it, whatever it was
            failure = exc if isinstance(exc, Exception) else RedisConnectionError("the pipeline was cancelled")
            if isinstance(exc, _Broken):
                failure = exc.cause
            for _, waiters, _ in batch:
                _fail(waiters, failure)
            if not isinstance(exc, Exception):
                raise

    async def _send(self, batch: _Queued, task: asyncio.Task[None]) -> None:
        """Answer the batch's callers in order; ``_Broken`` with those left if the connection broke.

        The write and the replies share one timer of ``timeout`` (a timeout is not retried). It is a plain
        timer handle that cancels this task, as ``asyncio.timeout`` does, without its per-use cost (a
        quarter of the batch's own CPU here); redis-py's per-write timer, a ``wait_for`` that makes a task
        of its own, is switched off for the write (``socket_timeout``) since this one bounds it.
        """
        if not batch:
            return
        connection = await self._checkout(batch)
        loop = task.get_loop()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = loop.call_at(loop.time() + self._timeout, expire)
        done = False
        try:
            try:
                socket_timeout, connection.socket_timeout = connection.socket_timeout, None
                try:
                    await connection.send_packed_command(b"".join([packed for packed, _, _ in batch]),
                                                         check_health=False)
                finally:
                    connection.socket_timeout = socket_timeout
            except RedisConnectionError as exc:  # some of it may have been written, and run
                raise _Broken(batch, exc, sent=True) from exc
            for at, (_, waiters, _) in enumerate(batch):
                try:
                    reply = await connection.read_response(timeout=math.inf)  # the batch's timer rules
                except ResponseError as exc:
                    reply = exc
                except RedisConnectionError as exc:
                    raise _Broken(batch[at:], exc, sent=True) from exc
                for future in waiters:
                    if future.done():  # its caller gave up (cancelled): the reply is read all the same
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
            done = True
        except asyncio.CancelledError:
            if expired and task.uncancel() == 0:  # this timer's, not a cancellation from outside
                raise RedisTimeoutError(f"no reply from Redis within {self._timeout} s") from None
            raise
        finally:
            timer.cancel()
            if done and self._hold:
                self._idle.append(connection)
            else:  # broken, timed out (redis-py has closed it) or not held: the pool's to reconnect or reuse
                await self._pool.release(connection)

    async def _checkout(self, batch: _Queued) -> AbstractConnection:
        """A connection for ``batch``: a held one if there is, checked as the pool checks its own; else the pool's.

        Held connections skip the pool's checkout and release (its lock, counters and events: a third of a
        batch's CPU here) but get the same check before use (``ensure_connection``: one Redis closed, after a
        restart say, is connected again before anything is sent on it). Not under Sentinel: there the pool also
        drops its idle connections when the master moves, which held ones would miss.
        """
        try:
            if self._idle:
                connection = self._idle.pop()
                try:
                    await self._pool.ensure_connection(connection)
                except BaseException:
                    await self._pool.release(connection)
                    raise
                return connection
            return await self._pool.get_connection()
        except RedisConnectionError as exc:
            raise _Broken(batch, exc, sent=False) from exc


def _fail(waiters: list[asyncio.Future[Any]], failure: BaseException) -> None:
    for future in waiters:
        if not future.done():
            future.set_exception(failure)


def pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP, as redis-py encodes it (bytes as they are, str as UTF-8, numbers by ``repr``).

    Here rather than redis-py's ``pack_commands``: its chunking for large values is of no use for
    these small commands, and it was a tenth of the CPU of a decision. Packed once, a command can be
    sent again as it is (the store keeps each session's read command). The length headers of short
    arguments come from a table: ``b"$%d" % n`` costs more than the rest of an argument's packing.
    """
    n = len(command)
    out = [_COUNT[n] if n < _SHORT else b"*%d" % n]
    for arg in command:
        kind = type(arg)  # the exact types first: one test each, where isinstance walks a tuple of them
        if kind is bytes:
            pass
        elif kind is str:
            arg = arg.encode()
        elif kind is int or kind is float:
            arg = repr(arg).encode()
        elif isinstance(arg, str):  # subclasses: as before, by the tests redis-py's encoder makes
            arg = arg.encode()
        elif isinstance(arg, bytes):
            pass
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            arg = repr(arg).encode()
        else:
            raise DataError(f"cannot send a {type(arg).__name__} to Redis")
        n = len(arg)
        out.append(_LENGTH[n] if n < _SHORT else b"$%d" % n)
        out.append(arg)
    out.append(b"")
    return b"\r\n".join(out)


_SHORT = 1024
_COUNT = [b"*%d" % n for n in range(_SHORT)]
_LENGTH = [b"$%d" % n for n in range(_SHORT)]


class _Broken(Exception):
    """The connection broke: ``left`` are the callers not answered yet; ``sent``: their commands may have run."""

    def __init__(self, left: _Queued, cause: RedisConnectionError, *, sent: bool) -> None:
        super().__init__(str(cause))
        self.left, self.cause, self.sent = left, cause, sent
