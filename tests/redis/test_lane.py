"""The hot path's lane: batches of one tick share a round trip; a Redis restart costs no
batch on a connection that was fine a moment ago."""

from __future__ import annotations

import asyncio
from typing import Any

from service.backends.lane import Batch, Lane, Packed, pack, resp_args
from service.backends.redis_client import make_client
from service.backends.scripts import run_scripts
from tests.support import start_redis


async def test_batches_of_one_tick_share_a_round_trip(redis_url: str) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    a, b, c = await asyncio.gather(
        lane.execute([["SET", "lane-a", "1"], ["GET", "lane-a"]]),
        lane.execute([["INCR", "lane-a"]]),
        lane.execute([["HSET", "lane-a", "f", "v"]]),  # wrong type: an error reply
    )
    assert a == [b"OK", b"1"] and b == [2]
    assert isinstance(c[0], Exception) and "WRONGTYPE" in str(c[0])
    assert lane.round_trips == 1
    await lane.close()
    await lane.close()  # safe twice
    await redis.delete("lane-a")
    await redis.aclose()


async def test_a_packed_command_travels_as_it_was_made(redis_url: str) -> None:
    made = Packed(b"*3\r\n" + resp_args(("SET", "lane-p", 7)))
    assert pack([made, ["GET", "lane-p"]]) == pack([["SET", "lane-p", 7], ["GET", "lane-p"]])
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    assert await lane.execute([made, ["INCR", "lane-p"]]) == [b"OK", 8]
    await lane.close()
    await redis.delete("lane-p")
    await redis.aclose()


async def test_a_restart_between_two_batches_is_not_an_error() -> None:
    server = start_redis()
    try:
        redis = make_client(server.url, timeout=1.0)
        lane = Lane(redis)
        assert await lane.execute([["PING"]]) == [b"PONG"]
        port = server.port
        server.stop()
        server = start_redis(port=port)
        assert await lane.execute([["PING"]]) == [b"PONG"]  # within the idle window
        server.stop()
        try:
            await lane.execute([["PING"]])
            raise AssertionError("Redis is down: the batch must fail")
        except ConnectionError:
            pass
        except Exception as exc:  # redis-py's ConnectionError is not the builtin one
            assert "onnect" in type(exc).__name__, exc
        server = start_redis(port=port)
        assert await lane.execute([["PING"]]) == [b"PONG"]
        await lane.close()
        await redis.aclose()
    finally:
        server.stop()


async def test_scripts_redis_forgot_are_loaded_and_run_again(redis_url: str) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    script = redis.register_script("return ARGV[1] + 1")
    assert await run_scripts(lane, [(script, [], [1])]) == [2]
    await redis.script_flush()  # what a restart without persistence does to the cache
    assert await run_scripts(lane, [(script, [], [41]), (script, [], [1])]) == [42, 2]
    await lane.close()
    await redis.aclose()


async def test_a_hung_redis_times_out_and_the_batch_is_not_sent_again(redis_url: str) -> None:
    admin = make_client(redis_url, timeout=2.0)
    redis = make_client(redis_url, timeout=0.3)
    lane = Lane(redis)
    await lane.connect()
    await admin.execute_command("CLIENT", "PAUSE", "800", "ALL")
    try:
        await lane.execute([["INCR", "lane-t"]])
        raise AssertionError("Redis did not answer: the batch must fail")
    except Exception as exc:
        assert "imeout" in type(exc).__name__, exc
    await asyncio.sleep(1.0)  # the pause is over
    assert await admin.get("lane-t") in (None, b"1")  # at most once
    assert await lane.execute([["PING"]]) == [b"PONG"]  # a new connection
    await lane.close()
    await admin.delete("lane-t")
    await admin.aclose()
    await redis.aclose()


async def test_batches_submitted_during_a_round_trip_go_together_in_the_next(
    redis_url: str,
) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    await lane.connect()
    first = lane.execute([["SET", "lane-n", "1"]])
    await asyncio.sleep(0)  # the first is out now
    second = lane.execute([["INCR", "lane-n"]])
    third = lane.execute([["INCR", "lane-n"], ["GET", "lane-n"]])
    assert await first == [b"OK"]
    assert await second == [2] and await third == [3, b"3"]
    assert lane.round_trips == 2
    await lane.close()
    await redis.delete("lane-n")
    await redis.aclose()


async def _lane_client_id(lane: Lane) -> int:
    [client_id] = await lane.execute([["CLIENT", "ID"]])
    return int(client_id)


async def test_a_connection_killed_while_idle_is_replaced_for_the_next_batch(
    redis_url: str,
) -> None:
    admin = make_client(redis_url, timeout=2.0)
    lane = Lane(admin)
    first = await _lane_client_id(lane)
    await admin.execute_command("CLIENT", "KILL", "ID", str(first))
    await asyncio.sleep(0.05)  # the close reaches the lane
    assert await _lane_client_id(lane) != first
    await lane.close()
    await admin.aclose()


async def test_a_connection_lost_after_some_replies_fails_the_batch_as_partial(
    redis_url: str,
) -> None:
    admin = make_client(redis_url, timeout=2.0)
    lane = Lane(make_client(redis_url, timeout=5.0))
    lane_id = await _lane_client_id(lane)
    out = lane.execute([["INCR", "lane-p"], ["BLPOP", "lane-empty", "5"]])
    await asyncio.sleep(0.2)  # INCR answered; BLPOP waiting
    await admin.execute_command("CLIENT", "KILL", "ID", str(lane_id))
    try:
        await out
        raise AssertionError("the connection died mid-batch: the batch must fail")
    except Exception as exc:
        assert "onnection" in type(exc).__name__ and "partial" in str(exc), exc
    assert await admin.get("lane-p") == b"1"  # not sent again
    assert await lane.execute([["PING"]]) == [b"PONG"]
    await lane.close()
    await admin.delete("lane-p")
    await admin.aclose()


async def test_closing_fails_the_batch_in_flight_and_what_waits_behind_it(
    redis_url: str,
) -> None:
    redis = make_client(redis_url, timeout=5.0)
    lane = Lane(redis)
    await lane.connect()
    out = lane.execute([["BLPOP", "lane-empty", "5"]])
    await asyncio.sleep(0.05)
    behind = lane.execute([["PING"]])
    await lane.close()
    for fut in (out, behind):
        try:
            await fut
            raise AssertionError("closed: the batch must fail")
        except ConnectionError as exc:
            assert "lane closed" in str(exc)
    await lane.close()  # safe twice
    later = lane.execute([["PING"]])
    try:
        await later
        raise AssertionError("closed: no more batches")
    except ConnectionError:
        pass
    await redis.aclose()


class _Batcher:
    """A lane source holding commands until the lane asks for them."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.due: list[list[str]] = []
        self.results: list[Any] = []
        lane.add_source(self.take)

    def submit(self, *commands: list[str]) -> None:
        self.due += commands
        self.lane.wake()

    def take(self) -> list[Batch]:
        if not self.due:
            return []
        batch, self.due = self.due, []
        return [(batch, self.results.append)]


async def test_a_source_batch_travels_with_the_ticks_other_batches(redis_url: str) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    batcher = _Batcher(lane)
    batcher.submit(["SET", "lane-s", "1"], ["INCR", "lane-s"])
    direct = lane.execute([["INCR", "lane-d"]])
    assert await direct == [1]
    assert batcher.results == [[b"OK", 2]]  # told in the same read callback
    assert lane.round_trips == 1
    await lane.close()
    await redis.delete("lane-s", "lane-d")
    await redis.aclose()


async def test_what_a_source_has_due_fails_when_the_lane_closes(redis_url: str) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    batcher = _Batcher(lane)
    batcher.submit(["PING"])
    await lane.close()  # before the tick ends: never sent
    assert len(batcher.results) == 1 and isinstance(batcher.results[0], ConnectionError)
    batcher.submit(["PING"])  # after: failed at once
    assert len(batcher.results) == 2 and isinstance(batcher.results[1], ConnectionError)
    assert lane.round_trips == 0
    await redis.aclose()


async def test_a_failed_round_trip_reaches_the_sources_batches() -> None:
    from tests.support import free_port

    dead = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    lane = Lane(dead)
    batcher = _Batcher(lane)
    batcher.submit(["PING"])
    for _ in range(100):
        if batcher.results:
            break
        await asyncio.sleep(0.01)
    assert len(batcher.results) == 1 and isinstance(batcher.results[0], Exception)
    await lane.close()
    await dead.aclose()


class _Rider:
    """Has a batch due that only rides along (``Lane.add_rider``)."""

    def __init__(self, lane: Lane) -> None:
        self.due: list[list[Any]] = []
        self.asked: list[bool] = []
        self.results: list[Any] = []
        lane.add_rider(self.ride)

    def ride(self, going: bool) -> list[Batch]:
        self.asked.append(going)
        if not going or not self.due:
            return []
        batch, self.due = self.due, []
        return [(batch, self.results.append)]


async def test_a_riders_batch_goes_only_with_a_round_trip_that_goes_anyway(
    redis_url: str,
) -> None:
    redis = make_client(redis_url, timeout=2.0)
    lane = Lane(redis)
    rider = _Rider(lane)
    rider.due = [["INCR", "lane-r"]]
    lane.wake()
    await asyncio.sleep(0.01)
    # asked, told nothing goes: its batch stays due, no round trip for it alone
    assert rider.asked == [False] and rider.due and lane.round_trips == 0
    assert not lane.busy
    direct = lane.execute([["INCR", "lane-d"]])
    assert lane.busy  # until the lane looks for work, and while the round trip is out
    assert await direct == [1]
    assert rider.results == [[1]]  # after the sources' batches, in the same round trip
    assert lane.round_trips == 1 and rider.asked[1] is True
    await asyncio.sleep(0.01)
    assert not lane.busy and rider.asked[-1] is False  # asked again once it came back
    await lane.close()
    await redis.delete("lane-r", "lane-d")
    await redis.aclose()
