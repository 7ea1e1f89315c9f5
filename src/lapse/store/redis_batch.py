"""Auto-pipelining: the commands issued in one event-loop turn go to Redis as one pipeline.

Why. redis-py's per-command path (a pool checkout, the retry wrapper, a timeout
context and a parse per call) costs far more CPU than the round trip itself:
~55-90 µs per command with 32 concurrent requests on this project's 2-vCPU test
machine. Here every caller still sends its own command and gets its own reply
(nothing is cached, merged or reordered: Redis answers a pipeline in order, as
if the commands came one by one on one connection), but the commands queued in
one turn share one connection checkout, one socket write, one timeout and one
read loop. bench/README.md, "Redis (issue 5)", has the figures.

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
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# a command, the callers waiting for its reply, and whether it may be sent again after a broken link
_Queued = list[tuple[bytes, "list[asyncio.Future[Any]]", bool]]


class AutoPipeline:
    """``await call(pack(command))``: sent with the others of this loop turn, on one pooled connection."""

    def __init__(self, client: Redis, timeout: float) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
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
        self._next = None
        batch, self._queue, self._shared = self._queue, [], {}
        try:
            try:
                await self._send(batch)
            except _Broken as broken:  # once more, at once, on a fresh connection, for those that may run twice
                again = broken.left
                if broken.sent:
                    again = [queued for queued in broken.left if queued[2]]
                    for _, waiters, resend in broken.left:
                        if not resend:  # it may have run: its caller must not be told it did not
                            _fail(waiters, RedisConnectionError(f"the outcome is unknown: {broken.cause}"))
                await self._send(again)
        except BaseException as exc:  # noqa: BLE001 - every caller left must hear of it, whatever it was
            failure = exc if isinstance(exc, Exception) else RedisConnectionError("the pipeline was cancelled")
            if isinstance(exc, _Broken):
                failure = exc.cause
            for _, waiters, _ in batch:
                _fail(waiters, failure)
            if not isinstance(exc, Exception):
                raise

    async def _send(self, batch: _Queued) -> None:
        """Answer the batch's callers in order; ``_Broken`` with those left if the connection broke."""
        if not batch:
            return
        try:
            connection = await self._pool.get_connection()
        except RedisConnectionError as exc:
            raise _Broken(batch, exc, sent=False) from exc
        try:
            try:
                await connection.send_packed_command(b"".join([packed for packed, _, _ in batch]), check_health=False)
            except RedisConnectionError as exc:  # some of it may have been written, and run
                raise _Broken(batch, exc, sent=True) from exc
            async with asyncio.timeout(self._timeout):
                for at, (_, waiters, _) in enumerate(batch):
                    try:
                        reply = await connection.read_response(timeout=math.inf)  # the batch's timeout rules
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
        except TimeoutError:
            raise RedisTimeoutError(f"no reply from Redis within {self._timeout} s") from None
        finally:
            await self._pool.release(connection)


def _fail(waiters: list[asyncio.Future[Any]], failure: BaseException) -> None:
    for future in waiters:
        if not future.done():
            future.set_exception(failure)


def pack(command: tuple[Any, ...]) -> bytes:
    """One command in RESP, as redis-py encodes it (bytes as they are, str as UTF-8, numbers by ``repr``).

    Here rather than redis-py's ``pack_commands``: its chunking for large values is of no use for
    these small commands, and it was a tenth of the CPU of a decision. Packed once, a command can be
    sent again as it is (the store keeps each session's read command).
    """
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            arg = repr(arg).encode()
        elif not isinstance(arg, bytes):
            raise DataError(f"cannot send a {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Broken(Exception):
    """The connection broke: ``left`` are the callers not answered yet; ``sent``: their commands may have run."""

    def __init__(self, left: _Queued, cause: RedisConnectionError, *, sent: bool) -> None:
        super().__init__(str(cause))
        self.left, self.cause, self.sent = left, cause, sent
