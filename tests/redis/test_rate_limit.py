"""The cluster-wide limiter: `limits` on real Redis with the redis-py implementation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

from service.backends.redis_limits import redis_rate_limiter
from service.core.ratelimit import resolve


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


async def test_leases_spare_redis_for_busy_senders_and_never_exceed_the_limit(
    redis_url: str, redis: Any
) -> None:
    w1 = redis_rate_limiter(redis_url, redis, "1000/second")
    w2 = redis_rate_limiter(redis_url, redis, "1000/second")
    key = "sig:rl:" + parse("1000/second").key_for("u", "eve")

    # a busy sender: 300 messages, a few per tick, on one worker
    admitted = 0
    for _ in range(100):
        results = await asyncio.gather(*(resolve(w1.admit("eve")) for _ in range(3)))
        admitted += sum(r is None for r in results)
    assert admitted == 300
    counted = await redis.llen(key)
    assert 300 <= counted <= 300 + 50, counted  # every slot counted before it was spent
    calls = w1.acquisitions
    assert calls < 100, calls  # far fewer round trips than ticks

    # two workers flooding the same user: the cluster never admits more than the limit
    async def flood(w: Any) -> int:
        n = 0
        for _ in range(200):
            results = await asyncio.gather(*(resolve(w.admit("eve")) for _ in range(5)))
            n += sum(r is None for r in results)
        return n

    both = sum(await asyncio.gather(flood(w1), flood(w2)))
    assert both + admitted <= 1000, both

    # a slow sender takes no lease: one slot per message
    key_s = "sig:rl:" + parse("1000/second").key_for("u", "slow")
    for _ in range(3):
        assert await w1.hit("slow") is None
        await asyncio.sleep(0.12)
    assert await redis.llen(key_s) == 3
    await w1.close()
    await w2.close()
