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
    """A user's hits in the window (the log's buckets count them per slot)."""

    __slots__ = ("hits", "name", "free_at")

    def __init__(self, name: str) -> None:
        self.hits = 0
        self.name = name
        self.free_at = 0.0  # while refused: when its oldest hit leaves the window


_NEVER = float("inf")


class WindowLimiter:
    """An exact moving window per user, in memory, kept as one log for every user: each
    admitted message counts its user in the bucket of its slot (1/1000 of the period, so
    the log has about 1,000 buckets, and a user at most one entry in each), and a bucket
    that leaves the window takes its hits off each user in it.  A message touches its
    user's count and the newest bucket (one dict for every message of that millisecond, so
    in the CPU's cache).  Per-user lists of slots, appended per message and cut in turn,
    cost 1.0-1.9 us of the 8-9 us of Python per message at 2,000 connections and 1.5-2.6
    of 12-13 at 10,000; this log 0.7 and 1.6 (``bench/inline.py``'s path, the two
    alternated in one process).  A user is forgotten when its last hit leaves the window.
    A refused user's retry time is one look-up per bucket (38 us over 1,000 buckets), once
    per refusal spell.  Memory: 10.1 MB for 10,000 users sending 26 messages a second,
    where the slot lists held 21.3."""

    synchronous = True  # ``admit`` answers at once

    def __init__(self, rate: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period_s = parse_rate(rate)
        self._slot = self.period_s / 1000
        self._clock = clock
        self._users: dict[str, _User] = {}
        # (slot start, hits per user in that slot), oldest first
        self._buckets: deque[tuple[float, dict[_User, int]]] = deque()
        self._newest: dict[_User, int] = {}  # the last bucket's hits, while its slot lasts
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
            newest = self._newest
            newest[u] = newest.get(u, 0) + 1
        else:
            start = now - now % self._slot
            self._newest = {u: 1}
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
            for u, n in buckets.popleft()[1].items():
                u.hits -= n
                if not u.hits:  # in no bucket now: forgotten
                    del users[u.name]
        if buckets:
            self._expires_at = buckets[0][0] + self.period_s
        else:
            self._expires_at, self._newest_ends = _NEVER, -_NEVER

    def _retry_after(self, u: _User, now: float) -> float:
        """Seconds until the oldest hit of ``u`` (at its limit) leaves the window: a
        look-up in each bucket from the oldest (at most 1,000), once per refusal spell."""
        if now >= u.free_at:
            u.free_at = now + 0.001
            for start, hit in self._buckets:
                if u in hit:
                    u.free_at = start + self.period_s
                    break
        return max(0.001, u.free_at - now)

    async def hit(self, user: str) -> float | None:
        return await resolve(self.admit(user))

    async def close(self) -> None:
        self._users.clear()
        self._buckets.clear()
        self._expires_at, self._newest_ends = _NEVER, -_NEVER
