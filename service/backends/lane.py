"""A dedicated Redis connection shared by the hot path's batchers.

Every hot-path batch (the rate limiter's acquisitions, the presence lookups, the backplane's
XADDs of one loop tick) is one ``execute``.  Through redis-py's client, pool and pipeline
layers a round trip costs this process ~130-160 µs of CPU; on a connection of its own, with
the commands packed and the replies read by redis-py's connection (hiredis parser), about
half.  And the batches that different batchers submit in the same loop tick travel together:
under load the limiter's batch for new messages, the lookups for the messages admitted a
tick ago and the XADDs of the ones looked up before that are one write and one read.

One sender task per lane owns the connection (reconnecting after a failure).  No retries:
every failure reaches its caller (a retried XADD would duplicate a message).

The commands are packed here (``pack``) and the replies read straight from the connection's
hiredis reader (``exchange``), one timeout per round trip: redis-py's per-argument encoder
and its per-reply read (each under its own timeout) were a third of a busy worker's CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis  # a dependency (redis[hiredis]): redis-py's connections parse with it
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_PUSH: Any = getattr(hiredis, "PushNotification", ())

Command = Sequence[Any]
IDLE_CHECK_S = 2.0  # a connection idle this long is replaced before use
_Batch = tuple[Sequence[Command], "asyncio.Future[list[Any]]"]
READ_SIZE = 65536


def _arg(a: Any) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, int):
        return b"%d" % a
    if isinstance(a, float):
        return repr(a).encode()  # as redis-py sends it
    if isinstance(a, (bytearray, memoryview)):
        return bytes(a)
    raise TypeError(f"cannot send a {type(a).__name__} to Redis")


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP encoding of ``commands`` (arguments: bytes, str, int or float)."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            b = a if type(a) is bytes else _arg(a)
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def exchange(conn: AbstractConnection, commands: Sequence[Command]) -> list[Any]:
    """Send ``commands`` on ``conn`` (connected, used by nobody else) and read one reply
    each, within the connection's socket timeout.  An error reply is returned as its
    ``ResponseError``.  A failure raises redis-py's ConnectionError (or TimeoutError):
    ``"partial"`` when some replies had been read (the outcome of the rest is unknown)."""
    # The parser's hiredis reader keeps what it buffered between calls: nothing is lost.
    reader: Any = getattr(conn._parser, "_reader", None)
    stream: Any = conn._reader
    writer: Any = conn._writer
    if stream is None or writer is None or reader is None:
        raise RedisConnectionError("not connected")
    replies: list[Any] = []
    n = len(commands)
    try:
        async with asyncio.timeout(conn.socket_timeout):
            writer.write(pack(commands))
            if writer.transport.get_write_buffer_size() > READ_SIZE:
                await writer.drain()
            while len(replies) < n:
                reply = reader.gets()
                if reply is _NOT_ENOUGH:
                    data = await stream.read(READ_SIZE)
                    if not data:
                        raise RedisConnectionError("connection closed by server")
                    reader.feed(data)
                    continue
                if isinstance(reply, _PUSH):
                    continue  # RESP3 push (nothing here subscribes): not a reply
                if isinstance(reply, RedisConnectionError):
                    raise reply
                replies.append(reply)
    except (OSError, TimeoutError, RedisConnectionError) as exc:
        if replies:
            raise RedisConnectionError("partial") from exc
        if isinstance(exc, TimeoutError):
            raise RedisTimeoutError("timeout reading from Redis") from exc
        if isinstance(exc, RedisConnectionError):
            raise
        raise RedisConnectionError(type(exc).__name__) from exc
    return replies


def fail_all(futures: Iterable[asyncio.Future[Any]], exc: BaseException, closed: str) -> None:
    """Fail every waiter that is not done yet with ``exc`` (a cancellation becomes
    ``ConnectionError(closed)``: no caller may wait forever, nor see a CancelledError that
    is not its own)."""
    err = exc if isinstance(exc, Exception) else ConnectionError(closed)
    for fut in futures:
        if not fut.done():
            fut.set_exception(err)


class Lane:
    def __init__(self, redis: Redis) -> None:
        """``redis``: the client whose pool settings (address, auth, timeouts) to use."""
        self._pool = redis.connection_pool
        self._conn: AbstractConnection | None = None
        self._queue: list[_Batch] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.round_trips = 0  # for tests and benchmarks
        self._used = 0.0  # when the connection last carried a batch (monotonic)
        self._stale = False  # see ``reset``

    async def connect(self) -> None:
        """Open the connection now (else the first batch does)."""
        if self._conn is None and not self._closed:
            self._conn = await self._open()
            self._used = time.monotonic()

    async def _open(self) -> AbstractConnection:
        conn = self._pool.make_connection()
        await conn.connect()
        return conn

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """The reply of each command, in order; an error reply is returned as its
        ``ResponseError`` (never raised).  A connection failure or timeout raises (the
        outcome of the batch is then unknown)."""
        if not commands:
            return []
        if self._closed:
            raise ConnectionError("lane closed")
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((commands, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            batches, self._queue = self._queue, []
            if batches:
                await self._round_trip(batches)

    async def _round_trip(self, batches: list[_Batch]) -> None:
        commands: list[Command] = [cmd for cmds, _ in batches for cmd in cmds]
        try:
            replies = await self._send(commands)
        except BaseException as exc:
            broken, self._conn = self._conn, None
            if broken is not None:
                with contextlib.suppress(Exception):
                    await broken.disconnect()
            fail_all((fut for _, fut in batches), exc, "lane closed")
            if not isinstance(exc, Exception):
                raise
            return
        i = 0
        for cmds, fut in batches:
            if not fut.done():
                fut.set_result(replies[i : i + len(cmds)])
            i += len(cmds)

    async def _send(self, commands: list[Command]) -> list[Any]:
        now = time.monotonic()
        if self._conn is not None and (self._stale or now - self._used > IDLE_CHECK_S):
            await self._drop()  # idle or reset: a new connection (see IDLE_CHECK_S)
        self._used = now
        reused = self._conn is not None
        if self._conn is None:
            self._conn = await self._open()
        try:
            return await self._exchange(self._conn, commands)
        except RedisConnectionError as exc:
            if not reused or exc.args[:1] == ("partial",):
                raise
            # The reused connection was dead (Redis restarted: a closed socket does not
            # always look it): nothing of the batch reached a server that could run it,
            # so it goes once more, on a new connection.
            await self._drop()
            self._conn = await self._open()
            return await self._exchange(self._conn, commands)

    async def _exchange(self, conn: AbstractConnection, commands: list[Command]) -> list[Any]:
        self.round_trips += 1
        return await exchange(conn, commands)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._stale = False
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def reset(self) -> None:
        """Redis restarted (or is failing): the next batch opens a new connection instead
        of finding out on this one, which may be dead without looking it."""
        self._stale = True

    async def close(self) -> None:
        """Safe to call twice (the lane is shared: its first closer ends it)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(ConnectionError("lane closed"))
        self._queue = []
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()
