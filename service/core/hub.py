"""The sessions of this worker, by user and device, and everything that joins or leaves it.

``Hub`` is the one object a worker's edge talks to for the connection lifecycle:
``connect`` registers a session cluster-wide (or refuses it), ``disconnect`` releases it,
``on_envelope`` takes what other workers sent here.  ``start``/``close`` run the heartbeat;
``close`` is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from ..errors import Close
from ..protocol import now_ms
from .contracts import Backplane, Envelope, NullStats, Presence, Stats
from .session import Session

log = logging.getLogger("signaling.hub")


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
        outbox_max_messages: int = 1024,
        outbox_max_bytes: int = 4 * 1024 * 1024,
        stats: Stats | None = None,
        clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.node_id = node_id
        self.presence = presence
        self.backplane = backplane
        self.stats: Stats = stats or NullStats()
        self.max_devices_per_user = max_devices_per_user
        self.heartbeat_interval = heartbeat_interval
        self._outbox = (outbox_max_messages, outbox_max_bytes)
        self._clock_ms = clock_ms
        self.sessions: dict[str, dict[str, Session]] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Mark this node alive and start its inbox; call once per worker before serving."""
        await self.beat()
        await self.backplane.start(self.node_id, self.on_envelope)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")

    async def close(self) -> None:
        """Stop the heartbeat and the backplane; open sessions are the edge's to close."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        await self.backplane.close()
        await self.presence.close()

    async def beat(self) -> None:
        """One heartbeat: liveness of this node, its inbox and every local device."""
        await self.presence.heartbeat(
            self.node_id,
            (
                (s.user_id, s.device_id, s.location)
                for devices in self.sessions.values()
                for s in devices.values()
            ),
        )
        await self.backplane.heartbeat()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.beat()
            except Exception as exc:  # keep beating: the store may come back
                self.stats.backplane_error("heartbeat")
                log.warning("heartbeat failed: %s", type(exc).__name__)

    # ------------------------------------------------------------------ connections

    async def connect(self, session: Session) -> None:
        """Claim the session's device cluster-wide and make it reachable.

        Raises TooManyDevices; the caller must have queued ``welcome`` on the session first
        so that it is the first frame the client sees.  A previous live connection of the
        same device is closed with 4009, wherever it is.
        """
        claim = await self.presence.claim(
            session.user_id, session.device_id, session.location, self.max_devices_per_user
        )
        if not claim.ok:
            raise TooManyDevices(session.user_id)
        devices = self.sessions.setdefault(session.user_id, {})
        old = devices.get(session.device_id)
        devices[session.device_id] = session
        if old is not None and old is not session:
            old.close(Close.REPLACED, "replaced by a newer connection")
        prev = claim.previous
        if prev is not None and prev.node != self.node_id:
            try:
                kick = Envelope("kick", session.user_id, (session.device_id,), conn=prev.conn)
                await self.backplane.send(prev.node, kick)
            except Exception:  # the old worker is unreachable; its presence expires anyway
                self.stats.backplane_error("kick")

    async def disconnect(self, session: Session) -> None:
        """Forget the session here and, unless a newer connection took the device, in the
        cluster.  Safe to call for a session that never connected."""
        devices = self.sessions.get(session.user_id)
        if devices is not None and devices.get(session.device_id) is session:
            del devices[session.device_id]
            if not devices:
                del self.sessions[session.user_id]
        await self.presence.release(session.user_id, session.device_id, session.location)

    def local(self, user: str, device: str) -> Session | None:
        devices = self.sessions.get(user)
        return devices.get(device) if devices else None

    @property
    def connection_count(self) -> int:
        return sum(len(d) for d in self.sessions.values())

    # ------------------------------------------------------------------ delivery

    def deliver(self, user: str, devices: tuple[str, ...] | list[str], frame: bytes) -> int:
        """Queue ``frame`` for the named local devices; returns how many took it."""
        local = self.sessions.get(user)
        if not local:
            return 0
        n = 0
        for device in devices:
            s = local.get(device)
            if s is not None and s.push(frame):
                n += 1
        return n

    def on_envelope(self, env: Envelope) -> None:
        """Handle what another worker sent to this one (called by the backplane reader)."""
        if env.kind == "deliver":
            if self.deliver(env.user, env.devices, env.frame) and env.ts:
                self.stats.delivered(max(0.0, (self._clock_ms() - env.ts) / 1000.0))
        elif env.kind == "kick":
            s = self.local(env.user, env.devices[0]) if env.devices else None
            if s is not None and s.conn_id == env.conn:
                s.close(Close.REPLACED, "replaced by a newer connection")


def new_node_id() -> str:
    """A fresh routing-node id for one worker process (never reused after a restart)."""
    return secrets.token_hex(6)
