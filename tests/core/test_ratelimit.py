"""The in-memory moving window (one instance), with a fake clock."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from service.core.ratelimit import WindowLimiter, parse_rate


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exact_moving_window_with_retry_time() -> None:
    clock = Clock()
    lim = WindowLimiter("3/second", clock)
    assert [lim.admit("u") for _ in range(3)] == [None, None, None]
    clock.t += 0.4
    retry = lim.admit("u")
    assert isinstance(retry, float) and abs(retry - 0.6) < 0.01
    assert lim.admit("other") is None  # per user
    clock.t += 0.61  # the first three slide out together
    assert [lim.admit("u") for _ in range(4)][:3] == [None, None, None]


def test_window_moves_rather_than_resets() -> None:
    clock = Clock()
    lim = WindowLimiter("4/second", clock)
    for step in (0.0, 0.3, 0.3, 0.3):  # hits at 0, .3, .6, .9
        clock.t += step
        assert lim.admit("u") is None
    clock.t += 0.2  # t = 1.1: only the hit at 0 has left the window
    assert lim.admit("u") is None
    assert lim.admit("u") is not None


def _logged(lim: WindowLimiter) -> int:
    """Hits in the limiter's log: every admitted hit still in the window."""
    return sum(sum(hit.values()) for _, hit in lim._buckets)


def test_memory_is_bounded_by_the_window_and_idle_users_are_forgotten() -> None:
    clock = Clock()
    lim = WindowLimiter("1000000/second", clock)
    for _ in range(50_000):
        clock.t += 0.00001  # 100k messages/s: many hits share a bucket of 1 ms
        assert lim.admit("busy") is None
    assert lim._users["busy"].hits == _logged(lim) == 50_000  # nothing expired yet
    assert len(lim._buckets) <= 501  # one bucket per 1 ms slot (0.5 s of hits)
    clock.t += 2.5
    lim.admit("someone-else")
    assert "busy" not in lim._users  # forgotten with its last hit
    assert list(lim._users) == ["someone-else"] and _logged(lim) == 1


def test_a_user_is_forgotten_when_its_last_hit_leaves_the_window() -> None:
    clock = Clock()
    lim = WindowLimiter("10/second", clock)
    lim.admit("a")
    clock.t += 0.5
    lim.admit("b")
    clock.t += 0.501  # a's hit (t=0) has left, b's (t=0.5) has not
    lim.admit("b")
    assert "a" not in lim._users and lim._users["b"].hits == 2 and _logged(lim) == 2


def test_a_steady_sender_keeps_at_most_a_window_of_buckets() -> None:
    """The log holds at most one bucket per slot of the window however long the user
    sends (here 3 periods, two hits per 1 ms slot), and the count the limit is checked
    against is exact."""
    clock = Clock()
    roomy, tight = WindowLimiter("1000000/second", clock), WindowLimiter("2000/second", clock)
    longest = 0
    for _ in range(6_000):
        clock.t += 0.0005
        assert roomy.admit("steady") is None
        assert tight.admit("steady") is None  # 2,000 hits in any second: never over
        longest = max(longest, len(roomy._buckets))
    assert longest <= 1_002  # 1,000 slots of 1 ms in a window, give or take float edges
    burst = 0  # at one instant, hits until refused: the window then holds the limit
    while (retry := tight.admit("steady")) is None:
        burst += 1
    assert burst <= 2  # full already, or a slot or two left it meanwhile (slot edges)
    assert isinstance(retry, float) and 0 < retry <= 0.002
    assert tight._users["steady"].hits == _logged(tight) == 2_000
    assert tight._buckets[0][0] > clock.t - 1.0


def test_decisions_match_a_naive_moving_window() -> None:
    """Against a model that keeps every admitted hit's slot start per user and counts the
    ones inside the window on every call: the same answers, retry times included, for
    several users at random moments (bursts, pauses longer than the period)."""
    rng = random.Random(7)
    clock = Clock()
    lim = WindowLimiter("5/second", clock)
    slot = lim._slot
    model: dict[str, list[float]] = {}
    for _ in range(20_000):
        clock.t += rng.choice((0.0, 0.0001, 0.003, 0.05, 0.2, 1.3))
        user = rng.choice("abc")
        now = clock.t
        horizon = now - 1.0
        live = [s for s in model.get(user, []) if s > horizon]
        if len(live) >= 5:
            expected: float | None = max(0.001, live[0] - horizon)
        else:
            expected = None
            live.append(now - now % slot)
        model[user] = live
        got = lim.admit(user)
        if expected is None:
            assert got is None, (user, now)
        else:
            assert got == pytest.approx(expected, abs=1e-9), (user, now)
    assert _logged(lim) == sum(u.hits for u in lim._users.values())


def test_a_flood_is_refused_without_scanning_the_log_each_time() -> None:
    """The oldest hit of a refused user is looked for once per refusal spell, not per
    refused message (the scan can cover a period of every user's hits)."""
    clock = Clock()
    lim = WindowLimiter("3/second", clock)
    for user in ("other", "flood", "flood", "flood"):
        assert lim.admit(user) is None
        clock.t += 0.1
    scans = 0
    buckets = lim._buckets

    class Counted(deque[tuple[float, dict[Any, int]]]):
        def __iter__(self) -> Iterator[tuple[float, dict[Any, int]]]:
            nonlocal scans
            scans += 1
            return super().__iter__()

    lim._buckets = Counted(buckets)
    retries = []
    for _ in range(1_000):
        clock.t += 0.0001
        retry = lim.admit("flood")
        assert isinstance(retry, float)
        retries.append(retry)
    assert scans == 1
    # the first flood hit (t=0.1) leaves at t=1.1; it is now 0.4 + 0.1 s later
    assert retries[0] == pytest.approx(0.6999, abs=1e-6)
    assert retries[-1] == pytest.approx(0.6, abs=1e-6)
    assert retries == sorted(retries, reverse=True)


def test_parse_rate() -> None:
    assert parse_rate("100/second") == (100, 1)
    assert parse_rate("7/minute") == (7, 60)
