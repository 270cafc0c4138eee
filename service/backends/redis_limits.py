"""The cluster-wide rate limiter: ``limits`` on Redis with the redis-py implementation,
sharing the service's connection pool."""

from __future__ import annotations

from limits.aio.storage import RedisStorage
from redis.asyncio import Redis

from ..core.ratelimit import LimitsRateLimiter
from .keys import LIMITS_PREFIX


def redis_rate_limiter(url: str, redis: Redis, rate: str) -> LimitsRateLimiter:
    scheme, rest = url.split("://", 1)
    storage = RedisStorage(
        f"async+{scheme}://{rest}",
        implementation="redispy",
        key_prefix=LIMITS_PREFIX,
        connection_pool=redis.connection_pool,  # type: ignore[arg-type]
    )
    return LimitsRateLimiter(storage, rate)
