"""Auto-pipelining: the commands issued in one event-loop turn go to Redis as one pipeline.

Why. redis-py's per-command path (a pool checkout, the retry wrapper, a timeout
context and a parse per call) costs far more CPU than the round trip itself:
~60-90 µs per command with 32 concurrent requests on this project's 2-vCPU test
machine. Here every caller still sends its own command and gets its own reply
(nothing is cached, merged or reordered: Redis answers a pipeline in order, as
if the commands came one by one on one connection), but the commands queued in
one turn share one connection checkout, one socket write, one timeout and one
read loop. bench/README.md, "Redis (issue 5)", has the figures.

Failure is what it was per command: the whole batch must be answered within
the store's ``timeout`` (a timeout is not retried); a broken connection (Redis
restarted, say) is retried once at once, for the commands not yet answered, on
a fresh connection. An error reply (``NOSCRIPT``, say) fails only its caller.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Queued = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]


class AutoPipeline:
    """``await call(*command)``: sent with the others of this loop turn, on one pooled connection."""

    def __init__(self, client: Redis, timeout: float) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
        self._queue: _Queued = []
        self._flushing: set[asyncio.Task[None]] = set()  # held so they are not garbage-collected mid-flight

    def call(self, *command: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:  # the first of this turn: the flush runs once the turn's callers have queued
            task = loop.create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        self._queue.append((command, future))
        return future

    async def _flush(self) -> None:
        batch, self._queue = self._queue, []
        try:
            try:
                await self._send(batch)
            except _Broken as broken:  # once more, at once, on a fresh connection, for those not answered
                await self._send(broken.left)
        except BaseException as exc:  # noqa: BLE001 - every caller left must hear of it, whatever it was
            failure = exc if isinstance(exc, Exception) else RedisConnectionError("the pipeline was cancelled")
            if isinstance(exc, _Broken):
                failure = exc.cause
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    async def _send(self, batch: _Queued) -> None:
        """Answer the batch's callers in order; ``_Broken`` with those left if the connection broke."""
        try:
            connection = await self._pool.get_connection()
        except RedisConnectionError as exc:
            raise _Broken(batch, exc) from exc
        try:
            try:
                await connection.send_packed_command(
                    connection.pack_commands([command for command, _ in batch]), check_health=False
                )
            except RedisConnectionError as exc:
                raise _Broken(batch, exc) from exc
            async with asyncio.timeout(self._timeout):
                for at, (_, future) in enumerate(batch):
                    try:
                        reply = await connection.read_response(timeout=math.inf)  # the batch's timeout rules
                    except ResponseError as exc:
                        reply = exc
                    except RedisConnectionError as exc:
                        raise _Broken(batch[at:], exc) from exc
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


class _Broken(Exception):
    """The connection broke: ``left`` are the callers not answered yet."""

    def __init__(self, left: _Queued, cause: RedisConnectionError) -> None:
        super().__init__(str(cause))
        self.left, self.cause = left, cause
