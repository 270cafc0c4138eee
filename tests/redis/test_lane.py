"""The hot path's lane: batches of one tick share a round trip; a Redis restart costs no
batch on a connection that was fine a moment ago."""

from __future__ import annotations

import asyncio

from service.backends.lane import Lane
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
