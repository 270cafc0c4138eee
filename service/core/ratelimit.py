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
from typing import Union

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


class _User:
    """A user's hits in the window; the log's buckets hold a reference per hit."""

    __slots__ = ("hits", "name")

    def __init__(self, name: str) -> None:
        self.hits = 0
        self.name = name


_NEVER = float("inf")


class WindowLimiter:
    """An exact moving window per user, in memory, kept as one log for every user: each
    admitted message adds its user to the bucket of its slot (1/1000 of the period, so the
    log has at most 1,000 buckets), and a bucket that leaves the window takes one hit off
    each user in it.  A message touches its user's count and the newest bucket (one list
    for every message of that millisecond, so always in the CPU's cache).  Per-user lists
    of slots, appended per message and cut in turn, cost 1.0-1.5 us of the 8-9 us of
    Python per message at 2,000 connections and 1.5-2.0 of 12-13 at 10,000; this log
    0-0.6 and 0.3-0.6 (``bench/inline.py``'s path, the two alternated in one process).
    A user is forgotten when its last hit leaves the window.  Memory: one reference per
    message admitted in the last period (at most ``limit`` per user, and at most what the
    worker relays in a period): 3.0 MB for 10,000 users sending 26 a second, where the
    slot lists held 21.3."""

    synchronous = True  # ``admit`` answers at once

    def __init__(self, rate: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period_s = parse_rate(rate)
        self._slot = self.period_s / 1000
        self._clock = clock
        self._users: dict[str, _User] = {}
        # (slot start, the users hit in that slot: one entry per hit), oldest first
        self._buckets: deque[tuple[float, list[_User]]] = deque()
        self._newest: list[_User] = []  # the last bucket's list, while its slot lasts
        self._newest_ends = -_NEVER
        self._expires_at = _NEVER  # when the oldest bucket leaves the window

    def leased(self, user: str) -> bool:
        return False  # no leases (``admit`` answers at once anyway)

    def admit(self, user: str) -> Admission:
        now = self._clock()
        if now >= self._expires_at:
            self._expire(now)
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = _User(user)
        if u.hits >= self.limit:
            return self._retry_after(u, now)
        u.hits += 1
        if now < self._newest_ends:
            self._newest.append(u)
        else:
            start = now - now % self._slot
            self._newest = [u]
            self._newest_ends = start + self._slot
            if not self._buckets:
                self._expires_at = start + self.period_s
            self._buckets.append((start, self._newest))
        return None

    def _expire(self, now: float) -> None:
        """Take the buckets that started at or before ``now - period`` out of the window."""
        horizon = now - self.period_s
        buckets, users = self._buckets, self._users
        while buckets and buckets[0][0] <= horizon:
            for u in buckets.popleft()[1]:
                u.hits -= 1
                if not u.hits and users.get(u.name) is u:
                    del users[u.name]
        if buckets:
            self._expires_at = buckets[0][0] + self.period_s
        else:
            self._expires_at, self._newest_ends = _NEVER, -_NEVER

    def _retry_after(self, u: _User, now: float) -> float:
        """Seconds until the oldest bucket holding a hit of ``u`` leaves the window."""
        horizon = now - self.period_s
        for start, hit in self._buckets:
            if u in hit:
                return max(0.001, start - horizon)
        return 0.001  # not reached: a user at its limit has hits in the log

    async def hit(self, user: str) -> float | None:
        return await resolve(self.admit(user))

    async def close(self) -> None:
        self._users.clear()
        self._buckets.clear()
        self._expires_at, self._newest_ends = _NEVER, -_NEVER
