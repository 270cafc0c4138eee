"""The cluster-wide limiter: `limits` on real Redis with the redis-py implementation."""

from __future__ import annotations

from typing import Any

from service.backends.redis_limits import redis_rate_limiter


async def test_budget_is_shared_by_two_workers(redis_url: str, redis: Any) -> None:
    w1 = redis_rate_limiter(redis_url, redis, "10/minute")
    w2 = redis_rate_limiter(redis_url, redis, "10/minute")
    results = [await (w1 if i % 2 else w2).hit("alice") for i in range(15)]
    assert results[:10] == [None] * 10
    assert all(r is not None and 0 < r <= 60 for r in results[10:])
    assert await w1.hit("bob") is None
    assert (w1.limit, w1.period_s) == (10, 60)
    keys = [k.decode() for k in await redis.keys("sig:rl*")]
    assert keys and all(k.startswith("sig:rl") for k in keys)
