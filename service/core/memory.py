"""In-process twins of the contracts: one worker alone (no Redis), and fast unit tests of
several simulated workers sharing one :class:`MemoryCluster`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from limits.aio.storage import MemoryStorage

from .contracts import Claim, Envelope, EnvelopeSink, Location
from .ratelimit import LimitsRateLimiter


@dataclass
class MemoryCluster:
    """State shared by every simulated worker: devices, node liveness, inboxes."""

    ttl: float = 15.0
    clock: Callable[[], float] = time.monotonic
    devices: dict[str, dict[str, Location]] = field(default_factory=dict)
    alive_until: dict[str, float] = field(default_factory=dict)
    sinks: dict[str, EnvelopeSink] = field(default_factory=dict)

    def alive(self, node: str) -> bool:
        return self.alive_until.get(node, -1.0) > self.clock()

    def live_devices(self, user: str) -> dict[str, Location]:
        devs = self.devices.get(user)
        if not devs:
            return {}
        for dev in [d for d, loc in devs.items() if not self.alive(loc.node)]:
            del devs[dev]
        if not devs:
            del self.devices[user]
        return dict(devs)


class MemoryPresence:
    def __init__(self, cluster: MemoryCluster | None = None) -> None:
        self.cluster = cluster or MemoryCluster()

    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        live = self.cluster.live_devices(user)
        prev = live.pop(device, None)
        if len(live) >= max_devices:
            return Claim(False, prev)
        self.cluster.devices.setdefault(user, {})[device] = loc
        return Claim(True, prev)

    async def release(self, user: str, device: str, loc: Location) -> None:
        devs = self.cluster.devices.get(user)
        if devs is not None and devs.get(device) == loc:
            del devs[device]
            if not devs:
                del self.cluster.devices[user]

    async def locate(self, users: Sequence[str]) -> dict[str, dict[str, Location]]:
        return {u: self.cluster.live_devices(u) for u in users}

    async def heartbeat(self, node: str, devices: Iterable[tuple[str, str, Location]]) -> None:
        self.cluster.alive_until[node] = self.cluster.clock() + self.cluster.ttl
        for user, device, loc in devices:
            self.cluster.devices.setdefault(user, {}).setdefault(device, loc)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class MemoryBackplane:
    """Delivers on the next loop iteration, like a real inbox would."""

    def __init__(self, cluster: MemoryCluster | None = None) -> None:
        self.cluster = cluster or MemoryCluster()
        self.node: str | None = None

    async def start(self, node: str, sink: EnvelopeSink) -> None:
        self.node = node
        self.cluster.sinks[node] = sink

    async def send(self, node: str, envelope: Envelope) -> bool:
        sink = self.cluster.sinks.get(node)
        if sink is None or not self.cluster.alive(node):
            return False
        asyncio.get_running_loop().call_soon(sink, envelope)
        return True

    async def heartbeat(self) -> None:
        pass

    async def close(self) -> None:
        if self.node is not None:
            self.cluster.sinks.pop(self.node, None)
            self.node = None


def memory_rate_limiter(rate: str) -> LimitsRateLimiter:
    return LimitsRateLimiter(MemoryStorage(), rate)
