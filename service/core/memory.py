"""In-process twins of the contracts: one worker alone (no Redis), and fast unit tests of
several simulated workers sharing one :class:`MemoryCluster`."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .contracts import (
    PARKED,
    Claim,
    Envelope,
    EnvelopeSink,
    Location,
    Member,
    RouteOutcome,
    delivery,
)
from .ratelimit import WindowLimiter

K = TypeVar("K", str, Member)
LIVE, RESUMABLE, DEAD = 2, 1, 0
_NO_DEVICES: dict[str, Location] = {}  # read only: the devices of a user nobody holds


@dataclass
class MemoryCluster:
    """State shared by every simulated worker: devices, rooms, watches, node liveness,
    parked devices and their kept messages, inboxes."""

    ttl: float = 15.0
    clock: Callable[[], float] = time.monotonic
    resume_window: float = 30.0
    resume_max_messages: int = 1000
    devices: dict[str, dict[str, Location]] = field(default_factory=dict)
    rooms: dict[str, dict[Member, Location]] = field(default_factory=dict)
    device_rooms: dict[Member, set[str]] = field(default_factory=dict)
    watches: dict[str, set[str]] = field(default_factory=dict)
    alive_until: dict[str, float] = field(default_factory=dict)
    parked_until: dict[str, float] = field(default_factory=dict)
    kept: dict[Member, deque[bytes]] = field(default_factory=dict)
    sinks: dict[str, EnvelopeSink] = field(default_factory=dict)

    def alive(self, node: str) -> bool:
        return self.alive_until.get(node, -1.0) > self.clock()

    def state(self, loc: Location, now: float | None = None) -> int:
        if now is None:
            now = self.clock()
        if loc.node == PARKED:
            return RESUMABLE if self.parked_until.get(loc.conn, -1.0) > now else DEAD
        until = self.alive_until.get(loc.node)  # one read of the clock and the table
        if until is None:
            return DEAD
        if until > now:
            return LIVE
        return RESUMABLE if until + self.resume_window > now else DEAD

    def live(self, table: dict[K, Location]) -> dict[K, Location]:
        """Entries that count as online; resumable ones shown as parked."""
        out: dict[K, Location] = {}
        now = self.clock()
        alive = self.alive_until
        for k, loc in table.items():
            until = alive.get(loc.node)  # ``state``'s LIVE case inline: every message asks
            if until is not None and until > now:
                out[k] = loc
                continue
            st = self.state(loc, now)
            if st == LIVE:
                out[k] = loc
            elif st == RESUMABLE:
                out[k] = Location(PARKED, loc.conn)
        return out


def _drop_dead(cluster: MemoryCluster, table: dict[K, Location]) -> list[K]:
    dead = [k for k, loc in table.items() if cluster.state(loc) == DEAD]
    for k in dead:
        del table[k]
    return dead


class MemoryPresence:
    def __init__(self, cluster: MemoryCluster | None = None) -> None:
        self.cluster = cluster or MemoryCluster()

    # devices
    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        c = self.cluster
        devs = c.devices.setdefault(user, {})
        _drop_dead(c, devs)
        prev = devs.get(device)
        if len(devs) - (prev is not None) >= max_devices:
            return Claim(False, prev)
        resumed = prev is not None and c.state(prev) == RESUMABLE
        devs[device] = loc
        return Claim(True, prev, resumed)

    async def release(self, user: str, device: str, loc: Location) -> bool:
        devs = self.cluster.devices.get(user)
        if devs is None or devs.get(device) != loc:
            return False
        del devs[device]
        if not devs:
            del self.cluster.devices[user]
        self.cluster.device_rooms.pop((user, device), None)
        self.cluster.kept.pop((user, device), None)
        return True

    async def park(self, user: str, device: str, loc: Location, window: float) -> bool:
        c = self.cluster
        devs = c.devices.get(user, {})
        if devs.get(device) != loc:
            return False
        parked = Location(PARKED, loc.conn)
        devs[device] = parked
        c.parked_until[loc.conn] = c.clock() + window
        for room in c.device_rooms.get((user, device), ()):
            if c.rooms.get(room, {}).get((user, device)) == loc:
                c.rooms[room][(user, device)] = parked
        return True

    async def take_kept(self, user: str, device: str) -> list[bytes]:
        return list(self.cluster.kept.pop((user, device), ()))

    async def rooms_of(self, member: Member) -> list[str]:
        return sorted(self.cluster.device_rooms.get(member, ()))

    async def adopt_rooms(self, member: Member, old: Location, new: Location) -> list[str]:
        c = self.cluster
        adopted = []
        for room in sorted(c.device_rooms.get(member, ())):
            table = c.rooms.get(room, {})
            if table.get(member) in (old, Location(PARKED, old.conn)):
                table[member] = new
                adopted.append(room)
        return adopted

    def locate_now(self, user: str) -> dict[str, Location]:
        """Read only: when every device is live this is the cluster's own table (no copy
        per message); callers must not change it."""
        c = self.cluster
        table = c.devices.get(user, _NO_DEVICES)
        alive, now = c.alive_until, c.clock()
        for loc in table.values():
            until = alive.get(loc.node)
            if until is None or until <= now:
                return c.live(table)  # some device parked, resumable or dead: filtered
        return table

    async def locate(self, users: Sequence[str]) -> dict[str, dict[str, Location]]:
        c = self.cluster
        return {u: c.live(c.devices.get(u, _NO_DEVICES)) for u in users}

    async def heartbeat(
        self,
        node: str,
        devices: Iterable[tuple[str, str, Location]],
        rooms: Iterable[tuple[str, Member, Location]] = (),
        watched: Iterable[str] = (),
    ) -> None:
        c = self.cluster
        c.alive_until[node] = c.clock() + c.ttl
        for member in list(c.kept):  # kept frames of devices whose window ran out
            loc = c.devices.get(member[0], {}).get(member[1])
            if loc is None or c.state(loc) == DEAD:
                del c.kept[member]
        for user, device, loc in devices:
            c.devices.setdefault(user, {}).setdefault(device, loc)
        for room, member, loc in rooms:
            c.rooms.setdefault(room, {}).setdefault(member, loc)
            c.device_rooms.setdefault(member, set()).add(room)
        for user in watched:
            c.watches.setdefault(user, set()).add(node)

    async def sweep(
        self, users: Sequence[str], rooms: Sequence[str]
    ) -> tuple[list[str], dict[str, list[Member]]]:
        c = self.cluster
        changed = [u for u in users if u in c.devices and _drop_dead(c, c.devices[u])]
        left: dict[str, list[Member]] = {}
        for room in rooms:
            removed = _drop_dead(c, c.rooms.get(room, {}))
            if removed:
                left[room] = removed
        return changed, left

    # rooms
    async def join(
        self, room: str, member: Member, loc: Location, max_members: int
    ) -> dict[Member, Location] | None:
        c = self.cluster
        table = c.rooms.setdefault(room, {})
        others = {m: v for m, v in c.live(table).items() if m != member}
        if member not in table and len(others) >= max_members:
            return None
        table[member] = loc
        c.device_rooms.setdefault(member, set()).add(room)
        return others

    async def leave(self, room: str, member: Member, loc: Location) -> bool:
        c = self.cluster
        table = c.rooms.get(room)
        if table is None or table.get(member) not in (loc, Location(PARKED, loc.conn)):
            return False
        del table[member]
        if not table:
            del c.rooms[room]
        rooms = c.device_rooms.get(member)
        if rooms is not None:
            rooms.discard(room)
        return True

    async def members(self, room: str) -> dict[Member, Location]:
        return self.cluster.live(self.cluster.rooms.get(room, {}))

    # watches
    async def watch(self, node: str, users: Sequence[str]) -> None:
        for u in users:
            self.cluster.watches.setdefault(u, set()).add(node)

    async def unwatch(self, node: str, users: Sequence[str]) -> None:
        for u in users:
            nodes = self.cluster.watches.get(u)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self.cluster.watches[u]

    async def watchers(self, user: str) -> set[str]:
        return set(self.cluster.watches.get(user, ()))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class MemoryBackplane:
    """Delivers on the next loop iteration, like a real inbox would."""

    def __init__(self, cluster: MemoryCluster | None = None) -> None:
        self.cluster = cluster or MemoryCluster()
        self.node: str | None = None
        self._stopped: set[int] = set()  # senders whose routes returned devices (``resume``)

    async def start(self, node: str, sink: EnvelopeSink) -> None:
        self.node = node
        self.cluster.sinks[node] = sink

    async def send(self, node: str, envelope: Envelope) -> bool:
        sink = self.cluster.sinks.get(node)
        if sink is None or not self.cluster.alive(node):
            return False
        asyncio.get_running_loop().call_soon(sink, envelope)
        return True

    async def keep(self, user: str, device: str, frame: bytes) -> bool:
        c = self.cluster
        if not self._parked(user, device):
            return False  # resumed (or gone) meanwhile: the caller routes it again
        c.kept.setdefault((user, device), deque(maxlen=c.resume_max_messages)).append(frame)
        return True

    async def keep_first(self, user: str, device: str, frames: list[bytes]) -> bool:
        c = self.cluster
        if not self._parked(user, device):
            return False
        # a bounded deque built from a longer list keeps its end: the oldest go first
        kept = c.kept.get((user, device), ())
        c.kept[(user, device)] = deque([*frames, *kept], maxlen=c.resume_max_messages)
        return True

    def _parked(self, user: str, device: str) -> bool:
        loc = self.cluster.devices.get(user, {}).get(device)
        return loc is not None and self.cluster.state(loc) == RESUMABLE

    def resume(self, sender: int) -> None:
        self._stopped.discard(sender)

    def route(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int,
    ) -> asyncio.Future[int | dict[str, Location]]:
        fut: asyncio.Future[int | dict[str, Location]] = (
            asyncio.get_running_loop().create_future())
        fut.set_result(self._route(user, only, skip, frame, ts, sender))
        return fut

    def route_then(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int, then: Callable[[RouteOutcome], None],
    ) -> None:
        asyncio.get_running_loop().call_soon(
            then, self._route(user, only, skip, frame, ts, sender))

    def _route(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int,
    ) -> int | dict[str, Location]:
        loop = asyncio.get_running_loop()
        c = self.cluster
        found = c.live(c.devices.get(user, {}))
        by_node: dict[str, list[str]] = {}
        for device, loc in found.items():
            if (only is None or device == only) and device != skip:
                by_node.setdefault(loc.node, []).append(device)
        if sender in self._stopped or self.node in by_node or PARKED in by_node:
            self._stopped.add(sender)
            return found
        queued = 0
        for node, devices in by_node.items():
            sink = c.sinks.get(node)
            if sink is not None and c.alive(node):
                loop.call_soon(sink, delivery(user, tuple(devices), frame, ts))
                queued += len(devices)
        return queued

    async def salvage(self, node: str, user: str, device: str) -> list[bytes]:
        return []  # an in-process inbox dies with its process

    async def heartbeat(self) -> None:
        pass

    async def close(self) -> None:
        if self.node is not None:
            self.cluster.sinks.pop(self.node, None)
            self.node = None


def memory_rate_limiter(rate: str) -> WindowLimiter:
    return WindowLimiter(rate)
