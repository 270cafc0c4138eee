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
    total, starts, hits, _ = lim._users["busy"]
    assert total == 50_000 and sum(hits) == total  # nothing expired yet (0.5 s of hits)
    assert len(starts) == len(hits) <= 501  # many hits share a slot of 1 ms
    clock.t += 2.5
    lim.admit("someone-else")
    assert "busy" not in lim._users


def test_a_steady_sender_keeps_at_most_twice_a_window_of_slots() -> None:
    """Slots that left the window are cut in bulk, not per message: the lists stay within
    twice the live slots however long the user sends (here 3 periods, a slot per hit),
    and the count the limit is checked against is exact whenever it matters."""
    clock = Clock()
    roomy, tight = WindowLimiter("1000000/second", clock), WindowLimiter("2000/second", clock)
    longest = 0
    for _ in range(6_000):
        clock.t += 0.0005
        assert roomy.admit("steady") is None
        assert tight.admit("steady") is None  # 2,000 hits in any second: never over
        longest = max(longest, len(roomy._users["steady"][1]))
    assert longest <= 2 * 1_000  # at most 1,000 live slots of 1 ms
    burst = 0  # at one instant, hits until refused: the window then holds the limit
    while (retry := tight.admit("steady")) is None:
        burst += 1
    assert burst <= 2  # full already, or a slot or two left it meanwhile (slot edges)
    assert isinstance(retry, float) and 0 < retry <= 0.002
    total, starts, hits, _ = tight._users["steady"]
    assert total == sum(hits) == 2_000 and starts[0] > clock.t - 1.0


def test_parse_rate() -> None:
    assert parse_rate("100/second") == (100, 1)
    assert parse_rate("7/minute") == (7, 60)
