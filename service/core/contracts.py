"""The seams between the core and its backends.  Each has an in-process twin in
``memory.py`` and a Redis implementation in ``service/backends/``; ``close()`` on every one
of them is safe to call twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeAlias

if TYPE_CHECKING:
    from .ratelimit import Admission

Member = tuple[str, str]
"""(user_id, device_id) of a room member."""


PARKED = "~"
"""The ``node`` of a Location whose connection is gone but still inside its resume window
(§10): messages for it are kept, not sent to a worker."""


class Location(NamedTuple):
    """Where one device's connection lives: the worker (node) and the connection id;
    ``node == PARKED`` while the device waits to resume."""

    node: str
    conn: str

    def encode(self) -> str:
        return f"{self.node}|{self.conn}"

    @classmethod
    def decode(cls, raw: str) -> Location:
        """``node|conn`` or the parked form ``~|conn|deadline``."""
        node, _, rest = raw.partition("|")
        return cls(node, rest.partition("|")[0])


@dataclass(frozen=True, slots=True)
class Claim:
    """Result of registering a device: ``ok`` False when the user is at its device limit;
    ``previous`` is the live connection of the same device that this one replaces."""

    ok: bool
    previous: Location | None = None
    # the previous connection ended without a clean close and is inside its resume window
    resumed: bool = False


class Envelope(NamedTuple):
    """What travels between workers.  ``kind`` is

    - ``deliver``: ``frame`` to ``devices`` of ``user``;
    - ``members``: ``frame`` to room members, ``devices`` holding ``"user/device"`` entries;
    - ``kick``: close connection ``conn`` of ``user``/``devices[0]`` with 4009, and answer
      ``kicked`` to the ``node|conn`` in ``frame``;
    - ``kicked``: the answer to a kick, for the new connection ``conn``;
    - ``presence``: the online devices of ``user`` changed; watchers here re-read them;
    - ``parked``: sent by a worker to itself once the store has parked ``user``/
      ``devices[0]`` (connection ``conn``): nothing routed here for that device before
      the park is still behind it in the inbox.

    ``ts`` is the sender's acceptance time in unix ms (for the delivery-latency metric).
    Immutable: a named tuple, because two are built per cross-worker message (a frozen
    dataclass took 0.7 µs to build, this 0.25)."""

    kind: str
    user: str
    devices: tuple[str, ...]
    frame: bytes = b""
    conn: str = ""
    ts: int = 0


_tuple_new = tuple.__new__


def delivery(user: str, devices: tuple[str, ...], frame: bytes, ts: int) -> Envelope:
    """``Envelope("deliver", user, devices, frame, ts=ts)`` without the named tuple's
    argument-parsing constructor (0.32 -> 0.13 µs; two per cross-worker message)."""
    return _tuple_new(Envelope, ("deliver", user, devices, frame, "", ts))


def envelope_of(
    kind: str, user: str, devices: tuple[str, ...], frame: bytes, conn: str, ts: int
) -> Envelope:
    """An ``Envelope`` from all of its fields, as ``delivery`` builds one."""
    return _tuple_new(Envelope, (kind, user, devices, frame, conn, ts))


EnvelopeSink = Callable[[Envelope], None]

# What a ``route`` comes to: the devices it was queued for, the recipient's live devices
# (nothing queued), or the failure
RouteOutcome: TypeAlias = "int | dict[str, Location] | BaseException"

# a lookup's answer: each user's live devices and where they are
Located = dict[str, dict[str, Location]]


class Presence(Protocol):
    """Which devices are online and on which worker; bounded by TTLs and liveness."""

    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        """Register ``device`` at ``loc`` unless the user already has ``max_devices`` other
        live devices; atomic across the cluster."""

    async def release(self, user: str, device: str, loc: Location) -> bool:
        """Remove the registration if it still names ``loc`` (a newer one is left alone);
        False when it did not (taken over, parked or gone)."""

    def locate(self, users: Sequence[str]) -> Awaitable[Located]:
        """Live devices of each user (users with none map to ``{}``).  A backend that
        batches lookups registers this one at the call (so a caller may start it before it
        knows it will need the answer); one that does not may look up at the await."""

    def locate_now(self, user: str) -> dict[str, Location] | None:
        """The live devices of one ``user`` (``locate``'s answer for it) right now, when
        this backend holds them in this process (the memory twin); None when it does not
        (the caller must then use ``locate``).  The answer is read only (it may be the
        backend's own table) and good for this moment only."""

    async def park(self, user: str, device: str, loc: Location, window: float) -> bool:
        """The connection at ``loc`` dropped without a clean close: keep the device online,
        its rooms and its messages for ``window`` seconds.  False if a newer connection
        already holds the device."""

    async def take_kept(self, user: str, device: str) -> list[bytes]:
        """The frames kept for a parked device, oldest first; they are removed."""

    async def rooms_of(self, member: Member) -> list[str]:
        """Rooms the device's current membership is in (for takeover and resume)."""

    async def adopt_rooms(self, member: Member, old: Location, new: Location) -> list[str]:
        """Resume: move the memberships held by ``old`` (or its parked form) to ``new``;
        returns those rooms."""

    async def heartbeat(
        self,
        node: str,
        devices: Iterable[tuple[str, str, Location]],
        rooms: Iterable[tuple[str, Member, Location]] = (),
        watched: Iterable[str] = (),
    ) -> None:
        """Mark ``node`` alive for PRESENCE_TTL and re-assert what it holds: its devices
        (user, device, loc), room memberships (room, member, loc) and watched users.  Only
        fills in what is missing (a Redis restart), never overwrites a newer claim."""

    async def sweep(
        self, users: Sequence[str], rooms: Sequence[str]
    ) -> tuple[list[str], dict[str, list[Member]]]:
        """Remove registrations of dead workers from these users and rooms.  Returns the
        users whose devices changed and the members removed per room — each removal is
        returned to exactly one caller in the cluster, which reports it."""

    async def join(
        self, room: str, member: Member, loc: Location, max_members: int
    ) -> dict[Member, Location] | None:
        """Add ``member`` to ``room`` (atomic); None when the room is full.  Returns the
        other live members."""

    async def leave(self, room: str, member: Member, loc: Location) -> bool:
        """Remove ``member`` if it is still ``loc``; True when it was removed."""

    async def members(self, room: str) -> dict[Member, Location]:
        """The live members of ``room``."""

    async def watch(self, node: str, users: Sequence[str]) -> None:
        """``node`` wants presence changes of ``users``."""

    async def unwatch(self, node: str, users: Sequence[str]) -> None: ...

    async def watchers(self, user: str) -> set[str]:
        """Nodes that watch ``user`` (may include dead ones: sends to them just fail)."""

    async def ping(self) -> bool:
        """True when the store answers now."""

    async def close(self) -> None: ...


class Backplane(Protocol):
    """Delivery to other workers.  ``send`` resolves once the envelope is durably queued for
    ``node`` (True) or known undeliverable because ``node`` is gone (False); it raises when
    the backplane failed and the outcome is unknown."""

    async def start(self, node: str, sink: EnvelopeSink) -> None: ...

    def send(self, node: str, envelope: Envelope) -> Awaitable[bool]: ...

    def keep(self, user: str, device: str, frame: bytes) -> Awaitable[bool]:
        """Keep ``frame`` for a parked device (bounded, expiring), in order with ``send``;
        False when the device is no longer parked (route it again)."""
        ...

    def keep_first(self, user: str, device: str, frames: list[bytes]) -> Awaitable[bool]:
        """Keep ``frames`` (oldest first) for a parked device ahead of every frame kept for
        it already (within the same bound, oldest dropped first): for frames that were
        routed to its worker before the store said it was parked, and so precede whatever
        senders kept since.  False when the device is no longer parked (route them again)."""
        ...

    def route(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int,
    ) -> asyncio.Future[int | dict[str, Location]]:
        """A direct message's lookup and its envelopes in one step (one round trip where
        ``locate`` and then ``send`` take two): the live devices of ``user`` that get
        ``frame`` are ``only`` (when given) or all but ``skip``.  When there are none, or
        every one is on another live worker, ``frame`` is queued to their inboxes and
        this resolves to how many devices it was queued for (0: none, or their workers
        are gone).  Otherwise (a device on this worker or parked) nothing is queued and
        this resolves to ``user``'s live devices, as ``locate`` would: the caller goes on
        from there.  Once a call of ``sender`` (the caller's connection) resolved to
        devices, its later calls do too until ``resume(sender)``, so that nothing it sends
        overtakes what it must still send itself.  Raises when the backplane failed (the
        outcome is unknown)."""
        ...

    def route_then(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int, then: Callable[[RouteOutcome], None],
    ) -> None:
        """``route`` with its outcome handed to ``then`` (the future's result, or the
        exception it would raise): for the hot path, no future and no loop pass per
        message.  ``then`` is called after this returns, never from within it, in the
        order of the calls; it must not raise."""
        ...

    def resume(self, sender: int) -> None:
        """``sender`` has nothing in flight any more: its ``route`` calls may queue again.
        The caller must call this once every message of the sender has been finished."""
        ...

    async def salvage(self, node: str, user: str, device: str) -> list[bytes]:
        """Frames for ``user``/``device`` still in the inbox of dead worker ``node``."""
        ...

    async def heartbeat(self) -> None: ...

    async def close(self) -> None: ...


class RateLimiter(Protocol):
    """Per-user message budget shared by every device and worker."""

    @property
    def limit(self) -> int: ...

    @property
    def period_s(self) -> int: ...

    @property
    def synchronous(self) -> bool:
        """True when ``admit`` never answers with a future (an in-process count)."""

    def admit(self, user: str) -> Admission:
        """Count one message; None when allowed, else seconds until one would be — or a
        future of that (settled within the loop tick's batch)."""

    def leased(self, user: str) -> bool:
        """Count one message against a slot this worker already holds for ``user`` (a
        lease): True when it did (the message is admitted), False when none is at hand
        (nothing counted: the caller asks ``admit``)."""

    async def hit(self, user: str) -> float | None:
        """``admit``, awaited."""

    async def close(self) -> None: ...


class Stats(Protocol):
    """Counters the core reports; ``service.metrics`` implements them for Prometheus."""

    def received(self, kind: str) -> None: ...

    def error(self, code: str) -> None: ...

    def rate_limited(self) -> None: ...

    def delivered(self, latency_s: float) -> None: ...

    def backplane_error(self, op: str) -> None: ...


class NullStats:
    """Stats that count nothing (unit tests, tools)."""

    def received(self, kind: str) -> None:
        pass

    def error(self, code: str) -> None:
        pass

    def rate_limited(self) -> None:
        pass

    def delivered(self, latency_s: float) -> None:
        pass

    def backplane_error(self, op: str) -> None:
        pass
