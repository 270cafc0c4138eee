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
from bisect import bisect_right
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


_CUT_AT = 16  # slots a user's lists may hold before expired ones are first looked for


class WindowLimiter:
    """An exact moving window per user, in memory: each user's hits counted in slots of
    1/1000 of the period, so a user costs at most 1,000 slots whatever the limit.  Users
    idle for a whole period are forgotten."""

    synchronous = True  # ``admit`` answers at once

    def __init__(self, rate: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period_s = parse_rate(rate)
        self._slot = self.period_s / 1000
        self._clock = clock
        # user -> [hits in ``starts``, slot starts (oldest first), hits per slot, the length
        # of ``starts`` at which to cut the slots that left the window].  Expired slots are
        # cut in bulk (a bisection and two slice deletions), only when the count could
        # reach the limit or the lists doubled since the last cut: most messages append and
        # count, nothing else (this runs for every message; a deque popped per message cost
        # a quarter more per message at thousands of users)
        self._users: dict[str, list[Any]] = {}
        self._next_sweep = clock() + self.period_s

    def leased(self, user: str) -> bool:
        return False  # no leases (``admit`` answers at once anyway)

    def admit(self, user: str) -> Admission:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = [0, [], [], _CUT_AT]
        starts: list[float] = entry[1]
        if entry[0] >= self.limit or len(starts) >= entry[3]:
            horizon = now - self.period_s
            self._cut(entry, horizon)
            if entry[0] >= self.limit:
                return max(0.001, starts[0] - horizon)
        slot = now - now % self._slot
        if starts and starts[-1] == slot:
            entry[2][-1] += 1
        else:
            starts.append(slot)
            entry[2].append(1)
        entry[0] += 1
        return None

    @staticmethod
    def _cut(entry: list[Any], horizon: float) -> None:
        """Drop the slots that started at or before ``horizon`` (out of the window)."""
        starts: list[float] = entry[1]
        k = bisect_right(starts, horizon)
        if k:
            hits: list[int] = entry[2]
            entry[0] -= sum(hits[:k])
            del starts[:k]
            del hits[:k]
        entry[3] = max(_CUT_AT, 2 * len(starts))

    async def hit(self, user: str) -> float | None:
        return await resolve(self.admit(user))

    def _sweep(self, now: float) -> None:
        horizon = now - self.period_s
        idle = [u for u, (_, starts, *_) in self._users.items()
                if not starts or starts[-1] <= horizon]
        for user in idle:
            del self._users[user]
        self._next_sweep = now + self.period_s

    async def close(self) -> None:
        self._users.clear()
