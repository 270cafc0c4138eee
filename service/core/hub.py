"""The sessions of this worker — by user and device, by room, by watched user — and
everything that joins or leaves them.

``Hub`` is the one object a worker's edge talks to for the connection lifecycle:
``connect`` registers a session cluster-wide (or refuses it), ``disconnect`` releases it and
everything it held, ``on_envelope`` takes what other workers sent here.  ``start``/``close``
run the heartbeat (liveness, re-assertion, the janitor that reports members of dead workers)
and the token-expiry clock; ``close`` is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from ..errors import Close
from ..protocol import encode, now_ms
from .contracts import (
    PARKED,
    Backplane,
    Envelope,
    Location,
    Member,
    NullStats,
    Presence,
    Stats,
)
from .session import Session

log = logging.getLogger("signaling.hub")

CLOSE_KEEP_S = 2.0  # at close, the longest wait for held frames to be kept (``close``)


class TooManyDevices(Exception):
    """The user already holds MAX_DEVICES_PER_USER live devices."""


class Hub:
    def __init__(
        self,
        node_id: str,
        presence: Presence,
        backplane: Backplane,
        *,
        max_devices_per_user: int = 10,
        heartbeat_interval: float = 5.0,
        token_expiring_notice: int = 60,
        resume_window: float = 30.0,
        resume_max_messages: int = 1000,
        takeover_probe: float = 2.0,
        stats: Stats | None = None,
        clock_ms: Callable[[], int] = now_ms,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.presence = presence
        self.backplane = backplane
        self.stats: Stats = stats or NullStats()
        self.max_devices_per_user = max_devices_per_user
        self.heartbeat_interval = heartbeat_interval
        self.token_expiring_notice = token_expiring_notice
        self.resume_window = resume_window
        self.resume_max_messages = resume_max_messages
        # seconds the worker of a replaced connection has to answer before it is taken
        # for dead (crashed, not yet known dead): then the new connection resumes instead
        self.takeover_probe = takeover_probe
        self._kick_waiters: dict[str, asyncio.Future[None]] = {}
        self._clock_ms = clock_ms
        self._clock_s = clock_s
        self.sessions: dict[str, dict[str, Session]] = {}
        self._count = 0  # sessions in ``sessions`` (kept, not summed: connect reads it)
        # sessions whose claim is out: the store may name this worker for the device before
        # ``connect`` has its answer, and what is routed here meanwhile must not be lost
        self._claiming: dict[tuple[str, str], Session] = {}
        # devices being parked here (§10), with the connection parked last and the frames
        # held for them: from the session's removal until this worker reads back, from
        # its own inbox, the ``parked`` marker it queued after the store parked the device.
        # What is routed here for the device meanwhile was routed before the park, so it
        # is kept ahead of whatever senders kept since (it used to be dropped, acked)
        self._parking: dict[Member, tuple[str, list[bytes]]] = {}
        self.rooms: dict[str, dict[Member, Session]] = {}
        self.watchers: dict[str, set[Session]] = {}
        # (when, seq, kind, session, exp): weak references, so that a closed connection is
        # freed at once rather than when its token would have expired
        self._deadlines: list[tuple[float, int, str, weakref.ref[Session], int]] = []
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresh_pending: dict[str, bool] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Mark this node alive and start its inbox; call once per worker before serving."""
        await self.beat()
        await self.backplane.start(self.node_id, self.on_envelope)
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._expiry_loop(), name="token-expiry"),
        ]

    async def close(self) -> None:
        """Stop the loops and the backplane; open sessions are the edge's to close."""
        if self._closed:
            return
        self._closed = True
        # frames held for devices being parked: kept now, their markers would come too late
        held, self._parking = self._parking, {}
        keeping = [self._keep_held(member, frames) for member, (_, frames) in held.items()
                   if frames]
        if keeping:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*keeping), CLOSE_KEEP_S)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.backplane.close()
        await self.presence.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def beat(self) -> None:
        """One heartbeat: liveness of this node and everything it holds, then the janitor:
        members of dead workers in our rooms are reported ``left``, devices of dead workers
        of users we watch are reported ``presence_changed``."""
        await self.presence.heartbeat(
            self.node_id,
            ((s.user_id, s.device_id, s.location) for s in self.all_sessions()),
            (
                (room, member, s.location)
                for room, members in self.rooms.items()
                for member, s in members.items()
            ),
            list(self.watchers),
        )
        await self.backplane.heartbeat()
        changed, left = await self.presence.sweep(list(self.watchers), list(self.rooms))
        for user in changed:
            await self.notify_presence(user)
        for room, members in left.items():
            for member in members:
                await self._announce(room, "left", member)

    async def _heartbeat_loop(self) -> None:
        delay = self.heartbeat_interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.beat()
                delay = self.heartbeat_interval
            except Exception as exc:
                # Keep beating, faster: when the store comes back (a restart loses every
                # key) this worker's devices, rooms and watches must reappear at once.
                self.stats.backplane_error("heartbeat")
                log.warning("heartbeat failed: %s", type(exc).__name__)
                delay = min(0.5, self.heartbeat_interval)

    # ------------------------------------------------------------------ connections

    async def connect(
        self, session: Session, welcome: Callable[[bool, int], bytes] | None = None
    ) -> bool:
        """Claim the session's device cluster-wide and make it reachable; returns whether it
        resumed a parked connection (§10).

        ``welcome(resumed, missed)`` builds the first frame; it is queued first, then the
        kept messages, then whatever live traffic arrived meanwhile.  Raises TooManyDevices.
        A previous live connection of the same device is closed with 4009, wherever it is,
        and its rooms are left before this one can join any.
        """
        session.held = []
        self._claiming[session.member] = session
        try:
            claim = await self.presence.claim(
                session.user_id, session.device_id, session.location, self.max_devices_per_user
            )
        finally:
            if self._claiming.get(session.member) is session:
                del self._claiming[session.member]
        if not claim.ok:
            raise TooManyDevices(session.user_id)
        devices = self.sessions.setdefault(session.user_id, {})
        old = devices.get(session.device_id)
        devices[session.device_id] = session
        if old is None:
            self._count += 1
        if old is not None and old is not session:
            old.close(Close.REPLACED, "replaced by a newer connection")
        prev = claim.previous
        resumed = claim.resumed
        if prev is not None and not resumed and prev.conn != session.conn_id:
            if prev.node in (self.node_id, PARKED) or await self._answers_kick(session, prev):
                await self._evict(session.member, prev)
            else:
                resumed = True  # its worker died and nobody knew yet: §10 resume
        missed = await self._resume(session, prev) if resumed and prev is not None else []
        first = [welcome(resumed, len(missed))] if welcome is not None else []
        session.push_first(first + missed)
        session.release_held()
        self.schedule_expiry(session)
        if not resumed:
            await self.notify_presence(session.user_id)
        return resumed

    async def _answers_kick(self, session: Session, prev: Location) -> bool:
        """Tell the worker of the replaced connection to close it (4009) and wait for its
        answer; False when it does not answer within ``takeover_probe`` (it is dead)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._kick_waiters[session.conn_id] = fut
        reply_to = f"{self.node_id}|{session.conn_id}".encode()
        kick = Envelope("kick", session.user_id, (session.device_id,), reply_to, prev.conn)
        try:
            if not await self.backplane.send(prev.node, kick):
                return False  # its inbox is gone: long dead
            await asyncio.wait_for(fut, self.takeover_probe)
            return True
        except TimeoutError:
            return False
        except Exception:
            self.stats.backplane_error("kick")
            return True  # unknown: treat as a live takeover (the safe, documented default)
        finally:
            self._kick_waiters.pop(session.conn_id, None)

    async def _evict(self, member: Member, prev: Location) -> None:
        """Takeover: the replaced connection leaves its rooms now (others get ``left``
        before any ``joined`` of the new one)."""
        for room in await self.presence.rooms_of(member):
            if await self.presence.leave(room, member, prev):
                await self._announce(room, "left", member)

    async def _resume(self, session: Session, prev: Location) -> list[bytes]:
        """Take over a parked device: its kept messages (after whatever its dead worker's
        inbox still held for it) and its room memberships, without ``left``/``joined``."""
        missed: list[bytes] = []
        if prev.node not in (PARKED, self.node_id):
            missed += await self.backplane.salvage(prev.node, session.user_id, session.device_id)
        missed += await self.presence.take_kept(session.user_id, session.device_id)
        for room in await self.presence.adopt_rooms(session.member, prev, session.location):
            self.rooms.setdefault(room, {})[session.member] = session
            session.rooms[room] = None
        return missed

    async def disconnect(self, session: Session, park: bool = False) -> None:
        """Forget the session here and, unless a newer connection took the device, in the
        cluster: its rooms are left (others get ``left``), its watches dropped, watchers of
        its user told.  With ``park`` (a drop without a clean close, or a drain) the device
        instead stays online with its rooms for RESUME_WINDOW, its messages kept (§10).
        Safe to call for a session that never connected, and twice."""
        devices = self.sessions.get(session.user_id)
        park = park and self.resume_window > 0
        hold = False
        if devices is not None and devices.get(session.device_id) is session:
            del devices[session.device_id]
            self._count -= 1
            if not devices:
                del self.sessions[session.user_id]
            if park:
                self._hold_for(session)
                hold = True
        try:
            await self.unwatch(session, list(session.watching))
            parked = park and await self.presence.park(
                session.user_id, session.device_id, session.location, self.resume_window
            )
        except BaseException:
            if hold:
                self._settle_held(session.member, session.conn_id)
            raise
        if hold:
            if parked:
                self._spawn(self._mark_parked(session))
            else:
                self._settle_held(session.member, session.conn_id)
        if parked:
            for room in list(session.rooms):
                self._forget_local(session, room)
            return
        if session.close_code == Close.REPLACED and not await self.presence.release(
            session.user_id, session.device_id, session.location
        ):
            # taken over: the newer connection leaves these rooms for it (``_evict``) before
            # it joins any; a ``left`` sent from here could reach a peer after its ``joined``
            for room in list(session.rooms):
                self._forget_local(session, room)
        else:
            for room in list(session.rooms):
                await self.leave(session, room)
            await self.presence.release(session.user_id, session.device_id, session.location)
        await self.notify_presence(session.user_id)

    def _hold_for(self, session: Session) -> None:
        """From now on, frames routed here for the session's device are held (``deliver``)
        until ``_settle_held``; an earlier parking of the device here hands its frames on."""
        entry = self._parking.get(session.member)
        self._parking[session.member] = (session.conn_id, entry[1] if entry else [])

    async def _mark_parked(self, session: Session) -> None:
        """Queue the ``parked`` marker to this worker's own inbox: it comes back after
        every frame routed here before the park (an inbox keeps the store's order)."""
        marker = Envelope("parked", session.user_id, (session.device_id,), conn=session.conn_id)
        try:
            if await self.backplane.send(self.node_id, marker):
                return
        except Exception:
            self.stats.backplane_error("keep")
        self._settle_held(session.member, session.conn_id)  # no marker will come: now

    def _settle_held(self, member: Member, conn: str) -> None:
        """Stop holding for ``member`` (unless a later parking of it, not ``conn``'s, took
        over the hold) and keep or route what was held."""
        entry = self._parking.get(member)
        if entry is None or entry[0] != conn:
            return
        del self._parking[member]
        if entry[1]:
            self._spawn(self._keep_held(member, entry[1]))

    async def _keep_held(self, member: Member, frames: list[bytes]) -> None:
        """Frames held while ``member`` was being parked: kept ahead of the frames kept
        since; when it is no longer parked (resumed already, or taken over), routed to
        where it is now.  Lost only when it is gone or Redis fails (counted)."""
        user, device = member
        try:
            if await self.backplane.keep_first(user, device, frames):
                return
            loc = (await self.presence.locate([user])).get(user, {}).get(device)
            if loc is None:
                return  # offline: what any message for it would find
            if loc.node == self.node_id:
                for frame in frames:
                    self.deliver(user, (device,), frame)
            elif loc.node == PARKED:  # parked again, by another worker
                await self.backplane.keep_first(user, device, frames)
            else:  # sent together (one tick: one round trip, in order), awaited together
                await asyncio.gather(*(
                    self.backplane.send(loc.node, Envelope("deliver", user, (device,), frame))
                    for frame in frames))
        except Exception:
            self.stats.backplane_error("keep")

    def local(self, user: str, device: str) -> Session | None:
        devices = self.sessions.get(user)
        return devices.get(device) if devices else None

    def all_sessions(self) -> Iterable[Session]:
        for devices in self.sessions.values():
            yield from devices.values()

    @property
    def connection_count(self) -> int:
        """Sessions of this worker (O(1): every connect reads it)."""
        return self._count

    # ------------------------------------------------------------------ token expiry

    def schedule_expiry(self, session: Session) -> None:
        """(Re)arm the ``token_expiring`` notice and the 4001 close for the session's
        current expiry; older entries are ignored when they come due."""
        exp = session.expires_at
        # one entry per connection at a time: the notice's entry arms the close when it
        # comes due (an entry and its numbers are ~150 bytes of every idle connection)
        heapq.heappush(
            self._deadlines,
            (exp - self.token_expiring_notice, next(self._seq), "notice",
             weakref.ref(session), exp),
        )
        if len(self._deadlines) > 4 * self.connection_count + 1024:
            self._deadlines = [d for d in self._deadlines if _current(d[3], d[4])]
            heapq.heapify(self._deadlines)

    def expire_due(self, now: float | None = None) -> None:
        """Act on every deadline that has come; the expiry loop calls this each second."""
        now = self._clock_s() if now is None else now
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, kind, ref, exp = heapq.heappop(self._deadlines)
            session = ref()
            if session is None or not _current(ref, exp):
                continue  # gone, closed, or refreshed since
            if kind == "expire":
                session.close(Close.TOKEN_EXPIRED, "token expired")
                continue
            if not session.expiry_notified:
                session.expiry_notified = True
                session.push(encode({"type": "token_expiring", "expires_at": exp}))
            heapq.heappush(self._deadlines, (exp, next(self._seq), "expire", ref, exp))

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.expire_due()

    # ------------------------------------------------------------------ direct delivery

    def deliver(self, user: str, devices: Iterable[str], frame: bytes) -> int:
        """Queue ``frame`` for the named local devices; returns how many took it."""
        local = self.sessions.get(user)
        if not local and not self._claiming and not self._parking:
            return 0
        n = 0
        for device in devices:
            s = local.get(device) if local else None
            if s is None:  # (one test on the common path: a session here)
                if self._claiming:
                    # claimed in the store, the answer not back here yet: it joins the live
                    # traffic that ``connect`` holds back until after the welcome
                    s = self._claiming.get((user, device))
                if s is None:
                    n += self._hold(user, device, frame)
                    continue
            if s.push(frame):
                n += 1
        return n

    def _hold(self, user: str, device: str, frame: bytes) -> int:
        """1 when the device is being parked here: ``frame`` is held, then kept
        (``_hold_for``); else 0."""
        entry = self._parking.get((user, device))
        if entry is None:
            return 0
        held = entry[1]
        held.append(frame)
        if len(held) > self.resume_max_messages:
            del held[0]  # as the kept list drops them: oldest first
        return 1

    async def send_members(self, room: str, targets: dict[Member, Location], frame: bytes) -> int:
        """Deliver ``frame`` to these room members: local ones directly, one envelope per
        other worker.  Returns the devices it was handed to."""
        local_room = self.rooms.get(room, {})
        remote: dict[str, list[str]] = {}
        n = 0
        for member, loc in targets.items():
            if loc.node == self.node_id:
                s = local_room.get(member)
                if s is not None and s.push(frame):
                    n += 1
            else:
                remote.setdefault(loc.node, []).append(f"{member[0]}/{member[1]}")
        for node, devices in remote.items():
            try:
                env = Envelope("members", room, tuple(devices), frame, ts=self._clock_ms())
                if await self.backplane.send(node, env):
                    n += len(devices)
            except Exception:
                self.stats.backplane_error("room")
        return n

    def on_envelope(self, env: Envelope) -> None:
        """Handle what another worker sent to this one (called by the backplane reader)."""
        if env.kind == "deliver":
            if self.deliver(env.user, env.devices, env.frame) and env.ts:
                self.stats.delivered(max(0.0, (self._clock_ms() - env.ts) / 1000.0))
        elif env.kind == "members":
            local_room = self.rooms.get(env.user, {})
            for target in env.devices:
                user, _, device = target.partition("/")
                s = local_room.get((user, device))
                if s is not None:
                    s.push(env.frame)
        elif env.kind == "kick":
            s = self.local(env.user, env.devices[0]) if env.devices else None
            if s is not None and s.conn_id == env.conn:
                s.close(Close.REPLACED, "replaced by a newer connection")
            node, _, conn = env.frame.decode().partition("|")
            if node:  # answer: this worker is alive, the old connection is closing
                self._spawn(self._reply(node, Envelope("kicked", env.user, env.devices, conn=conn)))
        elif env.kind == "kicked":
            fut = self._kick_waiters.get(env.conn)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif env.kind == "presence":
            self._spawn(self.refresh_watchers(env.user))
        elif env.kind == "parked" and env.devices:
            self._settle_held((env.user, env.devices[0]), env.conn)

    async def _reply(self, node: str, env: Envelope) -> None:
        if node == self.node_id:
            self.on_envelope(env)
            return
        try:
            await self.backplane.send(node, env)
        except Exception:
            self.stats.backplane_error("kick")

    # ------------------------------------------------------------------ rooms

    async def join(
        self, session: Session, room: str, max_members: int
    ) -> dict[Member, Location] | None:
        """Add the session to ``room`` cluster-wide; None when the room is full.  The other
        members get ``joined``; returns them."""
        others = await self.presence.join(room, session.member, session.location, max_members)
        if others is None:
            return None
        others.pop(session.member, None)
        self.rooms.setdefault(room, {})[session.member] = session
        session.rooms[room] = None
        frame = encode({"type": "joined", "room": room, "user_id": session.user_id,
                        "device_id": session.device_id})
        await self.send_members(room, others, frame)
        return others

    def _forget_local(self, session: Session, room: str) -> None:
        session.rooms.pop(room, None)
        local_room = self.rooms.get(room)
        if local_room is not None and local_room.get(session.member) is session:
            del local_room[session.member]
            if not local_room:
                del self.rooms[room]

    async def leave(self, session: Session, room: str) -> None:
        """Take the session out of ``room``; the others get ``left`` (unless a newer
        connection of the same device holds the membership now)."""
        self._forget_local(session, room)
        if await self.presence.leave(room, session.member, session.location):
            await self._announce(room, "left", session.member)

    async def _announce(self, room: str, kind: str, member: Member) -> None:
        members = await self.presence.members(room)
        members.pop(member, None)
        frame = encode({"type": kind, "room": room, "user_id": member[0],
                        "device_id": member[1]})
        await self.send_members(room, members, frame)

    # ------------------------------------------------------------------ presence watch

    async def watch(self, session: Session, users: list[str]) -> dict[str, dict[str, Location]]:
        """Start reporting changes of ``users`` to the session; returns their presence now
        (read after the watch is registered, so no change can fall in between)."""
        new_here = [u for u in users if u not in self.watchers]
        for u in users:
            self.watchers.setdefault(u, set()).add(session)
        if new_here:
            await self.presence.watch(self.node_id, new_here)
        located = await self.presence.locate(users)
        for u in users:
            session.watching[u] = tuple(sorted(located.get(u, {})))
        return located

    async def unwatch(self, session: Session, users: list[str]) -> None:
        gone: list[str] = []
        for u in users:
            session.watching.pop(u, None)
            sessions = self.watchers.get(u)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self.watchers[u]
                    gone.append(u)
        if gone:
            with contextlib.suppress(Exception):
                await self.presence.unwatch(self.node_id, gone)

    async def notify_presence(self, user: str) -> None:
        """Tell every worker watching ``user`` that its devices changed."""
        try:
            nodes = await self.presence.watchers(user)
        except Exception as exc:
            self._presence_failed(exc)
            return
        for node in nodes:
            if node == self.node_id:
                await self.refresh_watchers(user)
                continue
            try:
                await self.backplane.send(node, Envelope("presence", user, ()))
            except Exception as exc:
                self._presence_failed(exc)

    def _presence_failed(self, exc: Exception) -> None:
        # a watcher misses this change (the next one corrects it): worth a line in the log
        self.stats.backplane_error("presence")
        log.warning("presence notification failed: %s", type(exc).__name__)

    async def refresh_watchers(self, user: str) -> None:
        """Re-read ``user``'s devices and send ``presence_changed`` to local watchers whose
        last report differs.  Concurrent calls for one user collapse into one re-read."""
        if user in self._refresh_pending:
            self._refresh_pending[user] = True  # re-read once more when the current one ends
            return
        self._refresh_pending[user] = False
        try:
            while True:
                if not self.watchers.get(user):
                    return
                located = await self.presence.locate([user])
                devices = tuple(sorted(located.get(user, {})))
                frame = encode({"type": "presence_changed", "user_id": user,
                                "online": bool(devices), "devices": list(devices)})
                for s in list(self.watchers.get(user, ())):
                    if user in s.watching and s.watching[user] != devices:
                        s.watching[user] = devices
                        s.push(frame)
                if not self._refresh_pending.get(user):
                    return
                self._refresh_pending[user] = False
        except Exception as exc:
            self._presence_failed(exc)
        finally:
            self._refresh_pending.pop(user, None)


def _current(ref: weakref.ref[Session], exp: int) -> bool:
    session = ref()
    return session is not None and not session.closed and session.expires_at == exp


def new_node_id() -> str:
    """A fresh routing-node id for one worker process (never reused after a restart)."""
    return secrets.token_hex(6)
