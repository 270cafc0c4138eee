"""Every rule of the protocol for one client frame: ``Router.handle(session, frame)``.

Replies go onto the session's outbox; the router never touches a socket and never raises
for anything a client sent.  Messages of one connection must be handled one at a time (the
edge awaits each ``handle``), which is what keeps per-sender order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ..errors import Close, Code, ProtocolError
from ..protocol import (
    DIRECT_TYPES,
    Direct,
    Message,
    Ping,
    PresenceQuery,
    encode,
    encode_direct,
    encode_error,
    now_ms,
    parse,
    with_id,
)
from .contracts import Envelope, RateLimiter
from .hub import Hub
from .session import Session

log = logging.getLogger("signaling.router")

# Rate-limited messages in a row (in units of the limit) after which a client is closed.
ABUSE_FACTOR = 5


class Router:
    def __init__(
        self,
        hub: Hub,
        limiter: RateLimiter,
        *,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.hub = hub
        self.limiter = limiter
        self.stats = hub.stats
        self._clock_ms = clock_ms
        self._abuse_strikes = max(limiter.limit * ABUSE_FACTOR, 50)

    # ------------------------------------------------------------------ entry points

    async def handle(self, session: Session, frame: str | bytes) -> None:
        """Handle one text frame of ``session``; errors become ``error`` frames."""
        msg: Message | None = None
        err: ProtocolError | None = None
        try:
            msg = parse(frame)
        except ProtocolError as exc:
            err = exc
        kind = msg.type if msg is not None else "invalid"
        self.stats.received(kind)
        msg_id = msg.id if msg is not None else (err.msg_id if err else None)
        if not await self._admit(session, msg_id):
            return
        try:
            if err is not None:
                raise err
            assert msg is not None
            await self._dispatch(session, msg)
        except ProtocolError as exc:
            self._error(session, exc)
        except Exception as exc:  # a backend failed: the client learns, the server goes on
            self.stats.backplane_error("route")
            log.warning("routing failed: %s", type(exc).__name__)
            self._error(
                session,
                ProtocolError(
                    Code.INTERNAL, "the server failed; the message may not have been delivered",
                    msg_id,
                ),
            )

    async def handle_binary(self, session: Session) -> None:
        """A binary frame: counted like any message, answered with ``bad_frame``."""
        self.stats.received("binary")
        if await self._admit(session, None):
            self._error(session, ProtocolError(Code.BAD_FRAME, "binary frames are not accepted"))

    # ------------------------------------------------------------------ rules

    async def _admit(self, session: Session, msg_id: str | None) -> bool:
        """The per-user budget (§7).  Sustained abuse closes the connection with 1008."""
        try:
            retry = await self.limiter.hit(session.user_id)
        except Exception as exc:
            # Fail open: a signaling outage hurts users more than a brief unmetered window;
            # the per-connection outbox and frame-size bounds still hold.
            self.stats.backplane_error("rate_limit")
            log.warning("rate limiter unavailable (failing open): %s", type(exc).__name__)
            return True
        if retry is None:
            session.strikes = 0
            return True
        self.stats.rate_limited()
        session.strikes += 1
        if session.strikes > self._abuse_strikes:
            session.close(Close.POLICY, "sustained abuse")
            return False
        self._error(
            session,
            ProtocolError(
                Code.RATE_LIMITED,
                "rate limit exceeded; message dropped",
                msg_id,
                retry_after_ms=max(1, int(retry * 1000)),
            ),
        )
        return False

    async def _dispatch(self, session: Session, msg: Message) -> None:
        if isinstance(msg, Direct):
            await self._direct(session, msg)
        elif isinstance(msg, Ping):
            session.push(with_id({"type": "pong", "ts": self._clock_ms()}, msg.id))
        elif isinstance(msg, PresenceQuery):
            await self._presence(session, msg)
        else:
            raise ProtocolError(
                Code.UNKNOWN_TYPE, f"{msg.type!r} is not supported by this server yet", msg.id
            )

    async def _direct(self, session: Session, msg: Direct) -> None:
        """§3: route to every live device of ``to`` (or ``to_device``), never back to the
        sending device; ack with the number of devices, or ``peer_offline``."""
        assert msg.type in DIRECT_TYPES
        located = (await self.hub.presence.locate([msg.to])).get(msg.to, {})
        targets = {
            device: loc
            for device, loc in located.items()
            if (msg.to_device is None or device == msg.to_device)
            and not (msg.to == session.user_id and device == session.device_id)
        }
        ts = self._clock_ms()
        delivered = 0
        if targets:
            frame = encode_direct(msg, session.user_id, session.device_id, ts)
            delivered = await self._route(msg.to, targets, frame, ts)
        if delivered == 0:
            raise ProtocolError(Code.PEER_OFFLINE, "no device of the peer is online", msg.id,
                                to=msg.to)
        if msg.id is not None:
            session.push(encode({"type": "ack", "id": msg.id, "devices": delivered}))

    async def _route(self, user: str, targets: dict[str, Any], frame: bytes, ts: int) -> int:
        """Local devices straight onto their outboxes; each remote worker gets one envelope.
        Returns the devices the message was handed to."""
        me = self.hub.node_id
        local = [d for d, loc in targets.items() if loc.node == me]
        delivered = self.hub.deliver(user, local, frame) if local else 0
        remote: dict[str, list[str]] = {}
        for device, loc in targets.items():
            if loc.node != me:
                remote.setdefault(loc.node, []).append(device)
        if not remote:
            return delivered
        nodes = list(remote)
        results = await asyncio.gather(
            *(
                self.hub.backplane.send(
                    n, Envelope("deliver", user, tuple(remote[n]), frame, ts=ts)
                )
                for n in nodes
            ),
            return_exceptions=True,
        )
        failed: BaseException | None = None
        for node, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                failed = res
            elif res:
                delivered += len(remote[node])
        if failed is not None and delivered == 0:
            raise failed
        return delivered

    async def _presence(self, session: Session, msg: PresenceQuery) -> None:
        users = list(dict.fromkeys(msg.users))
        located = await self.hub.presence.locate(users)
        body = {
            u: {"online": bool(located.get(u)), "devices": sorted(located.get(u, {}))}
            for u in users
        }
        session.push(with_id({"type": "presence", "users": body}, msg.id))

    def _error(self, session: Session, err: ProtocolError) -> None:
        self.stats.error(str(err.code))
        session.push(encode_error(err))
