"""The per-user budget of PROTOCOL.md §7: at most ``limit`` client messages per user in any
``period`` (a moving window), whatever their type or device.

``WindowLimiter`` counts in process memory (one instance); ``service.backends.redis_limits``
counts cluster-wide in Redis with ``limits``.  Both answer ``admit(user)`` with an
``Admission``: None (allowed), the seconds until a message would be allowed, or a future of
either (the Redis limiter answers every message of one loop tick with one pipeline).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Union

from limits import parse

Admission = Union[float, None, "asyncio.Future[float | None]"]


def parse_rate(rate: str) -> tuple[int, int]:
    """``"100/second"`` → (100, 1): the limit and the period in seconds."""
    item = parse(rate)
    return int(item.amount), int(item.get_expiry())


async def resolve(admission: Admission) -> float | None:
    """The outcome of an admission (raises what the limiter's storage raised)."""
    if isinstance(admission, asyncio.Future):
        return await admission
    return admission


class WindowLimiter:
    """An exact moving window per user, in memory: each user's hits counted in slots of
    1/1000 of the period, so a user costs at most 1,000 slots whatever the limit.  Users
    idle for a whole period are forgotten."""

    synchronous = True  # ``admit`` answers at once

    def __init__(self, rate: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period_s = parse_rate(rate)
        self._slot = self.period_s / 1000
        self._clock = clock
        # user -> [hits in ``slots``, slots]; ``slots`` holds (slot start, hits) pairs
        # flat, oldest first: one deque per user and no object per slot (this runs for
        # every message, and at thousands of users what it touches is what it costs)
        self._users: dict[str, list[Any]] = {}
        self._next_sweep = clock() + self.period_s

    def admit(self, user: str) -> Admission:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = [0, deque()]
        slots: deque[float] = entry[1]
        horizon = now - self.period_s
        if slots and slots[0] <= horizon:
            total = entry[0]
            while slots and slots[0] <= horizon:
                slots.popleft()
                total -= slots.popleft()
            entry[0] = total
        if entry[0] >= self.limit:
            return max(0.001, slots[0] - horizon)
        slot = now - now % self._slot
        if slots and slots[-2] == slot:
            slots[-1] += 1
        else:
            slots.append(slot)
            slots.append(1)
        entry[0] += 1
        return None

    async def hit(self, user: str) -> float | None:
        return await resolve(self.admit(user))

    def _sweep(self, now: float) -> None:
        horizon = now - self.period_s
        for user in [u for u, (_, s) in self._users.items() if not s or s[-2] <= horizon]:
            del self._users[user]
        self._next_sweep = now + self.period_s

    async def close(self) -> None:
        self._users.clear()
