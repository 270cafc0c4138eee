"""A dedicated Redis connection shared by the hot path's batchers.

Every hot-path batch (the rate limiter's acquisitions, the presence lookups, the backplane's
XADDs of one loop tick) is one ``execute``.  Through redis-py's client, pool and pipeline
layers a round trip costs this process ~130-160 µs of CPU; on a connection of its own, with
the commands packed here (``pack``: redis-py's per-argument encoder was a third of a busy
worker's CPU) and the replies read by its hiredis reader, a fraction of that.  And the
batches that different batchers submit in the same loop tick travel together: under load
the limiter's batch for new messages, the lookups for the messages admitted a tick ago and
the XADDs of the ones looked up before that are one write and one read.

The connection is opened by redis-py (address, AUTH, HELLO, SELECT, TLS), then its socket is
read by a protocol of ours: replies are parsed in ``data_received`` and each batch's future
resolved there.  No reader task, stream, or timeout object per round trip (one timer per
lane covers the socket timeout): 60-66 → 42-46 µs of CPU per round trip in a tight loop,
against 36-41 for the bare socket.

One round trip is out at a time; what is submitted meanwhile goes, together, when it comes
back.  No retries (except a batch that never reached the server: see ``_broken``): every
failure reaches its caller (a retried XADD would duplicate a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hiredis  # a dependency (redis[hiredis]): redis-py's connections parse with it
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.running import LoopBound, settle

log = logging.getLogger("signaling.redis")

_PUSH: Any = getattr(hiredis, "PushNotification", ())

Command = Sequence[Any]
IDLE_CHECK_S = 2.0  # a connection idle this long is replaced before use
# What a batch's sender is told: the replies, or the exception that failed the round trip.
Done = Callable[["list[Any] | BaseException"], None]
Batch = tuple[Sequence[Command], Done]
# A batcher's hook (``Lane.add_source``): its batches due now, each with its ``Done``.
Source = Callable[[], "list[Batch]"]
# A rider's hook (``Lane.add_rider``): told whether a round trip is going (True: its batches
# join it; False: nothing else is due, and it returns none).
Rider = Callable[[bool], "list[Batch]"]


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


class Packed(bytes):
    """One command already in RESP, as its batcher made it (``pack`` sends it as it is):
    for a command of hundreds of arguments whose maker knows their types, one bytes
    formatting per few arguments instead of a type test and one per argument."""


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def resp_args(args: Iterable[Any]) -> bytes:
    """The RESP of ``args`` without the array header (for a ``Packed`` command's maker)."""
    out: list[bytes] = []
    for a in args:
        b = a if type(a) is bytes else _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP encoding of ``commands`` (arguments: bytes, str, int or float; or a
    ``Packed`` command)."""
    out: list[bytes] = []
    for cmd in commands:
        if type(cmd) is Packed:
            out.append(cmd)
            continue
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            b = a if type(a) is bytes else _arg(a)
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _closed_error(exc: BaseException, closed: str = "lane closed") -> BaseException:
    """What a waiter sees: a cancellation is ``ConnectionError(closed)``."""
    return exc if isinstance(exc, Exception) else ConnectionError(closed)


def fail_all(futures: Iterable[asyncio.Future[Any]], exc: BaseException, closed: str) -> None:
    """Fail every waiter that is not done yet with ``exc`` (a cancellation becomes
    ``ConnectionError(closed)``: no caller may wait forever, nor see a CancelledError that
    is not its own)."""
    err = _closed_error(exc, closed)
    for fut in futures:
        if not fut.done():
            fut.set_exception(err)


class _Link(asyncio.Protocol):
    """The lane's socket once redis-py's handshake (AUTH, HELLO, SELECT) is done: replies
    are read in ``data_received`` and handed to the lane there, with no reader task, stream
    or future between the socket and the batch's waiters."""

    def __init__(self, lane: Lane, writer: Any, reader: Any) -> None:
        self.lane = lane
        # the StreamWriter is kept only because its __del__ closes the transport
        self.writer = writer
        self.transport = writer.transport
        self.reader = reader  # redis-py's hiredis reader (its error classes), fed here
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self.lane._replies(self)

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lane._lost(self, exc)

    def close(self) -> None:
        self.lost = True
        self.transport.abort()  # nothing to flush: a batch's outcome is decided


class _Round:
    """The batches of one round trip, with the replies read so far."""

    __slots__ = ("batches", "commands", "replies", "sent", "retried")

    def __init__(self, batches: list[Batch], retried: bool = False) -> None:
        self.batches = batches
        self.commands: list[Command] = [cmd for cmds, _ in batches for cmd in cmds]
        self.replies: list[Any] = []
        self.sent = 0.0  # monotonic
        self.retried = retried


class Lane(LoopBound):
    def __init__(self, redis: Redis) -> None:
        """``redis``: the client whose pool settings (address, auth, timeouts) to use."""
        self._pool = redis.connection_pool
        self._link: _Link | None = None
        self._queue: list[Batch] = []  # waiting for the round trip in flight
        self._first: list[Batch] = []  # to go ahead of everything else (``retry_first``)
        self._sources: list[Source] = []  # see ``add_source``
        self._riders: list[Rider] = []  # see ``add_rider``
        self._round: _Round | None = None  # in flight (or waiting for a connection)
        self._scheduled = False  # a send is due at the end of this tick
        self._opening: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timeout: float | None = None  # the socket timeout of the pool's connections
        self._closed = False
        self.round_trips = 0  # for tests and benchmarks
        self._used = 0.0  # when the connection last carried a batch (monotonic)
        self._stale = False  # see ``reset``

    async def connect(self) -> None:
        """Open the connection now (else the first batch does)."""
        if self._link is None and not self._closed:
            self._link = await self._open()
            self._used = time.monotonic()

    async def _open(self) -> _Link:
        conn = self._pool.make_connection()
        await conn.connect()
        self._timeout = conn.socket_timeout
        writer: Any = conn._writer
        reader: Any = getattr(conn._parser, "_reader", None)
        if writer is None or reader is None:  # pragma: no cover - redis-py without hiredis
            raise RedisConnectionError("no hiredis reader")
        link = _Link(self, writer, reader)
        link.transport.set_protocol(link)
        # the connection object is done with: its streams must not close the socket later
        conn._writer = conn._reader = None
        if self._closed:
            link.close()
        return link

    def execute(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """The reply of each command, in order; an error reply is returned as its
        ``ResponseError`` (never raised).  A connection failure or timeout raises (the
        outcome of the batch is then unknown).  Every batch of one loop tick travels in
        one round trip (with the ones queued while the previous round trip was out)."""
        fut: asyncio.Future[list[Any]] = self.running_loop().create_future()
        self.submit(commands, functools.partial(settle, fut))
        return fut

    def submit(self, commands: Sequence[Command], done: Done) -> None:
        """``execute`` with a callback instead of a future: ``done`` gets the replies (or
        the failure) from the socket's read callback; it must not raise, nor block."""
        if not commands:
            _call(done, [])
        elif self._closed:
            _call(done, ConnectionError("lane closed"))
        else:
            self._queue.append((commands, done))
            self.wake()

    def add_source(self, source: Source) -> None:
        """Register a batcher: ``source()`` is called whenever a round trip is about to
        go, and returns the batches it has due then (or none), each with the function
        that takes its replies (called from the socket's read callback: it must not
        raise, nor block).  The batcher calls ``wake`` when it has something due.  This
        is what saves the batchers a task and a loop pass each way per round trip."""
        self._sources.append(source)

    def retry_first(self, commands: Sequence[Command], done: Done) -> None:
        """Send ``commands`` at the head of the next round trip, ahead of every batch
        submitted or due since: a batch run again (``scripts.settled``) must not be
        overtaken by later ones, neither in Redis nor in its callbacks.  Meant to be
        called from a batch's ``Done``, while the next round trip is not out yet."""
        if self._closed:
            _call(done, ConnectionError("lane closed"))
            return
        self._first.append((commands, done))
        self.wake()

    def add_rider(self, rider: Rider) -> None:
        """Register a batcher whose batches only ride along: whenever the lane looks for
        work (after a ``wake``), ``rider(True)`` if a round trip is going anyway (its
        batches join it, after the sources'), else ``rider(False)``, which returns none
        (the rider gets its work done another way then).  While ``busy`` is True the
        rider is sure to be asked again."""
        self._riders.append(rider)

    @property
    def busy(self) -> bool:
        """A round trip is out, or the lane will look for work at the end of this tick."""
        return self._round is not None or self._scheduled

    def wake(self) -> None:
        """Something is due: a round trip goes at the end of this tick (or when the one
        out comes back)."""
        if self._closed:
            self._send_queued()  # fails what is due
        elif not self._scheduled and self._round is None:
            self._scheduled = True
            self.running_loop().call_soon(self._send_queued)

    def _due(self) -> list[Batch]:
        batches, self._queue = self._first + self._queue, []
        self._first = []
        for source in self._sources:
            try:
                batches += source()
            except Exception:  # a batcher's bug must not stop the others' round trips
                log.exception("a lane source failed")
        return batches

    def _ride(self, going: bool) -> list[Batch]:
        batches: list[Batch] = []
        for rider in self._riders:
            try:
                batches += rider(going)
            except Exception:  # as for sources
                log.exception("a lane rider failed")
        return batches

    def _send_queued(self) -> None:
        self._scheduled = False
        if self._round is not None:
            return
        batches = self._due()
        if self._closed:
            _done_all(batches, ConnectionError("lane closed"))
            return
        riding = self._ride(bool(batches))
        if not batches:
            return
        self._start(_Round(batches + riding))

    def _start(self, rnd: _Round) -> None:
        """Send ``rnd`` now on a connection that is fine, else once one is open."""
        self._round = rnd
        link = self._link
        now = time.monotonic()
        if link is not None and (link.lost or self._stale or now - self._used > IDLE_CHECK_S):
            # idle or reset: a new connection (see IDLE_CHECK_S)
            self._drop()
            link = None
        if link is None:
            self._opening = self.running_loop().create_task(self._open_and_send(rnd))
            return
        self._write(link, rnd, now)

    async def _open_and_send(self, rnd: _Round) -> None:
        self._stale = False
        try:
            link = await self._open()
        except BaseException as exc:
            self._opening = None  # before ``_fail``, which may start the next one
            self._fail(rnd, exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._opening = None
        if self._closed or self._round is not rnd:
            link.close()
            return
        self._link = link
        self._write(link, rnd, time.monotonic(), reused=False)

    def _write(self, link: _Link, rnd: _Round, now: float, reused: bool = True) -> None:
        self._used = rnd.sent = now
        if not reused:
            rnd.retried = True  # a new connection: a failure is not retried
        self.round_trips += 1
        link.transport.write(pack(rnd.commands))
        if self._timer is None and self._timeout:
            self._timer = self.running_loop().call_later(self._timeout, self._check_timeout)

    def _replies(self, link: _Link) -> None:
        """``link`` received data: the round trip's replies, as far as they came."""
        rnd = self._round
        if rnd is None or link is not self._link:
            return
        reader, replies, n = link.reader, rnd.replies, len(rnd.commands)
        while len(replies) < n:
            reply = reader.gets()
            if reply is _NOT_ENOUGH:
                return
            if isinstance(reply, _PUSH):
                continue  # RESP3 push (nothing here subscribes): not a reply
            if isinstance(reply, RedisConnectionError):
                self._broken(rnd, reply)
                return
            replies.append(reply)
        self._round = None
        self._used = time.monotonic()  # busy until now (a blocking read is not idleness)
        i = 0
        for cmds, done in rnd.batches:
            _call(done, replies[i : i + len(cmds)])
            i += len(cmds)
        # What is due meanwhile goes at the end of this tick, with what the waiters just
        # resumed add to it (sending it right here made round trips smaller and more: at
        # 2,000 connections across instances 12.9k -> 9.9k msg/s).
        self.wake()

    def _lost(self, link: _Link, exc: Exception | None) -> None:
        if link is not self._link:
            return
        self._link = None
        rnd = self._round
        if rnd is not None and self._opening is None:
            self._broken(rnd, RedisConnectionError("connection closed by server"))

    def _broken(self, rnd: _Round, exc: Exception) -> None:
        """The connection failed with ``rnd`` out."""
        self._drop()
        if not rnd.replies and not rnd.retried:
            # The reused connection was dead (Redis restarted: a closed socket does not
            # always look it): nothing of the batch reached a server that could run it,
            # so it goes once more, on a new connection.
            rnd.retried = True
            self._opening = self.running_loop().create_task(self._open_and_send(rnd))
            return
        if rnd.replies:
            exc = RedisConnectionError("partial")
        self._fail(rnd, exc)

    def _fail(self, rnd: _Round, exc: BaseException) -> None:
        """Fail ``rnd``'s waiters; the batches queued meanwhile go on a new connection."""
        if self._round is rnd:
            self._round = None
        _done_all(rnd.batches, exc)
        if not self._closed and self._round is None:
            self._send_queued()  # what is due goes on a new connection

    def _check_timeout(self) -> None:
        """One timer for the lane (not one per round trip): the round trip out longer than
        the socket timeout fails, and its connection is dropped."""
        self._timer = None
        rnd = self._round
        if rnd is None or self._timeout is None or self._opening is not None:
            return
        now = time.monotonic()
        due = rnd.sent + self._timeout
        if now < due:
            self._timer = self.running_loop().call_later(due - now, self._check_timeout)
            return
        self._drop()
        if rnd.replies:
            self._fail(rnd, RedisConnectionError("partial"))
        else:
            self._fail(rnd, RedisTimeoutError("timeout reading from Redis"))

    def _drop(self) -> None:
        link, self._link = self._link, None
        self._stale = False
        if link is not None and not link.lost:
            link.close()

    def reset(self) -> None:
        """Redis restarted (or is failing): the next batch opens a new connection instead
        of finding out on this one, which may be dead without looking it."""
        self._stale = True

    async def close(self) -> None:
        """Safe to call twice (the lane is shared: its first closer ends it)."""
        self._closed = True
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rnd, self._round = self._round, None
        waiting = self._due() + (rnd.batches if rnd is not None else [])
        _done_all(waiting, ConnectionError("lane closed"))
        self._drop()


def _call(done: Done, result: list[Any] | BaseException) -> None:
    try:
        done(result)
    except Exception:  # a batcher's bug must not break the lane
        log.exception("a lane batch's callback failed")


def _done_all(batches: Iterable[Batch], exc: BaseException) -> None:
    err = _closed_error(exc)
    for _, done in batches:
        _call(done, err)
