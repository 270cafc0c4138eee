"""The Sanic edge: the upgrade gate (request middleware, answers before the handshake),
the websocket handler (one read loop and one writer task per connection) and subprotocol
selection.  Everything protocol-level happens in the core; this file moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import secrets
import struct
import time
from typing import Any

import sanic.server.protocols.websocket_protocol as _ws_protocol
from sanic import Request
from sanic.compat import Header
from sanic.response import HTTPResponse, json
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.frames import Close as WSClose
from websockets.server import ServerProtocol

from . import metrics
from .auth import SUBPROTOCOL, Identity, extract_token
from .core.contracts import Location
from .core.hub import TooManyDevices
from .core.router import Router
from .core.session import Session
from .errors import AuthError, Close, HttpCode
from .ice import ice_fields
from .protocol import encode, now_ms
from .runtime import Runtime

try:  # the C implementation (websockets ships it for CPython)
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

log = logging.getLogger("signaling.transport")
WS_PATH = "/ws"


class SignalingServerProtocol(ServerProtocol):
    """Selects ``signaling.v1`` when the client offers it and goes on without a subprotocol
    otherwise (websockets' default would answer 400 to clients that offer none, breaking
    the ``?token=`` and ``Authorization`` carriers).  The ``bearer.<jwt>`` entry is never
    echoed back."""

    def select_subprotocol(self, subprotocols: Any) -> Any:
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


_PONG_HEAD = b"\x8a"  # FIN + pong; the payload length (<= 125) follows
_PING = b"\x89\x00"  # FIN + ping, no payload: a server's frames are not masked


def _valid_utf8(data: bytes) -> bool:
    if data.isascii():  # most frames (JSON, SDP, ICE): no decoded copy to throw away
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
# Frames read but not yet handled, per connection, before the socket stops being read.
INBOX_PAUSE = 256


class _NoEvent:
    """Stands in for the asyncio.Events of Sanic's HTTP protocol on upgraded sockets."""

    __slots__ = ()

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return True

    async def wait(self) -> bool:
        return True


_NO_EVENT = _NoEvent()


class LeanWebsocket(WebsocketImplProtocol):
    """Sanic's websocket with a lean receive path and no task of its own.

    Sanic's receive path creates a task per received chunk and per ``recv()``; here
    ``data_received`` parses the frames synchronously and appends complete messages to
    ``inbox``, waking the connection's read loop through one future.  Close frames still
    take Sanic's path.  The inbox is bounded: past INBOX_PAUSE messages the socket is not
    read until the loop catches up.

    Sanic also gives every connection a keepalive task and an auto-close task; here one
    ``Pinger`` per worker pings every socket, and the close handshake is finished from
    callbacks (the transport is closed once the close frames are exchanged, or aborted
    ``close_timeout`` after our close frame went out).  What is left per connection is the
    protocol state and the handler's own coroutine: this is what makes idle sockets cheap.
    """

    # Sanic's per-connection state that this class never sets: read from the class, so that
    # an instance keeps under CPython's 30 attributes of a shared-key __dict__ (one more
    # made every idle connection's __dict__ 1.6 KB instead of 0.3).  Its locks guard its
    # recv/send/close, all replaced here.
    max_queue = None  # type: ignore[assignment]
    conn_mutex = None  # type: ignore[assignment]
    process_event_mutex = None  # type: ignore[assignment]
    recv_cancel = None
    data_finished_fut = None
    can_pause = True
    pause_frame_fut = None
    keepalive_ping_task = None
    auto_closer_task = None
    connection_lost_waiter = None

    def __init__(
        self,
        ws_proto: Any,
        max_queue: Any = None,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float = 10,
        loop: Any = None,
    ) -> None:
        # Not calling super().__init__: it builds a frame assembler, three locks and
        # futures this class never uses.  These, and the class attributes below, are what
        # Sanic's methods read.
        # Set in this order on purpose: an instance's attribute values lie in this order
        # (CPython's shared-key dicts), what every message reads first.  It costs nothing;
        # counted, the gain was within layout noise (optimisations.md, row 61).
        # (router, session) while the read loop runs on an inline-capable router: frames
        # are then handled in ``data_received`` when they can be
        self.fast: tuple[Router, Session] | None = None
        self._rest = b""  # the start of a frame not yet complete
        # (is_text, data) of each complete message, oldest first
        self.inbox: list[tuple[bool, bytes]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._max_size = ws_proto.max_message_size or 2**63
        self._fragments: list[bytes] | None = None  # a fragmented message so far
        self.transport: Any = None  # the socket's (``io_proto.transport``, read per write)
        # our close frame is out or about to be (``flush_one``, ``close``): no data after it
        self.close_started = False
        self.ws_proto = ws_proto
        self.io_proto = None
        self.loop = None
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.pings = {}
        self._fragment_text = False
        self._fragment_size = 0
        self._paused = False
        self.closing: asyncio.Future[None] | None = None
        self.ping_sent_at = 0.0  # monotonic time of an unanswered ping, or 0
        self.ping_due = time.monotonic() + (ping_interval or 0.0)  # when to ping next
        self.ping_slot = -1  # the Pinger's wheel slot this socket waits in, or -1

    async def connection_made(self, io_proto: Any, loop: Any = None) -> None:
        self.io_proto = io_proto
        self.transport = io_proto.transport
        # Frames are parsed here, not by websockets: its parser (a generator) and its
        # receive buffer can go (nothing below calls websockets' receive side or ``fail``).
        self.ws_proto.parser = None  # type: ignore[assignment]
        self.ws_proto.reader = None  # type: ignore[assignment]
        self.loop = loop or asyncio.get_running_loop()
        # The HTTP protocol's two asyncio.Events (a deque each) and its last timeout timer
        # serve HTTP requests only; this socket is a websocket now, written directly.
        io_proto._data_received = _NO_EVENT
        io_proto._can_write = _NO_EVENT
        # The HTTP receive buffer keeps the capacity the request head needed; the socket's
        # bytes come to ``data_received`` now.
        buf = io_proto.recv_buffer = bytearray()
        http = getattr(io_proto, "_http", None)
        if http is not None:
            http.recv_buffer = buf
        timer = getattr(io_proto, "_callback_check_timeouts", None)
        if timer is not None:
            timer.cancel()
            io_proto._callback_check_timeouts = None
        if self.ping_interval:
            PINGER.add(self)

    def data_received(self, data: bytes) -> None:
        """Parse the client's frames (RFC 6455 §5) straight into ``inbox``.  Any protocol
        violation fails the connection with the code the RFC names (1002, 1007, 1009)."""
        fast = self.fast
        if fast is not None and not self._rest and not self.inbox:
            # The common read, first: exactly one whole text frame (FIN, no reserved bits,
            # masked, a 7-bit length within the size limit), handled at once when nothing
            # of this connection is in progress; anything else takes the general path.
            # A pending waiter also means no close frame came and the socket is open: both
            # wake the read loop (``_close_received``, ``_fail``, ``connection_lost``), which
            # then ends and clears ``fast``, so ``ws_proto`` need not be read here.
            length = data[1] - 0x80 if len(data) > 6 and data[0] == 0x81 else -1
            if 0 <= length < 126 and length == len(data) - 6 and length <= self._max_size \
                    and self._fragments is None:
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    payload = apply_mask(data[6:], data[2:6])
                    if not _valid_utf8(payload):
                        return self._fail(1007, "invalid UTF-8")
                    if not fast[0].handle_now(fast[1], payload):
                        self.inbox.append((True, payload))
                        self.wake()
                    return
        if self._rest:
            data = self._rest + data
            self._rest = b""
        if self.ws_proto.close_rcvd is not None:
            return  # nothing may follow a close frame
        inbox = self.inbox
        # Frames are handled right here (``Router.handle_now``) while the read loop waits
        # on an empty inbox: nothing of this connection is then in progress.  Once one is
        # queued, every later one is too, so per-connection order holds.
        if fast is not None:
            waiter = self._waiter
            if inbox or waiter is None or waiter.done():
                fast = None
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            op = b0 & 0x0F
            if b0 & 0x70 or not b1 & 0x80:  # reserved bits, or an unmasked client frame
                return self._fail(1002, "protocol error")
            if op >= 8 and (length > 125 or not b0 & 0x80):
                return self._fail(1002, "bad control frame")
            if length + self._fragment_size > self._max_size:
                return self._fail(1009, "message too big")
            start = pos + head + 4
            if end < start + length:
                break
            payload = apply_mask(data[start : start + length], data[start - 4 : start])
            pos = start + length
            if op == 1 or op == 2:
                if self._fragments is not None:
                    return self._fail(1002, "expected a continuation frame")
                if b0 & 0x80:
                    if op == 1:
                        if not _valid_utf8(payload):
                            return self._fail(1007, "invalid UTF-8")
                        if fast is not None and not inbox and fast[0].handle_now(
                                fast[1], payload):
                            continue
                    inbox.append((op == 1, payload))
                else:
                    self._fragments, self._fragment_text = [payload], op == 1
                    self._fragment_size = length
            elif op == 0:
                if self._fragments is None:
                    return self._fail(1002, "unexpected continuation frame")
                self._fragments.append(payload)
                self._fragment_size += length
                if b0 & 0x80:
                    message = b"".join(self._fragments)
                    self._fragments, self._fragment_size = None, 0
                    if self._fragment_text and not _valid_utf8(message):
                        return self._fail(1007, "invalid UTF-8")
                    inbox.append((self._fragment_text, message))
            elif op == 9:
                self._send_now([_PONG_HEAD + bytes((len(payload),)) + payload])
            elif op == 10:
                self.ping_sent_at = 0.0
            elif op == 8:
                self._close_received(payload)
                break
            else:
                return self._fail(1002, "unknown opcode")
        if pos < end:
            self._rest = data[pos:]
        if not inbox:
            # nothing for the read loop: all handled here, or control frames only (a close
            # frame wakes it in ``_close_received``)
            return
        if len(inbox) >= INBOX_PAUSE and not self._paused:
            transport = self.transport
            if transport is not None:
                self._paused = True
                transport.pause_reading()
        self.wake()

    def _close_received(self, payload: bytes) -> None:
        """Echo the client's close frame (or answer ours), then end the TCP connection."""
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        reason = payload[2:].decode(errors="replace")
        proto = self.ws_proto
        if proto.state is _ws_protocol.OPEN:
            proto.send_close(code if code != 1005 else 1000, "" if code == 1005 else reason)
            self._send_now(proto.data_to_send())
            proto.close_rcvd_then_sent = True
        proto.close_rcvd = WSClose(code, reason)
        proto.state = _ws_protocol.CLOSED
        self._send_now([b""])
        self.wake()

    def _fail(self, code: int, reason: str) -> None:
        proto = self.ws_proto
        self._rest = b""
        if proto.state is _ws_protocol.OPEN:
            proto.send_close(code, reason)
            self._send_now(proto.data_to_send())
        proto.close_rcvd = WSClose(1006, "")  # the read loop ends
        self._send_now([b""])
        self.wake()

    def _send_now(self, chunks: list[bytes]) -> None:
        """Write protocol output (pongs, close frames); an empty chunk means: the close
        handshake is over, close the TCP connection."""
        transport = self.transport
        if transport is None:
            return
        for chunk in chunks:
            if chunk:
                if not transport.is_closing():
                    transport.write(chunk)
            else:
                transport.close()

    async def send_data(self, data_to_send: list[bytes]) -> None:
        """Sanic's close path sends through here."""
        self._send_now(data_to_send)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send our close frame; the TCP connection is closed when the client answers, or
        aborted ``close_timeout`` later."""
        self.close_started = True
        if self.ws_proto.state is not _ws_protocol.OPEN:
            return
        self.ws_proto.send_close(code, reason)
        self._send_now(self.ws_proto.data_to_send())
        if self.transport is not None and self.loop is not None:
            self.loop.call_later(self.close_timeout, self.transport.abort)

    def ping_now(self, now: float) -> float | None:
        """Called by the Pinger: send a ping when one is due, or fail the connection
        (1011) when the last one went unanswered for ``ping_timeout``.  Returns when this
        socket needs a look again (monotonic time), or None once it is gone."""
        state = self.ws_proto.state
        interval = self.ping_interval or 1.0
        if state is not _ws_protocol.OPEN:
            # closing: ``connection_lost`` takes it out of the wheel
            return None if state is _ws_protocol.CLOSED else now + interval
        sent, timeout = self.ping_sent_at, self.ping_timeout
        if sent:
            if not timeout:
                return now + interval  # no deadline: wait for the pong, no second ping
            if now - sent >= timeout:
                self.fail_connection(1011)
                return None
            return sent + timeout
        if now < self.ping_due:  # looked at for a ping's deadline, and the pong came
            return self.ping_due
        self.ping_sent_at = now
        self.ping_due = now + interval
        # the frame is a constant: websockets' send_ping would build and serialize it
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_PING)
        return now + min(timeout, interval) if timeout else self.ping_due

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ws_proto.state = _ws_protocol.CLOSED
        PINGER.discard(self)
        self.wake()

    def fail_connection(self, code: int = 1006, reason: str = "") -> bool:
        """Sanic's version goes through websockets' ``fail`` (its receive side is gone)."""
        if code == 1006:
            self.ws_proto.state = _ws_protocol.CLOSED
            self._send_now([b""])
            self.wake()
        else:
            self._fail(code, reason)
        return True

    def eof_received(self) -> bool | None:
        self.wake()
        return False  # the transport closes itself; connection_lost follows

    @property
    def finished(self) -> bool:
        """No more messages will come: a close frame arrived or the socket is gone."""
        proto = self.ws_proto
        return proto.close_rcvd is not None or proto.state is _ws_protocol.CLOSED

    async def next_messages(self) -> list[tuple[bool, bytes]]:
        """Every message received so far (waiting for one); empty once ``finished``."""
        while not self.inbox:
            if self.finished:
                return []
            self._waiter = (self.loop or asyncio.get_running_loop()).create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch, self.inbox = self.inbox, []
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return batch


_NO_CONTEXT = contextvars.Context()


def untie_when_done(ws: Any) -> None:
    """Call once, when the handler ends (Sanic's connection task, which awaits it, is still
    running): ``_untie`` runs as soon as that task is over.  Registered this late so that
    an idle connection carries no callback."""
    proto = getattr(ws, "io_proto", None)
    task = getattr(proto, "_task", None)
    http = getattr(proto, "_http", None)
    if task is None or task.done():
        _untie(ws, http, task)
    else:
        # an empty context shared by all, not a copy of the request's
        task.add_done_callback(functools.partial(_untie, ws, http), context=_NO_CONTEXT)


def _untie(ws: LeanWebsocket, http: Any, task: Any) -> None:
    """Sanic's connection task is over (the handler returned, the socket is closing): break
    the two reference cycles that would otherwise keep the whole connection (socket
    objects, request, session, close frames) in memory until a full collection.  That is
    ~30 objects per closed connection, all in the oldest generation: under churn the
    worker grew by ~5 KB per closed connection, and the full collection that finally came
    scanned them with every live connection (2.2 s with 5,000 open and 25,000 closed on a
    slow core; ``bench/results/churn-5c5c2d3``)."""
    ws.io_proto = None  # <-> the Sanic protocol's ``websocket``; Sanic's code checks for None
    if http is not None:
        http.response_func = None  # a bound method of ``http`` itself


WHEEL_SLOTS = 64  # the most slots a PingWheel has (a 20 s interval needs 23)


class PingWheel:
    """The Pinger's timing wheel: sockets wait in a slot per step (one second, or the
    interval when it is shorter), in the slot of the step at which they next need a look
    (a ping, or the deadline of one), and a step looks only at its own slot.  So an idle
    worker's keepalive costs per ping, not per socket per step.  (A scan of every socket
    each second, with websockets building each ping frame, was a third of what 10,000
    idle connections cost a worker: 4.0 -> 2.7 % of a core.)

    No task or clock of its own: ``Pinger`` runs it (tests drive it with their own
    times).  A socket in it has ``ping_slot`` (-1 when out), ``ping_due`` and
    ``ping_now(now)``, which answers the time of its next look, or None once it is gone."""

    def __init__(self, interval: float, timeout: float | None, now: float) -> None:
        self.step = min(interval, 1.0)
        longest = max(interval, timeout or 0.0)
        # at most WHEEL_SLOTS: a socket due further on is looked at once a turn until then
        n = min(int(longest / self.step) + 3, WHEEL_SLOTS)
        self.slots: list[set[Any]] = [set() for _ in range(n)]
        self.start = now  # the time of step 0
        self.tick = 0  # the last step run: slot ``tick % len(slots)``
        self.size = 0  # sockets in the wheel

    def add(self, ws: Any) -> None:
        """Into the wheel, looked at first at ``ws.ping_due`` (no-op when it is in)."""
        if ws.ping_slot < 0:
            self.size += 1
            self._place(ws, ws.ping_due)

    def discard(self, ws: Any) -> None:
        """Out of the wheel (safe to call twice, or for a socket never in)."""
        slot = ws.ping_slot
        if slot >= 0:
            ws.ping_slot = -1
            self.slots[slot].discard(ws)
            self.size -= 1

    def next_step_at(self) -> float:
        return self.start + (self.tick + 1) * self.step

    def advance(self, now: float) -> None:
        """Run every step due by ``now``, in order (at least one).  After a stall longer
        than a turn of the wheel every socket is overdue: each is looked at once, and
        the steps count on from ``now``."""
        n = len(self.slots)
        behind = int((now - self.start) / self.step) - self.tick
        if behind < n:
            for _ in range(max(1, behind)):
                self._run_step(now)
            return
        every = [ws for slot in self.slots for ws in slot]
        self.slots = [set() for _ in range(n)]
        self.start = now - self.tick * self.step  # the last step run is now's
        for ws in every:
            self._look(ws, now)

    def _place(self, ws: Any, at: float) -> None:
        """Into the slot of the first step at or after ``at`` (at least the next one; the
        last the wheel reaches when ``at`` is further: it is looked at again then)."""
        tick = -int((self.start - at) // self.step)  # ceil((at - start) / step)
        tick = min(max(tick, self.tick + 1), self.tick + len(self.slots) - 1)
        slot = ws.ping_slot = tick % len(self.slots)
        self.slots[slot].add(ws)

    def _run_step(self, now: float) -> None:
        self.tick += 1
        slot = self.tick % len(self.slots)
        due = self.slots[slot]
        if due:
            self.slots[slot] = set()
            for ws in due:
                self._look(ws, now)

    def _look(self, ws: Any, now: float) -> None:
        ws.ping_slot = -1
        at = ws.ping_now(now)
        if at is None:
            self.size -= 1
        else:
            self._place(ws, at)


class Pinger:
    """One keepalive for every socket of the worker (instead of a task per connection):
    each socket is pinged every ``interval``, and one whose ping is unanswered after its
    ``ping_timeout`` is failed with 1011 (``LeanWebsocket.ping_now``).  One task runs
    the wheel while it holds sockets."""

    def __init__(self) -> None:
        self._wheel: PingWheel | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, ws: LeanWebsocket) -> None:
        """Ping ``ws`` from ``ws.ping_due`` on; the caller must ``discard`` it when its
        connection is lost (``connection_lost`` does)."""
        wheel = self._wheel
        idle = self._task is None or self._task.done()
        if wheel is None or (idle and not wheel.size):
            # sized for the settings of its first socket (one worker's are all the same)
            wheel = self._wheel = PingWheel(ws.ping_interval or 20.0, ws.ping_timeout,
                                            time.monotonic())
        wheel.add(ws)
        if idle:
            self._task = asyncio.ensure_future(self._run(wheel))

    def discard(self, ws: LeanWebsocket) -> None:
        if self._wheel is not None:
            self._wheel.discard(ws)

    async def _run(self, wheel: PingWheel) -> None:
        while wheel.size:
            await asyncio.sleep(max(0.0, wheel.next_step_at() - time.monotonic()))
            wheel.advance(time.monotonic())


PINGER = Pinger()


# Sanic builds its ServerProtocol and websocket from these module globals and offers no
# hook for either.
_ws_protocol.ServerProtocol = SignalingServerProtocol  # type: ignore[misc]
_ws_protocol.WebsocketImplProtocol = LeanWebsocket  # type: ignore[misc]


def _reject(code: HttpCode, message: str) -> HTTPResponse:
    metrics.REJECTED.labels(str(code)).inc()
    err = AuthError(code, message)
    return json({"error": str(code), "message": message}, status=err.status)


async def upgrade_gate(request: Request) -> HTTPResponse | None:
    """Request middleware for ``/ws``: origin, token and device limit are checked here so a
    refusal is a real HTTP answer.  Never raises (Sanic would log the URL with the token)."""
    if request.path != WS_PATH:
        return None
    rt: Runtime = request.app.ctx.runtime
    try:
        if rt.draining:
            return _reject(HttpCode.UNAVAILABLE, "the server is shutting down; reconnect")
        origin = request.headers.get("origin")
        allowed = rt.settings.allowed_origins
        if origin and allowed and origin not in allowed:
            return _reject(HttpCode.FORBIDDEN_ORIGIN, "this origin may not connect")
        token = extract_token(
            request.args.get("token"),
            request.headers.get("authorization"),
            request.headers.get("sec-websocket-protocol"),
        )
        if token is None:
            return _reject(HttpCode.MISSING_TOKEN, "a token is required")
        identity = rt.verifier.verify(token)
        located = await rt.hub.presence.locate([identity.user_id])
        others = [d for d in located.get(identity.user_id, {}) if d != identity.device_id]
        if len(others) >= rt.settings.max_devices_per_user:
            return _reject(
                HttpCode.TOO_MANY_DEVICES,
                f"at most {rt.settings.max_devices_per_user} devices per user",
            )
    except AuthError as exc:
        return _reject(exc.code, exc.message)
    except Exception as exc:
        log.warning("upgrade refused, backplane unavailable: %s", type(exc).__name__)
        return _reject(HttpCode.UNAVAILABLE, "the service is temporarily unavailable")
    request.ctx.identity = identity
    return None


def _welcome(
    rt: Runtime, identity: Identity, conn_id: str, resumed: bool, missed: int
) -> bytes:
    body: dict[str, Any] = {
        "type": "welcome",
        "user_id": identity.user_id,
        "device_id": identity.device_id,
        "connection_id": conn_id,
        "expires_at": identity.expires_at,
        "server_time": now_ms(),
        "rate_limit": {"limit": rt.limiter.limit, "period_s": rt.limiter.period_s},
        "resumed": resumed,
        "missed": missed,
    }
    body.update(ice_fields(rt.settings, identity.user_id))
    return encode(body)


class Flusher:
    """Writes every connection's queued frames once per loop tick: one ``write`` (one
    system call) per connection however many frames it got in the tick, and no writer task
    per connection.  Frames are framed here (server frames are unmasked: a 2-10 byte header)."""

    def __init__(self) -> None:
        self._pending: list[Session] = []
        self._scheduled = False

    def on_ready(self, session: Session) -> None:
        """The ``on_ready`` hook of every session (``session.edge`` is its socket)."""
        self._pending.append(session)
        if not self._scheduled:
            self._scheduled = True
            (session.edge.loop or asyncio.get_running_loop()).call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        sent = 0
        for session in pending:
            try:
                sent += flush_one(session, session.edge)
            except Exception as exc:  # one broken socket must not stall the others
                log.warning("write failed: %s", type(exc).__name__, exc_info=True)
        metrics.count_sent(sent)


_SHORT_HEADS = [bytes((0x81, n)) for n in range(126)]  # a text frame of n < 126 bytes
_HEAD16 = struct.Struct(">BBH").pack  # (0x81, 126, n): one call, no concatenation


def _frame_header(n: int) -> bytes:
    if n < 126:
        return _SHORT_HEADS[n]
    if n < 65536:
        return _HEAD16(0x81, 126, n)
    return b"\x81\x7f" + n.to_bytes(8, "big")


def flush_one(session: Session, ws: LeanWebsocket) -> int:
    """Write what ``session`` has queued; start the close handshake once it is closed.
    Returns the frames written (the caller counts them in ``metrics.count_sent``)."""
    frames = session.take()
    written = 0
    if frames:
        transport = ws.transport
        # no data after our close frame, nor on a socket that is closing or gone (a close
        # frame received, a failure: both close the transport)
        if transport is not None and not ws.close_started and not transport.is_closing():
            # One bytes object per write: uvloop sends a single buffer with a plain write
            # (its fast path); a list of them costs a write context and a writev (copying
            # the frames, SDP included, is cheaper than that).
            if len(frames) == 1:
                frame = frames[0]
                transport.write(_frame_header(len(frame)) + frame)
            else:
                parts: list[bytes] = []
                for frame in frames:
                    parts.append(_frame_header(len(frame)))
                    parts.append(frame)
                transport.write(b"".join(parts))
            written = len(frames)
            if transport.get_write_buffer_size() > session.max_bytes:
                session.close(Close.POLICY, "slow consumer")
    if session.closed and not ws.close_started:
        ws.close_started = True
        ws.wake()  # the read loop ends
        if session.close_code == Close.POLICY:
            # slow consumer / abuse: no close handshake with a client that may not read
            ws.end_connection(session.close_code, session.close_reason)
        else:
            ws.closing = asyncio.ensure_future(
                ws.close(session.close_code or Close.NORMAL, session.close_reason)
            )
    return written


_FLUSHER = Flusher()  # one per worker process (each has one event loop)
_ON_READY = _FLUSHER.on_ready  # one bound method shared by every session


def _closed_by_flush(code: int, reason: str) -> None:
    """Sessions' closer: the close frame goes out from ``flush_one`` in this very tick
    (``on_ready`` is called on close), after the frames queued before it."""


_NO_HEADERS = Header()


def _forget_request(request: Request) -> None:
    """After the upgrade nothing reads the request again, but Sanic keeps it (and its
    protocol the URL) for the connection's lifetime: drop what is big, and the token with
    it.  Worth ~1 KB per idle connection."""
    request.head = b""
    request.raw_url = b""
    request.headers = _NO_HEADERS
    request.parsed_args.clear()
    request.parsed_not_grouped_args.clear()
    request.parsed_token = None
    protocol = getattr(request.transport, "get_protocol", lambda: None)()
    if protocol is not None and hasattr(protocol, "websocket_url"):
        protocol.websocket_url = None  # only the access log (off) reads it


async def websocket_handler(request: Request, ws: Any) -> None:
    """One connection from welcome to goodbye.  Every exception ends here: nothing a client
    does reaches Sanic's error logger (which would print the URL)."""
    rt: Runtime = request.app.ctx.runtime
    identity: Identity = request.ctx.identity
    _forget_request(request)
    # opaque to clients; the node prefix tells operators (and tests) which worker holds it
    conn_id = f"{rt.node_id}.{secrets.token_urlsafe(9)}"

    session = Session(
        identity,
        Location(rt.node_id, conn_id),
        _closed_by_flush,
        rt.settings.outbox_max_messages,
        rt.settings.outbox_max_bytes,
    )
    session.edge = ws
    session.on_ready = _ON_READY
    started = time.monotonic()
    connected = False
    # Sanic cancels this handler when the socket drops; the claim must still finish (and
    # then be parked or released), so it runs in its own task.
    connecting: asyncio.Future[bool] | None = asyncio.ensure_future(
        rt.hub.connect(
            # a partial, not a lambda: a closure would make rt, identity and conn_id cells
            # of this coroutine's frame for the connection's lifetime
            session, functools.partial(_welcome, rt, identity, conn_id)
        )
    )
    try:
        await asyncio.shield(connecting)  # type: ignore[arg-type]
        connecting = None  # claimed; nothing of it needs to stay in memory
        connected = True
        metrics.ACTIVE.inc()
        await _read_loop(rt, ws, session)
    except TooManyDevices:
        session.close(Close.POLICY, "too_many_devices")
    except Exception as exc:
        if not session.closed:
            log.warning("connection failed: %s", type(exc).__name__)
            session.close(Close.INTERNAL, "internal error")
    finally:
        untie_when_done(ws)
        # Sanic cancels this task when the socket closes (even after a clean close frame):
        # the clean-up runs in its own task so that presence and rooms are always settled.
        finish = asyncio.ensure_future(
            _finish(rt, ws, session, connecting, started if connected else None)
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(finish)


async def _finish(
    rt: Runtime,
    ws: LeanWebsocket,
    session: Session,
    connecting: asyncio.Future[bool] | None,
    started: float | None,
) -> None:
    """``connecting``: None once the claim succeeded, else the claim (maybe still running)."""
    if started is not None:
        metrics.ACTIVE.dec()
        metrics.DURATION.observe(time.monotonic() - started)
    if connecting is not None and not connecting.done():
        with contextlib.suppress(BaseException):
            await connecting
    claimed = connecting is None or (
        not connecting.cancelled() and connecting.exception() is None
    )
    with contextlib.suppress(Exception):
        await rt.hub.disconnect(session, park=claimed and _resumable(ws, session))
    if not session.closed:
        session.close(Close.NORMAL)
    metrics.count_sent(flush_one(session, ws))
    if ws.closing is not None:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(ws.closing, timeout=rt.settings.redis_timeout + 3)


# Connections that end like this stay resumable (§10): the server is restarting or failed.
_PARK_CODES = frozenset({Close.RESTART, Close.INTERNAL})


def _resumable(ws: Any, session: Session) -> bool:
    """A drop without a close frame from the client, or our own 1012/1011, parks the
    device; a clean client close, 4009, 4001 and policy closes end it at once."""
    if session.close_code is not None:
        return session.close_code in _PARK_CODES
    return getattr(ws.ws_proto, "close_rcvd", None) is None


async def _read_loop(rt: Runtime, ws: LeanWebsocket, session: Session) -> None:
    router = rt.router
    admit = rt.limiter.admit
    user = session.user_id
    ws.fast = (router, session)
    try:
        while not session.closed:
            batch = await ws.next_messages()
            if not batch:
                return  # closed by the peer, by us, or by the network
            started = router.started(session)
            if started is not None:
                await started  # messages started in the read callback go first
            if session.closed:
                return  # what came with the close is not handled (nor counted)
            if len(batch) > 1:
                # every message of the batch asks the limiter at once (one Redis pipeline
                # per tick); direct messages pipelined, replies in order
                # a loop, not a comprehension: a comprehension's function would make admit
                # and user cells of this coroutine's frame, kept as long as the connection
                admissions = []
                for _ in batch:
                    admissions.append(admit(user))
                await router.handle_batch(session, batch, admissions)
            elif batch[0][0]:
                await router.handle(session, batch[0][1], admit(user), counted=True)
            else:
                await router.handle_binary(session, admit(user), counted=True)
            router.finished(session)
    finally:
        ws.fast = None
        if not session.inflight:  # else the last one in flight resumes the sender
            router.finished(session)  # also after a failure: no hold outlives the loop

