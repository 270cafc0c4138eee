"""The cluster-wide limiter: `limits` on real Redis with the redis-py implementation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from limits import parse
from limits.aio.strategies import MovingWindowRateLimiter

import service.backends.redis_limits as rl
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
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
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

    # a slow sender (a pause of over two lease periods between messages) takes no lease:
    # one slot per message (the lease period shortened to keep the test quick)
    monkeypatch.setattr(rl, "LEASE_S", 0.05)
    key_s = "sig:rl:" + parse("1000/second").key_for("u", "slow")
    for _ in range(3):
        assert await w1.hit("slow") is None
        await asyncio.sleep(0.12)
    assert await redis.llen(key_s) == 3
    await w1.close()
    await w2.close()


async def _send_steadily(w: Any, redis: Any, key: str, user: str, n: int, gap: float) -> int:
    """``n`` messages of ``user``, one every ``gap`` seconds; returns how many were
    admitted, checking after each that Redis counted it before it was admitted."""
    admitted = 0
    for _ in range(n):
        admitted += await resolve(w.admit(user)) is None
        assert await redis.llen(key) >= admitted  # never spent before it was counted
        await asyncio.sleep(gap)
    return admitted


async def test_a_steady_sender_of_a_few_messages_a_second_takes_leases(
    redis_url: str, redis: Any
) -> None:
    """One message every 120 ms (an ICE exchange's pace, one per tick; with the 50 ms lease
    period of before, every one of them was an acquisition): most are spent from a lease,
    each counted in Redis before it was admitted, and no lease beyond the share.  (Before
    leases were renewed ahead, about one message in four still waited for an acquisition:
    the one that found its lease spent or lapsed.)"""
    w = redis_rate_limiter(redis_url, redis, "1000/second")
    key = "sig:rl:" + parse("1000/second").key_for("u", "ice")
    assert await _send_steadily(w, redis, key, "ice", 16, 0.12) == 16
    # a lease is renewed ahead, while the sender still spends from it: after the first
    # two messages (no lease yet, then one of two slots) none waits for an acquisition
    assert w.waited <= 3, w.waited
    assert w.acquisitions <= 10, w.acquisitions
    assert await redis.llen(key) <= 16 + int(1000 * rl.LEASE_SHARE)
    await w.close()


class _Clock:
    """The limiter's clock (``time.monotonic`` and ``time.time``), moved by hand: a pace
    of seconds per message without the test taking seconds.  Redis reads the window from
    the timestamps the limiter sends, so it keeps the same time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


async def test_a_sender_of_one_message_a_second_waits_only_for_its_first_two(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One message a second (a user in a call, or the latency scenario's 1,000 msg/s from
    1,000 users): after the first two, every message is spent from a lease renewed ahead.
    With leases of 2 s, a lease taken at one message had lapsed by the third after it, and
    about every third message waited for an acquisition (two round trips instead of
    one)."""
    clock = _Clock()
    monkeypatch.setattr(rl, "time", clock)
    # a cap of 5 slots, as the default 100/second; a window long enough that Redis keeps
    # every slot of the test (its expiry runs on the real clock)
    w = redis_rate_limiter(redis_url, redis, "100/minute")
    key = "sig:rl:" + parse("100/minute").key_for("u", "caller")
    admitted = 0
    for _ in range(20):
        admitted += await resolve(w.admit("caller")) is None
        assert await redis.llen(key) >= admitted  # never spent before it was counted
        clock.now += 1.0
    assert admitted == 20
    assert w.waited == 2, w.waited
    # the slots it holds stay within the cap
    assert w._leases["caller"][0] <= 5
    await w.close()


async def test_a_steady_senders_lease_grows_to_its_pace(redis_url: str, redis: Any) -> None:
    """A sender of one message per 10 ms tick (100 a second, far under the limit): its
    lease grows until it lasts about half a lease period, so acquisitions fall to a few a
    second (a lease renewed with what was spent meanwhile kept whatever size it started
    with: two slots, one acquisition every other message).  Each message is still counted
    in Redis before it is admitted, and the lease stays within about one lease period of
    the sender's pace."""
    w = redis_rate_limiter(redis_url, redis, "100000/second")
    key = "sig:rl:" + parse("100000/second").key_for("u", "pace")
    admitted = await _send_steadily(w, redis, key, "pace", 120, 0.01)
    assert admitted == 120
    assert w.acquisitions <= 12, w.acquisitions
    assert w.waited <= 3, w.waited
    # counted but not spent: at most what it sends in about one and a half lease periods
    sent_in_one_and_a_half_leases = 100 * rl.LEASE_S * 1.5
    assert await redis.llen(key) - admitted <= sent_in_one_and_a_half_leases
    await w.close()


async def test_renewed_leases_stay_within_the_cap_and_the_limit(
    redis_url: str, redis: Any
) -> None:
    """A sender far over its limit: leases renewed ahead never hold more than the cap,
    nothing is admitted that Redis did not count, and at the limit the refusals come."""
    w = redis_rate_limiter(redis_url, redis, "100/minute")  # cap: 5 slots
    key = "sig:rl:" + parse("100/minute").key_for("u", "fast")
    admitted = refused = 0
    for _ in range(160):
        if await resolve(w.admit("fast")) is None:
            admitted += 1
        else:
            refused += 1
        lease = w._leases.get("fast")
        assert lease is None or lease[0] <= w._lease_cap == 5
        assert await redis.llen(key) >= admitted  # never spent before it was counted
    assert admitted == 100 and refused == 60
    assert w.waited < 60 + 100 // 2  # most of the first hundred came from leases
    await w.close()


async def test_a_tick_of_many_users_is_one_script_call(redis_url: str, redis: Any) -> None:
    """Every user of one tick is counted by a single EVALSHA (not one per user), each user
    still all-or-nothing and in limits' own window format."""
    w = redis_rate_limiter(redis_url, redis, "3/minute")
    await redis.config_resetstat()
    users = [f"u{i}" for i in range(40)]
    pending = [w.admit(u) for u in users for _ in range(2)] + [w.admit("greedy") for _ in range(5)]
    results = await asyncio.gather(*(resolve(p) for p in pending))
    assert results[:80] == [None] * 80
    greedy = results[80:]
    assert greedy[:3] == [None] * 3 and all(r is not None and 0 < r <= 60 for r in greedy[3:])
    stats = await redis.info("commandstats")
    # one call for the 41 users; then greedy's partial path: limits' own hit for each
    # slot that still fits and the first that does not (4), and its window stats (1)
    assert w.acquisitions == 1
    assert stats["cmdstat_evalsha"]["calls"] == 1 + 4 + 1, stats["cmdstat_evalsha"]
    view = MovingWindowRateLimiter(w._storage)
    for user, left in (("u0", 1), ("u39", 1), ("greedy", 0)):
        got = await view.get_window_stats(parse("3/minute"), "u", user)
        assert got.remaining == left, (user, got)
    await w.close()


async def test_a_storm_of_first_messages_goes_in_script_calls_within_the_budget(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of users waiting for their first acquisition in one tick (a reconnection
    storm) are one round trip, but cut into script calls of at most CALL_BUDGET each, so
    Redis serves its other clients between them; every user is still counted exactly,
    all-or-nothing, and the one over its limit still gets what fits."""
    monkeypatch.setattr(rl, "CALL_BUDGET", 60)
    monkeypatch.setattr(rl, "USER_COST", 6)
    sizes: list[int] = []
    evalsha = rl.evalsha

    def spy(script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        sizes.append(len(keys))
        return evalsha(script, keys, args)

    monkeypatch.setattr(rl, "evalsha", spy)
    w = redis_rate_limiter(redis_url, redis, "3/minute")
    await redis.config_resetstat()
    users = [f"s{i}" for i in range(40)]
    pending = [w.admit(u) for u in users for _ in range(2)] + [w.admit("greedy") for _ in range(5)]
    results = await asyncio.gather(*(resolve(p) for p in pending))
    assert results[:80] == [None] * 80
    greedy = results[80:]
    assert greedy[:3] == [None] * 3 and all(r is not None and 0 < r <= 60 for r in greedy[3:])
    # 8 a user (2 slots + 6): seven users a call; the last call takes five and greedy (11)
    assert sizes == [7, 7, 7, 7, 7, 6], sizes
    assert w.acquisitions == 1 and w._lane.round_trips == 1
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 6 + 4 + 1, stats["cmdstat_evalsha"]
    view = MovingWindowRateLimiter(w._storage)
    for user, left in (("s0", 1), ("s39", 1), ("greedy", 0)):
        got = await view.get_window_stats(parse("3/minute"), "u", user)
        assert got.remaining == left, (user, got)
    await w.close()


async def test_a_failed_script_call_fails_only_the_users_it_carried(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One call per user here (a budget of one): the call on a key that is not a list
    fails with Redis's error, and only that user's message sees it."""
    monkeypatch.setattr(rl, "CALL_BUDGET", 8)
    monkeypatch.setattr(rl, "USER_COST", 6)
    w = redis_rate_limiter(redis_url, redis, "5/minute")
    await redis.set("sig:rl:" + parse("5/minute").key_for("u", "broken"), "not a list")
    users = ["a1", "broken", "a2"]
    results = await asyncio.gather(*(resolve(w.admit(u)) for u in users),
                                   return_exceptions=True)
    assert results[0] is None and results[2] is None, results
    assert isinstance(results[1], Exception) and "WRONGTYPE" in str(results[1]), results
    assert w._lane.round_trips == 1
    await w.close()


async def test_window_list_is_trimmed_to_the_limit_when_old_slots_overflow_it(
    redis_url: str, redis: Any
) -> None:
    """The trim runs only when a push takes the list past the limit: slots that left the
    window are cut then, and limits' strategy still reads the window right."""
    w = redis_rate_limiter(redis_url, redis, "3/minute")
    key = "sig:rl:" + parse("3/minute").key_for("u", "fay")
    await redis.rpush(key, 1.0, 1.0, 1.0)  # three slots from 1970: out of the window
    results = await asyncio.gather(*(resolve(w.admit("fay")) for _ in range(2)))
    assert results == [None, None]
    assert await redis.llen(key) == 3  # 2 new + 1 old, not 5
    got = await MovingWindowRateLimiter(w._storage).get_window_stats(
        parse("3/minute"), "u", "fay"
    )
    assert got.remaining == 1
    assert await w.hit("fay") is None
    assert await w.hit("fay") is not None
    assert await redis.llen(key) == 3
    await w.close()


async def test_built_keys_are_limits_own_and_their_cache_is_bounded(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rl, "KEY_CACHE_MAX", 8)
    w = redis_rate_limiter(redis_url, redis, "5/minute")
    for i in range(20):
        key = w._key(f"user{i}")
        assert key == "sig:rl:" + parse("5/minute").key_for("u", f"user{i}")
        assert w._key(f"user{i}") is key  # built once
        assert len(w._keys) <= 8
    await w.close()


async def _lock_step(w: Any, users: list[str], ticks: int) -> int:
    """Every user sends one message per tick, all in step (users who connected together);
    returns how many were admitted."""
    admitted = 0
    for _ in range(ticks):
        results = await asyncio.gather(*(resolve(w.admit(u)) for u in users))
        admitted += sum(r is None for r in results)
        await asyncio.sleep(0.001)  # the renewals' round trips
    return admitted


def _spy_calls(w: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Each limiter call as (renewals, cost against CALL_BUDGET), in order."""
    calls: list[tuple[int, int]] = []
    acquired = w._acquired

    def spy(batch: dict[str, list[Any]], extra: dict[str, int], now: float, res: Any,
            chunks: list[list[str]]) -> None:
        renewals = sum(1 for futs in batch.values() if not futs)
        cost = sum(len(futs) + extra[u] + rl.USER_COST for u, futs in batch.items())
        calls.append((renewals, cost))
        acquired(batch, extra, now, res, chunks)

    monkeypatch.setattr(w, "_acquired", spy)
    return calls


@pytest.mark.parametrize("jitter", [True, False])
async def test_leases_taken_together_are_renewed_apart(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch, jitter: bool
) -> None:
    """Users who started together and send in step renew their leases at different ticks:
    a lease is renewed between half and five eighths spent, at random.  Together, their
    renewals grew together and each wave was one script call that held Redis for tens of
    milliseconds (the control, without the jitter, shows the wave)."""
    monkeypatch.setattr(rl, "CALL_BUDGET", 10**9)  # this test is about the waves alone
    if not jitter:
        monkeypatch.setattr(rl.random, "uniform", lambda lo, hi: hi)
    w = redis_rate_limiter(redis_url, redis, "1000000/second")
    calls = _spy_calls(w, monkeypatch)
    users = [f"step{i}" for i in range(100)]
    assert await _lock_step(w, users, 150) == 100 * 150
    late = [renewals for renewals, _ in calls[len(calls) // 2 :]]
    if jitter:
        assert max(late) <= 50, late  # 8-10 on a quiet machine
    else:
        assert max(late) == 100, late
    # each slot is the call's timestamp, as limits' own strategy reads it
    key = "sig:rl:" + parse("1000000/second").key_for("u", "step7")
    assert abs(float(await redis.lindex(key, 0)) - time.time()) < 60
    stats = await MovingWindowRateLimiter(w._storage).get_window_stats(
        parse("1000000/second"), "u", "step7"
    )
    assert 1_000_000 - stats.remaining == await redis.llen(key) >= 150
    await w.close()


async def test_renewals_past_the_call_budget_wait_for_the_next_call(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a renewal adds to one script call is bounded (Redis runs a script alone): the
    renewals that do not fit go with the next round trip, messages that wait for an
    acquisition always go, and one renewal goes even when it alone is over the budget."""
    monkeypatch.setattr(rl, "CALL_BUDGET", 100)
    monkeypatch.setattr(rl, "USER_COST", 6)
    w = redis_rate_limiter(redis_url, redis, "1000000/second")
    waiting = asyncio.get_running_loop().create_future()
    batch: dict[str, list[Any]] = {"w": [waiting], "r1": [], "r2": [], "r3": []}
    w._defer_renewals(batch, {"w": 90, "r1": 40, "r2": 10, "r3": 200})
    assert list(batch) == ["w"]  # 97 of 100 taken by the waiting message
    assert set(w._pending) == {"r1", "r2", "r3"}
    w._pending = {}
    batch = {"r1": [], "r2": [], "r3": []}
    w._defer_renewals(batch, {"r1": 40, "r2": 10, "r3": 200})
    assert list(batch) == ["r1", "r2"] and list(w._pending) == ["r3"]
    w._pending = {}
    batch = {"r3": []}
    w._defer_renewals(batch, {"r3": 200})
    assert list(batch) == ["r3"] and not w._pending
    waiting.cancel()
    await w.close()


async def test_leases_renewed_within_the_call_budget_still_cover_every_message(
    redis_url: str, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In step and under a small budget, renewals spread over several calls, none over the
    budget unless it holds a single renewal; every message is admitted and counted before
    it is spent, and the senders seldom wait for an acquisition: a deferred renewal is
    still ahead (half of the lease is left), so past each user's first two messages only a
    slow machine's late round trips make one wait."""
    monkeypatch.setattr(rl, "CALL_BUDGET", 300)
    w = redis_rate_limiter(redis_url, redis, "1000000/second")
    calls = _spy_calls(w, monkeypatch)
    users = [f"b{i}" for i in range(60)]
    assert await _lock_step(w, users, 120) == 60 * 120
    renewing = [(n, cost) for n, cost in calls if n]
    assert renewing and all(cost <= 300 or n == 1 for n, cost in renewing), renewing
    assert max(cost for _, cost in renewing) > 100  # the budget was what split them
    # each user's first two messages wait (no lease, then none of their own yet); a
    # renewal that never went would make most of the 7,200 wait
    assert w.waited <= 4 * len(users), w.waited
    for u in users[:5]:
        key = "sig:rl:" + parse("1000000/second").key_for("u", u)
        assert await redis.llen(key) >= 120
    await w.close()
