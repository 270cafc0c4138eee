"""The in-memory moving window (one instance), with a fake clock."""

from __future__ import annotations

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


def test_memory_is_bounded_by_slots_and_idle_users_are_forgotten() -> None:
    clock = Clock()
    lim = WindowLimiter("1000000/second", clock)
    for _ in range(50_000):
        clock.t += 0.00001  # 100k messages/s: many hits share a slot of 1 ms
        assert lim.admit("busy") is None
    total, slots = lim._users["busy"]
    assert total == 50_000 and len(slots) <= 2 * 501  # (slot, hits) pairs, flat
    clock.t += 2.5
    lim.admit("someone-else")
    assert "busy" not in lim._users


def test_parse_rate() -> None:
    assert parse_rate("100/second") == (100, 1)
    assert parse_rate("7/minute") == (7, 60)
