"""The cluster-wide limiter: `limits` on real Redis with the redis-py implementation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

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


async def test_one_tick_of_two_workers_is_counted_exactly(redis_url: str, redis: Any) -> None:
    """Both workers' messages of one tick go out as one pipeline each; limits' atomic acquire
    keeps the cluster-wide count exact, and the refused ones carry a retry time."""
    w1 = redis_rate_limiter(redis_url, redis, "10/second")
    w2 = redis_rate_limiter(redis_url, redis, "10/second")
    pending = [w.admit("carol") for w in (w1, w2) for _ in range(7)]
    results = await asyncio.gather(*pending)  # type: ignore[arg-type]
    assert sum(r is None for r in results) == 10, results
    refused = [r for r in results if r is not None]
    assert all(0 < r <= 1 for r in refused)
    # limits' own strategy reads the same window
    stats = await MovingWindowRateLimiter(w1._storage).get_window_stats(
        parse("10/second"), "u", "carol"
    )
    assert stats.remaining == 0
    await w1.close()
    await w1.close()  # safe twice


async def test_redis_failure_surfaces_to_the_caller(redis_url: str, redis: Any) -> None:
    w = redis_rate_limiter("redis://127.0.0.1:1", redis.__class__(port=1), "10/second")
    with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises; the router fails open
        await w.hit("dave")
    await w.close()
