"""The Sanic edge: the upgrade gate (request middleware, answers before the handshake),
the websocket handler (one read loop and one writer task per connection) and subprotocol
selection.  Everything protocol-level happens in the core; this file moves bytes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import sanic.server.protocols.websocket_protocol as _ws_protocol
from sanic import Request
from sanic.response import HTTPResponse, json
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


# Sanic builds its ServerProtocol from this module global and offers no hook for it.
_ws_protocol.ServerProtocol = SignalingServerProtocol  # type: ignore[misc]


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
    started = time.monotonic()
    writer = asyncio.create_task(_write_loop(ws, session))
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
        if connected:
            metrics.ACTIVE.dec()
            metrics.DURATION.observe(time.monotonic() - started)
        if not connecting.done():
            with contextlib.suppress(BaseException):
                await connecting
        claimed = (
            connecting.done() and not connecting.cancelled() and connecting.exception() is None
        )
        with contextlib.suppress(Exception):
            await rt.hub.disconnect(session, park=claimed and _resumable(ws, session))
        if not session.closed:
            session.close(Close.NORMAL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, timeout=rt.settings.redis_timeout + 3)
        if not writer.done():
            writer.cancel()


# Connections that end like this stay resumable (§10): the server is restarting or failed.
_PARK_CODES = frozenset({Close.RESTART, Close.INTERNAL})


def _resumable(ws: Any, session: Session) -> bool:
    """A drop without a close frame from the client, or our own 1012/1011, parks the
    device; a clean client close, 4009, 4001 and policy closes end it at once."""
    if session.close_code is not None:
        return session.close_code in _PARK_CODES
    return getattr(ws.ws_proto, "close_rcvd", None) is None


async def _read_loop(rt: Runtime, ws: Any, session: Session) -> None:
    router = rt.router
    while not session.closed:
        try:
            data = await ws.recv()
        except Exception:  # closed by the peer, by us, or by the network
            return
        if data is None:
            return
        if isinstance(data, str):
            await router.handle(session, data)
        else:
            await router.handle_binary(session)


async def _write_loop(ws: Any, session: Session) -> None:
    """Drain the session's outbox onto the socket, then close it with the session's code."""
    try:
        while True:
            await session.ready.wait()
            frames = session.take()
            if frames:
                await _send_text_frames(ws, frames)
                metrics.SENT.inc(len(frames))
            if session.closed:
                if session.close_code != Close.POLICY:
                    await ws.close(session.close_code or Close.NORMAL, session.close_reason)
                return
    except Exception:
        return


async def _send_text_frames(ws: Any, frames: list[bytes]) -> None:
    """Send already-encoded UTF-8 JSON as text frames in one write (Sanic's ``send`` would
    need a str and encode it again, one write per frame)."""
    async with ws.conn_mutex:
        proto = ws.ws_proto
        if proto.state is not _ws_protocol.OPEN:
            raise ConnectionError("websocket is not open")
        for frame in frames:
            proto.send_text(frame)
        await ws.send_data(proto.data_to_send())
