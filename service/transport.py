"""The Sanic edge: the upgrade gate (request middleware, answers before the handshake),
the websocket handler (one read loop and one writer task per connection) and subprotocol
selection.  Everything protocol-level happens in the core; this file moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sanic.server.protocols.websocket_protocol as _ws_protocol
from sanic import Request
from sanic.response import HTTPResponse, json
from sanic.server.websockets.impl import WebsocketImplProtocol
from websockets.frames import Opcode
from websockets.server import ServerProtocol

from . import metrics
from .auth import SUBPROTOCOL, Identity, extract_token
from .core.contracts import Location
from .core.hub import TooManyDevices
from .core.session import Session
from .errors import AuthError, Close, HttpCode
from .ice import ice_fields
from .protocol import encode, now_ms
from .runtime import Runtime

log = logging.getLogger("signaling.transport")
WS_PATH = "/ws"


class SignalingServerProtocol(ServerProtocol):
    """Selects ``signaling.v1`` when the client offers it and goes on without a subprotocol
    otherwise (websockets' default would answer 400 to clients that offer none, breaking
    the ``?token=`` and ``Authorization`` carriers).  The ``bearer.<jwt>`` entry is never
    echoed back."""

    def select_subprotocol(self, subprotocols: Any) -> Any:
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
# Frames read but not yet handled, per connection, before the socket stops being read.
INBOX_PAUSE = 256


class LeanWebsocket(WebsocketImplProtocol):
    """Sanic's websocket with a lean receive path.  Sanic's own one creates a task per
    received chunk and per ``recv()`` (``asyncio.wait`` on fresh futures); here
    ``data_received`` parses the frames synchronously and appends complete messages to
    ``inbox``, waking the connection's read loop through one future.  Control frames
    (ping/pong/close) still take Sanic's path.  The inbox is bounded: past INBOX_PAUSE
    messages the socket is not read until the loop catches up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (is_text, data) of each complete message, oldest first
        self.inbox: deque[tuple[bool, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._paused = False
        self.close_started = False  # the edge began closing (see ``flush_one``)
        self.closing: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        proto = self.ws_proto
        proto.receive_data(data)
        out = proto.data_to_send()
        control = None
        inbox = self.inbox
        events: list[Any] = proto.events_received()  # only frames once the socket is open
        for event in events:
            op = event.opcode
            if op is _TEXT or op is _BINARY:
                if event.fin:
                    inbox.append((op is _TEXT, event.data))
                else:
                    self._fragments = [event.data]
                    self._fragment_text = op is _TEXT
            elif op is _CONT:
                self._fragments.append(event.data)
                if event.fin:
                    inbox.append((self._fragment_text, b"".join(self._fragments)))
                    self._fragments = []
            else:
                control = control or []
                control.append(event)
        if out or control:
            asyncio.ensure_future(self.async_data_received(out, control or []))
        if len(inbox) >= INBOX_PAUSE and not self._paused:
            transport = self.io_proto.transport if self.io_proto is not None else None
            if transport is not None:
                self._paused = True
                transport.pause_reading()
        self.wake()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.wake()

    def eof_received(self) -> bool | None:
        res = super().eof_received()
        self.wake()
        return res

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
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = list(self.inbox)
        self.inbox.clear()
        if self._paused and self.io_proto is not None and self.io_proto.transport is not None:
            self._paused = False
            self.io_proto.transport.resume_reading()
        return batch


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
    """Writes every connection's queued frames once per loop tick: one ``writelines`` (one
    system call) per connection however many frames it got in the tick, and no writer task
    per connection.  Frames are framed here (server frames are unmasked: a 2-10 byte header)."""

    def __init__(self) -> None:
        self._pending: list[tuple[Session, LeanWebsocket]] = []
        self._scheduled = False

    def hook(self, ws: LeanWebsocket) -> Callable[[Session], None]:
        """The ``on_ready`` hook of a session on ``ws``."""

        def on_ready(session: Session) -> None:
            self._pending.append((session, ws))
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)

        return on_ready

    def flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for session, ws in pending:
            try:
                flush_one(session, ws)
            except Exception as exc:  # one broken socket must not stall the others
                log.warning("write failed: %s", type(exc).__name__, exc_info=True)


def _frame_header(n: int) -> bytes:
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big")
    return bytes((0x81, 127)) + n.to_bytes(8, "big")


def flush_one(session: Session, ws: LeanWebsocket) -> None:
    """Write what ``session`` has queued; start the close handshake once it is closed."""
    frames = session.take()
    if frames:
        io = ws.io_proto
        transport = io.transport if io is not None else None
        if (
            transport is not None
            and not transport.is_closing()
            and ws.ws_proto.state is _ws_protocol.OPEN
        ):
            parts: list[bytes] = []
            for frame in frames:
                parts.append(_frame_header(len(frame)))
                parts.append(frame)
            transport.writelines(parts)
            metrics.count_sent(len(frames))
            if transport.get_write_buffer_size() > session.max_bytes:
                session.close(Close.POLICY, "slow consumer")
    if session.closed and not ws.close_started:
        ws.close_started = True
        ws.wake()  # the read loop ends
        if session.close_code != Close.POLICY:  # the closer already ended that one
            ws.closing = asyncio.ensure_future(
                ws.close(session.close_code or Close.NORMAL, session.close_reason)
            )


_FLUSHER = Flusher()  # one per worker process (each has one event loop)


async def websocket_handler(request: Request, ws: Any) -> None:
    """One connection from welcome to goodbye.  Every exception ends here: nothing a client
    does reaches Sanic's error logger (which would print the URL)."""
    rt: Runtime = request.app.ctx.runtime
    identity: Identity = request.ctx.identity
    # opaque to clients; the node prefix tells operators (and tests) which worker holds it
    conn_id = f"{rt.node_id}.{secrets.token_urlsafe(9)}"

    def closer(code: int, reason: str) -> None:
        if code == Close.POLICY:  # slow consumer / abuse: do not wait on a client that stalls
            with contextlib.suppress(Exception):
                ws.end_connection(code, reason)

    session = Session(
        identity,
        Location(rt.node_id, conn_id),
        closer,
        rt.settings.outbox_max_messages,
        rt.settings.outbox_max_bytes,
    )
    session.on_ready = _FLUSHER.hook(ws)
    started = time.monotonic()
    connected = False
    # Sanic cancels this handler when the socket drops; the claim must still finish (and
    # then be parked or released), so it runs in its own task.
    connecting = asyncio.ensure_future(
        rt.hub.connect(
            session, lambda resumed, missed: _welcome(rt, identity, conn_id, resumed, missed)
        )
    )
    try:
        await asyncio.shield(connecting)
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
    connecting: asyncio.Future[bool],
    started: float | None,
) -> None:
    if started is not None:
        metrics.ACTIVE.dec()
        metrics.DURATION.observe(time.monotonic() - started)
    if not connecting.done():
        with contextlib.suppress(BaseException):
            await connecting
    claimed = connecting.done() and not connecting.cancelled() and connecting.exception() is None
    with contextlib.suppress(Exception):
        await rt.hub.disconnect(session, park=claimed and _resumable(ws, session))
    if not session.closed:
        session.close(Close.NORMAL)
    flush_one(session, ws)
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
    while not session.closed:
        batch = await ws.next_messages()
        if not batch:
            return  # closed by the peer, by us, or by the network
        # every message of the batch asks the limiter at once: one Redis pipeline per tick
        admissions = [admit(user) for _ in batch]
        for i, ((is_text, data), admission) in enumerate(zip(batch, admissions, strict=True)):
            if session.closed:
                for rest in admissions[i:]:
                    if isinstance(rest, asyncio.Future):
                        rest.add_done_callback(_ignore_outcome)
                return
            if is_text:
                await router.handle(session, data, admission, counted=True)
            else:
                await router.handle_binary(session, admission, counted=True)


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: asyncio does not log it as lost
