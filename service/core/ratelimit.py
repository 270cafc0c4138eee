"""The per-user budget of PROTOCOL.md §7 on any ``limits`` async storage: memory for one
instance, Redis (``service.backends.redis_limits``) for a cluster."""

from __future__ import annotations

import time
from typing import Any

from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter


class LimitsRateLimiter:
    """Moving window over every message of a user, whatever its type or device."""

    def __init__(self, storage: Any, rate: str) -> None:
        self._storage = storage
        self._item = parse(rate)
        self._strategy = MovingWindowRateLimiter(storage)
        self._closed = False

    @property
    def limit(self) -> int:
        return int(self._item.amount)

    @property
    def period_s(self) -> int:
        return int(self._item.get_expiry())

    async def hit(self, user: str) -> float | None:
        if await self._strategy.hit(self._item, "u", user):
            return None
        stats = await self._strategy.get_window_stats(self._item, "u", user)
        return max(0.001, stats.reset_time - time.time())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        closer = getattr(self._storage, "aclose", None) or getattr(self._storage, "close", None)
        if closer is not None:
            res = closer()
            if hasattr(res, "__await__"):
                await res
