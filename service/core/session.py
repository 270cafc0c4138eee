"""One connection: who it is and its bounded outgoing queue.

The edge owns the socket: it gives the session a ``closer`` (called at most once with a
close code and reason) and an ``on_ready`` hook, called when the outbox stops being empty
and when the session closes; the edge then drains ``outbox`` (once per loop tick, however
many frames arrived).  Nothing in the core ever awaits a client: a full queue closes the
connection (1008 slow consumer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import Close
from .contracts import Location

if TYPE_CHECKING:
    from ..auth import Identity

Closer = Callable[[int, str], None]


class Session:
    # Slots lie in the object in this order: what every message reads or writes first,
    # near the object's header, the rest after.  It costs nothing; counted, the gain was
    # within what any change of allocation order moves (optimisations.md, row 61).
    __slots__ = (
        "closed",
        "held",
        "outbox",
        "outbox_bytes",
        "_max_messages",
        "max_bytes",
        "on_ready",
        "edge",
        "user_id",
        "device_id",
        "strikes",
        "inflight",
        "pending",
        "chain",
        "identity",
        "location",
        "close_code",
        "close_reason",
        "rooms",
        "watching",
        "expiry_notified",
        "_closer",
        "__weakref__",
    )

    def __init__(
        self,
        identity: Identity,
        location: Location,
        closer: Closer,
        max_messages: int = 1024,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.identity = identity
        self.user_id = identity.user_id
        self.device_id = identity.device_id
        self.location = location
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        # the edge's flush hook (see the module docstring); None: frames just queue up
        self.on_ready: Callable[[Session], None] | None = None
        self.edge: Any = None  # the edge's handle for the socket (opaque to the core)
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""
        # consecutive rate-limited messages (sustained abuse closes with 1008)
        self.strikes = 0
        # rooms joined, and watched users with the device list last reported for each
        # rooms as dict keys, an ordered set (an empty dict is a third of an empty set: this
        # is per idle connection)
        self.rooms: dict[str, None] = {}
        self.watching: dict[str, tuple[str, ...]] = {}
        self.expiry_notified = False
        # while connecting, live traffic waits here so that welcome and kept messages go first
        self.held: list[bytes] | None = None
        # direct messages started from the read callback (``Router.handle_now``) and not
        # finished: how many, a future set when none is left (made by ``Router.started``
        # when the edge must wait before it hands over the next frames), and the task
        # finishing the latest one that was not queued in one step (the next such waits
        # for it: replies keep their order)
        self.pending: asyncio.Future[None] | None = None
        self.inflight = 0
        self.chain: asyncio.Future[None] | None = None
        self._closer = closer
        self._max_messages = max_messages
        # the outbox bound in bytes (the edge applies it to its socket buffer too); read
        # only, a plain attribute: the edge reads it on every write
        self.max_bytes = max_bytes

    @property
    def conn_id(self) -> str:
        return self.location.conn

    @property
    def member(self) -> tuple[str, str]:
        return (self.user_id, self.device_id)

    @property
    def expires_at(self) -> int:
        return self.identity.expires_at

    def push(self, frame: bytes) -> bool:
        """Queue one frame; False (and the connection closing) when the queue is full."""
        if self.closed:
            return False
        if self.held is not None:
            self.held.append(frame)
            return True
        if len(self.outbox) >= self._max_messages or (
            self.outbox_bytes + len(frame) > self.max_bytes
        ):
            self.close(Close.POLICY, "slow consumer")
            return False
        if not self.outbox and self.on_ready is not None:
            self.on_ready(self)
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        return True

    def release_held(self) -> None:
        """End the connecting phase: what arrived meanwhile follows what was pushed first."""
        held, self.held = self.held, None
        for frame in held or ():
            self.push(frame)

    def push_first(self, frames: list[bytes]) -> None:
        """Queue frames ahead of the held live traffic (welcome, kept messages)."""
        held, self.held = self.held, None
        for frame in frames:
            self.push(frame)
        self.held = held

    def take(self) -> list[bytes]:
        """Everything queued, oldest first (the edge's flush)."""
        frames, self.outbox = self.outbox, []
        self.outbox_bytes = 0
        return frames

    def close(self, code: int, reason: str = "") -> None:
        """Ask the edge to close the socket; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self.close_reason = reason
        self._closer(code, reason)
        if self.on_ready is not None:
            self.on_ready(self)
