"""Every rule of the protocol for one client frame: ``Router.handle(session, frame)``.

Replies go onto the session's outbox; the router never touches a socket and never raises
for anything a client sent.  Messages of one connection must be handed over in order and
one call at a time (the edge awaits each ``handle``, or ``handle_batch`` for frames read
together, which pipelines direct messages but keeps deliveries and replies in order): that
is what keeps per-sender order.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from ..errors import Close, Code, ProtocolError
from ..protocol import (
    DIRECT_TYPES,
    MAX_WATCH_USERS,
    Direct,
    DirectFields,
    Message,
    Ping,
    PresenceQuery,
    Publish,
    Refresh,
    Subscribe,
    Unsubscribe,
    Unwatch,
    Watch,
    encode,
    encode_ack,
    encode_direct,
    encode_error,
    now_ms,
    parse,
    parse_direct,
    with_id,
)
from .contracts import PARKED, Located, Location, RateLimiter, RouteOutcome, delivery
from .hub import Hub
from .ratelimit import Admission, resolve
from .session import Session

if TYPE_CHECKING:
    from ..auth import Identity

Verify = Callable[[str], "Identity"]
Extras = Callable[["Identity"], dict[str, Any]]

log = logging.getLogger("signaling.router")

# Rate-limited messages in a row (in units of the limit) after which a client is closed.
ABUSE_FACTOR = 5


class Router:
    def __init__(
        self,
        hub: Hub,
        limiter: RateLimiter,
        *,
        verify: Verify | None = None,
        extras: Extras | None = None,
        max_rooms_per_connection: int = 50,
        max_room_members: int = 500,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        """``verify`` checks a refreshed token (raising on any failure); ``extras`` adds
        fields to ``refreshed`` (the ICE servers)."""
        self.hub = hub
        self.limiter = limiter
        self._verify = verify
        self._extras = extras
        self.max_rooms = max_rooms_per_connection
        self.max_room_members = max_room_members
        self.stats = hub.stats
        self._clock_ms = clock_ms
        self._abuse_strikes = max(limiter.limit * ABUSE_FACTOR, 50)
        # ``handle_now`` works when neither the limiter nor the lookup has to be awaited
        self.inline = limiter.synchronous

    # ------------------------------------------------------------------ entry points

    async def handle(
        self, session: Session, frame: str | bytes, admission: Admission = None,
        counted: bool = False,
    ) -> None:
        """Handle one text frame of ``session``; errors become ``error`` frames.  A caller
        that read several frames at once may ask the limiter for all of them first
        (``admission`` from ``limiter.admit``, ``counted=True``): one batch, same order."""
        err: ProtocolError | None = None
        # a direct message (most frames) in one decode; anything else through ``parse``
        # (which accepts no direct message that ``parse_direct`` refused)
        msg: Message | DirectFields | None = parse_direct(frame)
        direct = msg is not None
        if msg is None:
            try:
                msg = parse(frame)
            except ProtocolError as exc:
                err = exc
        kind = msg.type if msg is not None else "invalid"
        self.stats.received(kind)
        msg_id = msg.id if msg is not None else (err.msg_id if err else None)
        early: Awaitable[Located] | None = None
        if counted and admission is None:  # admitted already (the common case): no await
            session.strikes = 0
        else:
            if direct and isinstance(admission, asyncio.Future):
                # The limiter answers with its next round trip; the recipient's lookup
                # rides in the same one instead of the one after (one round trip less
                # per message when messages come a few per tick).
                early = self.hub.presence.locate([cast(DirectFields, msg).to])
            if not await self._admit(session, msg_id, admission, counted):
                if early is not None:
                    _abandon(early)
                return
        try:
            if err is not None:
                raise err
            assert msg is not None
            if direct:  # the hot path, without a dispatch frame
                await self._direct(session, cast(DirectFields, msg), early)
            else:
                await self._dispatch(session, cast(Message, msg))
        except Exception as exc:
            self._failed(session, exc, msg_id)

    async def handle_batch(
        self, session: Session, frames: Sequence[tuple[bool, bytes]],
        admissions: Sequence[Admission],
    ) -> None:
        """Frames the edge read together (``(is_text, data)``, in order), each with its
        ``limiter.admit`` answer.  Direct messages in a row are pipelined: their lookups go
        out together (for those admitted already, with their envelopes:
        ``backplane.route``), each one's envelopes are queued as soon as its lookup is in (in
        frame order: deliveries to any device keep their order), and their acks follow, in
        order, once the envelopes are written.  Any other frame, a refusal, a failure and a
        message for a parked device first wait for the replies in flight: replies keep the
        frames' order too.  A connection's k queued messages then take two round trips
        instead of 2k (one at a time, a backlog could outgrow what one connection drains)."""
        msgs = [parse_direct(data) if is_text else None for is_text, data in frames]
        lookups: list[Awaitable[Located | int | dict[str, Location]] | None] = []
        routed: list[tuple[bytes, int] | None] = []
        # Admitted direct messages are looked up and queued in one step, up to the first
        # frame that is not one: what comes after such a frame must not overtake it.  (A
        # connection that closes during the batch has its routed messages sent: they came
        # before the close.)
        routing = not session.closed
        for msg, admission in zip(msgs, admissions, strict=True):
            if msg is None:
                routing = False
                lookups.append(None)
                routed.append(None)
            elif routing and admission is None:
                frame, ts, step = self._routing(session, msg)
                lookups.append(step)
                routed.append((frame, ts))
            else:
                # not admitted yet (or refused): its envelopes can only go after the
                # lookup; a later message's must not overtake them
                routing = False
                lookups.append(self.hub.presence.locate([msg.to]))
                routed.append(None)
        inflight: list[_InFlight] = []
        done = 0
        try:
            for (is_text, data), msg, admission, prepared in zip(
                    frames, msgs, admissions, routed, strict=True):
                if session.closed:
                    break
                lookup, lookups[done] = lookups[done], None
                done += 1
                if msg is None or lookup is None:
                    await self._settle(session, inflight)
                    if is_text:
                        await self.handle(session, data, admission, counted=True)
                    else:
                        await self.handle_binary(session, admission, counted=True)
                    continue
                await self._pipelined(session, msg, admission, lookup, prepared, inflight)
            await self._settle(session, inflight)
        finally:
            for pending in lookups:
                if pending is not None:
                    _abandon(pending)
            for *_, sends in inflight:
                for send in sends:
                    _abandon(send)
            for rest in admissions[done:]:
                if isinstance(rest, asyncio.Future):
                    _abandon(rest)

    async def _pipelined(
        self, session: Session, msg: DirectFields, admission: Admission,
        lookup: Awaitable[Located | int | dict[str, Location]],
        prepared: tuple[bytes, int] | None, inflight: list[_InFlight],
    ) -> None:
        """One direct message of ``handle_batch``: its envelopes queued and its ack left in
        ``inflight`` when it goes to other workers only; otherwise handled as ``_direct``
        does once the replies in flight are out.  ``lookup`` is the message's
        ``backplane.route`` when ``prepared`` holds its frame and time, else its
        ``locate``."""
        self.stats.received(msg.type)
        retry = await self._retry_of(admission)
        if retry is not None:
            _abandon(lookup)
            await self._settle(session, inflight)
            self._admitted(session, msg.id, retry)
            return
        session.strikes = 0
        try:
            got = await lookup
            frame, ts = prepared or (b"", 0)
            if type(got) is int:  # queued already: its ack after those in flight
                if inflight:
                    inflight.append((msg, got, [], []))
                else:
                    self._acknowledge(session, msg, got)
                return
            found = cast(Located, {msg.to: got} if prepared else got)
            delivered, remote, parked, frame, ts = self._first_step(
                session, msg, found, frame, ts)
            if remote and not parked:
                # queued now, in frame order (a coroutine send becomes a task: it must not
                # wait for ``_settle``); a future (Redis) is taken as it is
                counts, sends = self._envelopes(msg.to, remote, frame, ts)
                inflight.append(
                    (msg, delivered, counts, [asyncio.ensure_future(s) for s in sends]))
                return
            await self._settle(session, inflight)
            if parked:
                delivered = await self._send_on(msg.to, remote, parked, frame, ts, delivered)
            self._acknowledge(session, msg, delivered)
        except Exception as exc:
            await self._settle(session, inflight)
            self._failed(session, exc, msg.id)

    async def _settle(self, session: Session, inflight: list[_InFlight]) -> None:
        """The acks (or errors) of the pipelined messages in flight, in order, as
        ``_send_on`` and ``_direct`` would answer them."""
        while inflight:
            msg, delivered, counts, sends = inflight[0]
            failed: BaseException | None = None
            for n, send in zip(counts, sends, strict=True):
                try:
                    if await send:
                        delivered += n
                except Exception as exc:
                    failed = exc
            del inflight[0]
            try:
                if failed is not None and delivered == 0:
                    raise failed
                self._acknowledge(session, msg, delivered)
            except Exception as exc:
                self._failed(session, exc, msg.id)

    def handle_now(self, session: Session, frame: bytes) -> bool:
        """Handle one text frame at once, when nothing in it needs waiting for: a direct
        message (§3) whose recipients are all on this worker, with an in-process limiter
        and presence (the embedded single-worker setup).  With a limiter and a backplane
        that must be awaited (Redis), a direct message a lease admits is started instead
        (``_route_now``): the caller must then wait for ``started(session)`` before it
        hands over a later frame.  Otherwise returns False having done nothing (nothing
        counted, nothing sent): the caller must then pass this frame and every later one
        of the connection to ``handle``, in order.  The edge calls this
        from the socket's read callback: no task wake-up, coroutine or future per message
        (one instance at 2,000 connections: 0.035 → 0.029 CPU-s per 1,000 messages)."""
        if session.closed:
            return False
        if not self.inline:
            return self._route_now(session, frame)
        msg = parse_direct(frame)
        if msg is None:
            return False  # another type, or an error that ``handle`` names
        found = self.hub.presence.locate_now(msg.to)
        if found is None:
            return False
        # ``_targets``, ``_admitted`` and ``_acknowledge`` inline for their common cases:
        # this runs for every message of the embedded setup, and each call is ~60 ns
        if msg.to_device is None and msg.to != session.user_id:
            targets = found
        else:
            targets = self._targets(session, msg, found)
        me = self.hub.node_id
        for loc in targets.values():
            if loc.node != me:
                return False  # on another worker, or parked: the backplane is awaited
        self.stats.received(msg.type)
        try:
            # ``inline``: the limiter is synchronous (a float or None, never a future)
            retry = self.limiter.admit(session.user_id)
            if retry is not None:
                self._admitted(session, msg.id, retry)  # type: ignore[arg-type]  # refused
                return True
            session.strikes = 0
            if targets:
                frame = encode_direct(msg, session.user_id, session.device_id,
                                      self._clock_ms())
                delivered = self.hub.deliver(msg.to, targets, frame)
                if delivered and msg.id is not None:
                    session.push(encode_ack(msg.id, delivered))
                    return True
            else:
                delivered = 0
            self._acknowledge(session, msg, delivered)
        except Exception as exc:
            self._failed(session, exc, msg.id)
        return True

    def _route_now(self, session: Session, frame: bytes) -> bool:
        """``handle_now`` on a backplane that must be awaited (Redis): a direct message
        admitted by a lease starts its one-step route (``backplane.route``) here, and a
        callback of its outcome finishes it: no task wake-up or coroutine per message.
        Later frames of the connection start the same way meanwhile: the routes of one
        sender reach Redis in order, and once one of them was not queued in one step the
        backplane holds the sender's later ones back (their outcomes finish in order,
        through ``session.chain``) until none is in flight (``_end_now``: ``resume``).
        ``session.inflight`` counts them: the edge waits for ``started`` before it hands
        over a frame this refuses."""
        msg = parse_direct(frame)
        if msg is None or not self.limiter.leased(session.user_id):
            return False
        self.stats.received(msg.type)
        session.strikes = 0
        out, ts, skip = self._stamped(session, msg)
        session.inflight += 1
        self.hub.backplane.route_then(
            msg.to, msg.to_device, skip, out, ts, id(session),
            functools.partial(self._routed_now, session, msg, out, ts))
        return True

    def started(self, session: Session) -> asyncio.Future[None] | None:
        """What the edge must await before it handles a frame of ``session`` itself: the
        messages ``handle_now`` started are finished first.  None when none is in flight
        (a future is made only for a wait: not one per message)."""
        if not session.inflight:
            return None
        if session.pending is None:
            session.pending = asyncio.get_running_loop().create_future()
        return session.pending

    def _routed_now(
        self, session: Session, msg: DirectFields, frame: bytes, ts: int,
        got: RouteOutcome,
    ) -> None:
        """The outcome of a ``_route_now``: the ack (or an error) now when it was queued or
        its devices are all here; the sends to other workers and parked devices in a task
        (``session.chain``); behind such a task, all of it in the next one."""
        if session.chain is not None:
            session.chain = asyncio.ensure_future(
                self._finish_now(session, msg, got, frame, ts, session.chain))
            return
        try:
            if isinstance(got, BaseException):
                raise got
            if type(got) is int:
                self._acknowledge(session, msg, got)
            else:
                found: Located = {msg.to: cast(dict[str, Location], got)}
                delivered, remote, parked, frame, ts = self._first_step(
                    session, msg, found, frame, ts)
                if remote or parked:
                    session.chain = asyncio.ensure_future(self._send_rest(
                        session, msg, remote, parked, frame, ts, delivered))
                    return
                self._acknowledge(session, msg, delivered)
        except Exception as exc:
            self._failed(session, exc, msg.id)
        self._end_now(session)

    async def _send_rest(
        self, session: Session, msg: DirectFields, remote: dict[str, list[str]],
        parked: list[str], frame: bytes, ts: int, delivered: int,
    ) -> None:
        try:
            delivered = await self._send_on(msg.to, remote, parked, frame, ts, delivered)
            self._acknowledge(session, msg, delivered)
        except Exception as exc:
            self._failed(session, exc, msg.id)
        finally:
            self._chain_done(session)

    async def _finish_now(
        self, session: Session, msg: DirectFields, got: RouteOutcome, frame: bytes,
        ts: int, before: asyncio.Future[None],
    ) -> None:
        """A ``_route_now`` whose outcome came while the one before it was still being
        finished: all of it, as ``_direct`` does, once that one is done."""
        try:
            try:
                await before
            except asyncio.CancelledError:
                if not before.cancelled():
                    raise  # this task is cancelled (the worker is stopping)
            if isinstance(got, BaseException):
                raise got
            if type(got) is int:
                self._acknowledge(session, msg, got)
            else:
                found: Located = {msg.to: cast(dict[str, Location], got)}
                await self._deliver_found(session, msg, found, frame, ts)
        except Exception as exc:
            self._failed(session, exc, msg.id)
        finally:
            self._chain_done(session)

    def _chain_done(self, session: Session) -> None:
        if session.chain is asyncio.current_task():
            session.chain = None
        self._end_now(session)

    def _end_now(self, session: Session) -> None:
        """One ``_route_now`` finished; the last one lets the sender's routes queue again
        and the edge hand over the next frames."""
        session.inflight -= 1
        if session.inflight:
            return
        self.hub.backplane.resume(id(session))
        pending, session.pending = session.pending, None
        if pending is not None and not pending.done():
            pending.set_result(None)

    def finished(self, session: Session) -> None:
        """The edge handled a batch of the session's frames to the end (``handle``,
        ``handle_batch``): nothing of it is in flight, its routes may queue again."""
        self.hub.backplane.resume(id(session))

    def _failed(self, session: Session, exc: Exception, msg_id: str | None) -> None:
        """A refusal becomes its error frame; anything else (a backend failed) becomes
        ``internal``: the client learns, the server goes on."""
        if isinstance(exc, ProtocolError):
            self._error(session, exc)
            return
        self.stats.backplane_error("route")
        log.warning("routing failed: %s", type(exc).__name__)
        self._error(
            session,
            ProtocolError(
                Code.INTERNAL, "the server failed; the message may not have been delivered",
                msg_id,
            ),
        )

    async def handle_binary(
        self, session: Session, admission: Admission = None, counted: bool = False
    ) -> None:
        """A binary frame: counted like any message, answered with ``bad_frame``."""
        self.stats.received("binary")
        if await self._admit(session, None, admission, counted):
            self._error(session, ProtocolError(Code.BAD_FRAME, "binary frames are not accepted"))

    # ------------------------------------------------------------------ rules

    async def _admit(
        self,
        session: Session,
        msg_id: str | None,
        admission: Admission = None,
        counted: bool = False,
    ) -> bool:
        """The per-user budget (§7); ``admission`` is the limiter's answer when the caller
        asked already (``counted``).  Sustained abuse closes the connection with 1008."""
        retry = await self._retry_of(
            admission if counted else self.limiter.admit(session.user_id))
        return self._admitted(session, msg_id, retry)

    async def _retry_of(self, admission: Admission) -> float | None:
        """The limiter's answer; None (admitted) when the limiter failed."""
        try:
            return await resolve(admission)
        except Exception as exc:
            # Fail open: a signaling outage hurts users more than a brief unmetered window;
            # the per-connection outbox and frame-size bounds still hold.
            self.stats.backplane_error("rate_limit")
            log.warning("rate limiter unavailable (failing open): %s", type(exc).__name__)
            return None

    def _admitted(self, session: Session, msg_id: str | None, retry: float | None) -> bool:
        """The limiter's answer ``retry`` applied: refused messages are answered (or the
        connection closed, past the abuse threshold); True when the message goes on."""
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
        elif isinstance(msg, Publish):
            await self._publish(session, msg)
        elif isinstance(msg, Subscribe):
            await self._subscribe(session, msg)
        elif isinstance(msg, Unsubscribe):
            await self._unsubscribe(session, msg)
        elif isinstance(msg, Watch):
            await self._watch(session, msg)
        elif isinstance(msg, Unwatch):
            await self._unwatch(session, msg)
        elif isinstance(msg, Refresh):
            self._refresh(session, msg)
        else:  # pragma: no cover - parse() only returns the types above
            raise ProtocolError(Code.UNKNOWN_TYPE, "unknown message type", msg.id)

    async def _direct(
        self, session: Session, msg: DirectFields, early: Awaitable[Located] | None = None
    ) -> None:
        """§3: route to every live device of ``to`` (or ``to_device``), never back to the
        sending device; ack with the number of devices, or ``peer_offline``.  ``early``:
        the lookup of ``to``, when the caller started it already."""
        assert msg.type in DIRECT_TYPES
        if early is None:  # admitted already: lookup and envelopes in one step
            frame, ts, routing = self._routing(session, msg)
            got = await routing
            if type(got) is int:  # queued for every device (or none to queue for)
                self._acknowledge(session, msg, got)
                return
            found: Located = {msg.to: cast(dict[str, Location], got)}
        else:
            frame, ts = b"", 0
            found = await early
        await self._deliver_found(session, msg, found, frame, ts)

    async def _deliver_found(
        self, session: Session, msg: DirectFields, found: Located, frame: bytes, ts: int
    ) -> None:
        """A direct message from its lookup's answer on: local devices now, an await only
        when a device is on another worker or parked, then the ack (raises a refusal)."""
        delivered, remote, parked, frame, ts = self._first_step(session, msg, found, frame, ts)
        if remote or parked:
            delivered = await self._send_on(msg.to, remote, parked, frame, ts, delivered)
        self._acknowledge(session, msg, delivered)

    def _routing(
        self, session: Session, msg: DirectFields
    ) -> tuple[bytes, int, asyncio.Future[int | dict[str, Location]]]:
        """The message's frame, its acceptance time, and ``backplane.route`` of it (the
        caller must await that, or ``_abandon`` it)."""
        frame, ts, skip = self._stamped(session, msg)
        return frame, ts, self.hub.backplane.route(
            msg.to, msg.to_device, skip, frame, ts, id(session))

    def _stamped(self, session: Session, msg: DirectFields) -> tuple[bytes, int, str | None]:
        """The message's frame as its recipients get it, its acceptance time, and the
        device its route must leave out (the sender's own, when it writes to itself)."""
        ts = self._clock_ms()
        frame = encode_direct(msg, session.user_id, session.device_id, ts)
        return frame, ts, session.device_id if msg.to == session.user_id else None

    def _first_step(
        self, session: Session, msg: DirectFields, found: Located, frame: bytes = b"",
        ts: int = 0,
    ) -> tuple[int, dict[str, list[str]], list[str], bytes, int]:
        """What a direct message does at once: its frame (with its acceptance time; made
        here unless given) handed to the recipient's devices on this worker.  Returns how
        many took it, the other devices by worker, the parked ones, the frame and the time
        (for ``_send_on``)."""
        targets = self._targets(session, msg, found.get(msg.to, {}))
        if not ts:
            ts = self._clock_ms()
        if not targets:
            return 0, {}, [], b"", ts
        if not frame:
            frame = encode_direct(msg, session.user_id, session.device_id, ts)
        return (*self._deliver_local(msg.to, targets, frame), frame, ts)

    @staticmethod
    def _targets(session: Session, msg: DirectFields, located: dict[str, Location]) -> dict[
            str, Location]:
        """The devices of ``msg.to`` (live, from ``located``) that get ``msg``: every one,
        or ``to_device``; never the sending device."""
        if msg.to_device is None and msg.to != session.user_id:
            return located  # every device (the lookup's answer is this call's own dict)
        return {
            device: loc
            for device, loc in located.items()
            if (msg.to_device is None or device == msg.to_device)
            and not (msg.to == session.user_id and device == session.device_id)
        }

    def _acknowledge(self, session: Session, msg: DirectFields, delivered: int) -> None:
        """The ack (when ``msg`` has an id) for ``delivered`` devices; none is
        ``peer_offline``."""
        if delivered == 0:
            raise ProtocolError(Code.PEER_OFFLINE, "no device of the peer is online", msg.id,
                                to=msg.to)
        if msg.id is not None:
            session.push(encode_ack(msg.id, delivered))

    def _envelopes(
        self, user: str, remote: dict[str, list[str]], frame: bytes, ts: int
    ) -> tuple[list[int], list[Awaitable[bool]]]:
        """One envelope of ``frame`` per worker of ``remote``, queued on the backplane: the
        devices each one is for, and their outcomes (True: taken; False: the worker is
        gone)."""
        backplane = self.hub.backplane
        if len(remote) == 1:  # one other worker (most messages): no comprehensions
            for node, devices in remote.items():
                return [len(devices)], [backplane.send(node, delivery(
                    user, tuple(devices), frame, ts))]
        counts = [len(devices) for devices in remote.values()]
        sends = [
            backplane.send(node, delivery(user, tuple(devices), frame, ts))
            for node, devices in remote.items()
        ]
        return counts, sends

    async def _route(self, user: str, targets: dict[str, Any], frame: bytes, ts: int) -> int:
        """Local devices straight onto their outboxes; each remote worker gets one envelope.
        Returns the devices the message was handed to."""
        delivered, remote, parked = self._deliver_local(user, targets, frame)
        if not remote and not parked:
            return delivered
        return await self._send_on(user, remote, parked, frame, ts, delivered)

    def _deliver_local(
        self, user: str, targets: dict[str, Any], frame: bytes
    ) -> tuple[int, dict[str, list[str]], list[str]]:
        """Hand ``frame`` to the devices of ``targets`` on this worker; returns how many took
        it, the other devices by worker, and the parked ones (for ``_send_on``)."""
        me = self.hub.node_id
        local: list[str] = []
        remote: dict[str, list[str]] = {}
        parked: list[str] = []
        for device, loc in targets.items():
            node = loc.node
            if node == me:
                local.append(device)
            elif node == PARKED:
                parked.append(device)
            else:
                remote.setdefault(node, []).append(device)
        delivered = self.hub.deliver(user, local, frame) if local else 0
        return delivered, remote, parked

    async def _send_on(
        self, user: str, remote: dict[str, list[str]], parked: list[str], frame: bytes,
        ts: int, delivered: int,
    ) -> int:
        """One envelope per remote worker, one kept frame per parked device; returns
        ``delivered`` (the local count) plus the devices these reached.  Raises the
        backplane's error when nothing at all was delivered."""
        counts, sends = self._envelopes(user, remote, frame, ts)
        if not parked and len(sends) == 1:  # the common case: one envelope, nothing kept
            try:
                taken = await sends[0]
            except Exception:
                if delivered == 0:
                    raise
                return delivered
            return delivered + counts[0] if taken else delivered
        backplane = self.hub.backplane
        keeps = [backplane.keep(user, d, frame) for d in parked]
        results: list[Any] = await asyncio.gather(*sends, *keeps, return_exceptions=True)
        n_sends = len(sends)
        counts += [1] * len(parked)
        failed: BaseException | None = None
        resumed: list[str] = []
        for i, (n, res) in enumerate(zip(counts, results, strict=True)):
            if isinstance(res, BaseException):
                failed = res
            elif res:
                delivered += n
            elif i >= n_sends:
                resumed.append(parked[i - n_sends])
        if resumed:  # they reconnected between our lookup and the keep: route them live
            located = (await self.hub.presence.locate([user])).get(user, {})
            live = {d: located[d] for d in resumed if d in located and located[d].node != PARKED}
            if live:
                delivered += await self._route(user, live, frame, ts)
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

    # ------------------------------------------------------------------ rooms (§4)

    async def _subscribe(self, session: Session, msg: Subscribe) -> None:
        room = msg.room
        if not session.identity.may_join(room):
            raise ProtocolError(Code.FORBIDDEN_ROOM, "the token does not allow this room", msg.id)
        if room not in session.rooms and len(session.rooms) >= self.max_rooms:
            raise ProtocolError(
                Code.TOO_MANY_ROOMS, f"at most {self.max_rooms} rooms per connection", msg.id
            )
        others = await self.hub.join(session, room, self.max_room_members)
        if others is None:
            raise ProtocolError(
                Code.ROOM_FULL, f"the room has {self.max_room_members} members", msg.id
            )
        members = [{"user_id": u, "device_id": d} for (u, d) in sorted(others)]
        session.push(with_id({"type": "subscribed", "room": room, "members": members}, msg.id))

    async def _unsubscribe(self, session: Session, msg: Unsubscribe) -> None:
        if msg.room not in session.rooms:
            raise ProtocolError(Code.NOT_SUBSCRIBED, "not subscribed to this room", msg.id)
        await self.hub.leave(session, msg.room)
        session.push(with_id({"type": "unsubscribed", "room": msg.room}, msg.id))

    async def _publish(self, session: Session, msg: Publish) -> None:
        if msg.room not in session.rooms:
            raise ProtocolError(Code.NOT_SUBSCRIBED, "not subscribed to this room", msg.id)
        members: dict[tuple[str, str], Location] = await self.hub.presence.members(msg.room)
        members.pop(session.member, None)
        body: dict[str, Any] = {
            "type": "publish",
            "room": msg.room,
            "from": session.user_id,
            "from_device": session.device_id,
            "payload": msg.payload,
            "ts": self._clock_ms(),
        }
        if msg.id is not None:
            body["id"] = msg.id
        n = await self.hub.send_members(msg.room, members, encode(body))
        if msg.id is not None:
            session.push(encode({"type": "ack", "id": msg.id, "devices": n}))

    # ------------------------------------------------------------------ watch (§5)

    async def _watch(self, session: Session, msg: Watch) -> None:
        users = list(dict.fromkeys(msg.users))
        if len(set(session.watching) | set(users)) > MAX_WATCH_USERS:
            raise ProtocolError(
                Code.INVALID_MESSAGE, f"at most {MAX_WATCH_USERS} users watched per connection",
                msg.id,
            )
        located = await self.hub.watch(session, users)
        body = {
            u: {"online": bool(located.get(u)), "devices": sorted(located.get(u, {}))}
            for u in users
        }
        session.push(with_id({"type": "presence", "users": body}, msg.id))

    async def _unwatch(self, session: Session, msg: Unwatch) -> None:
        users = list(dict.fromkeys(msg.users))
        await self.hub.unwatch(session, users)
        session.push(with_id({"type": "unwatched", "users": users}, msg.id))

    # ------------------------------------------------------------------ refresh (§6)

    def _refresh(self, session: Session, msg: Refresh) -> None:
        if self._verify is None:
            raise ProtocolError(Code.INVALID_TOKEN, "token refresh is not available", msg.id)
        try:
            identity = self._verify(msg.token)
        except Exception:
            raise ProtocolError(
                Code.INVALID_TOKEN, "the new token was refused; the old expiry stands", msg.id
            ) from None
        if (identity.user_id, identity.device_id) != session.member:
            raise ProtocolError(
                Code.IDENTITY_MISMATCH, "the new token is for another user or device", msg.id
            )
        session.identity = identity
        session.expiry_notified = False
        self.hub.schedule_expiry(session)
        body: dict[str, Any] = {"type": "refreshed", "expires_at": identity.expires_at}
        if self._extras is not None:
            body.update(self._extras(identity))
        session.push(with_id(body, msg.id))

    def _error(self, session: Session, err: ProtocolError) -> None:
        self.stats.error(str(err.code))
        session.push(encode_error(err))


# A pipelined message whose envelopes are queued: (message, devices reached here, devices
# per envelope, the envelopes' outcomes)
_InFlight = tuple[DirectFields, int, list[int], list[Awaitable[bool]]]


def _abandon(pending: Awaitable[Any]) -> None:
    """An outcome nobody will read (a lookup for a message that was then refused, what a
    batch left when its connection closed): a coroutine is closed, a future's failure is
    retrieved so that it is not logged as never retrieved.  A running task goes on."""
    if isinstance(pending, asyncio.Future):
        pending.add_done_callback(_retrieve)
    elif inspect.iscoroutine(pending):
        pending.close()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
