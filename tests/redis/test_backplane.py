"""The Redis Streams backplane against a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.backends import keys
from service.backends.lane import pack
from service.backends.redis_backplane import (
    ENTRY_BYTES,
    ENTRY_ENVELOPES,
    RedisBackplane,
    _Made,
    decode_entry,
    encode_batch,
    encode_envelope,
)
from service.backends.redis_client import make_client
from service.core.contracts import PARKED, Envelope, Location


class Inbox:
    def __init__(self) -> None:
        self.got: list[Envelope] = []
        self.event = asyncio.Event()

    def __call__(self, env: Envelope) -> None:
        self.got.append(env)
        self.event.set()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Envelope]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.event.clear()
                await self.event.wait()
        return self.got


@pytest.fixture
async def make_bp(redis_url: str, redis: Any) -> AsyncIterator[Any]:
    made: list[tuple[RedisBackplane, Any]] = []

    async def make(node: str, **kw: Any) -> tuple[RedisBackplane, Inbox]:
        reader = make_client(redis_url, timeout=2.0, socket_timeout=5.0)
        bp = RedisBackplane(redis, reader, ttl=10, block_ms=200, **kw)
        inbox = Inbox()
        await bp.start(node, inbox)
        made.append((bp, reader))
        return bp, inbox

    yield make
    for bp, reader in made:
        await bp.close()
        await bp.close()  # safe twice
        await reader.aclose()


async def test_delivery_in_order_and_acked_and_deleted(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    envs = [Envelope("deliver", "bob", ("d1", "d2"), b'{"n":%d}' % i, ts=i) for i in range(300)]
    results = await asyncio.gather(*(a.send("B", e) for e in envs))
    assert results == [True] * 300
    got = await inbox_b.wait_for(300)
    assert got == envs
    await asyncio.sleep(0.3)  # the reader acks+deletes after handing entries over
    assert await redis.xlen(keys.inbox("B")) == 0
    pending = await redis.xpending(keys.inbox("B"), keys.GROUP)
    assert pending["pending"] == 0


async def test_one_tick_of_sends_is_one_pipeline(make_bp: Any) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    before = a._lane.round_trips
    futs = [a.send("B", Envelope("deliver", "u", ("d",), b"x")) for _ in range(50)]
    assert all(await asyncio.gather(*futs))
    assert a._lane.round_trips - before == 1
    await inbox_b.wait_for(50)


async def _silent_inbox(redis: Any, node: str) -> str:
    """An inbox nobody reads: what was written stays there to be looked at."""
    inbox = keys.inbox(node)
    await redis.xgroup_create(inbox, keys.GROUP, id="0", mkstream=True)
    return inbox


async def test_one_tick_to_one_inbox_is_one_entry_within_bounds(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    inbox = await _silent_inbox(redis, "Q")
    envs = [Envelope("deliver", "u", ("d",), b"%d" % i, ts=i) for i in range(50)]
    assert all(await asyncio.gather(*(a.send("Q", e) for e in envs)))
    entries = await redis.xrange(inbox)
    assert len(entries) == 1
    assert decode_entry(entries[0][1]) == envs
    # more than one entry may hold: cut in order, by count and by bytes
    many = [Envelope("deliver", "u", ("d",), b"%d" % i) for i in range(ENTRY_ENVELOPES * 2 + 1)]
    big = [Envelope("deliver", "u", ("d",), bytes(ENTRY_BYTES // 2 + 1)) for _ in range(3)]
    assert all(await asyncio.gather(*(a.send("Q", e) for e in many + big)))
    entries = (await redis.xrange(inbox))[1:]
    assert [len(decode_entry(f)) for _, f in entries] == [ENTRY_ENVELOPES, ENTRY_ENVELOPES, 2, 1, 1]
    assert [e for _, f in entries for e in decode_entry(f)] == many + big


async def test_a_kept_frame_never_overtakes_a_send_of_the_same_tick(
    make_bp: Any, redis: Any
) -> None:
    """Sends to one inbox around a keep are not merged across it: the keep runs between."""
    a, _ = await make_bp("A")
    inbox = await _silent_inbox(redis, "Q")
    first = a.send("Q", Envelope("deliver", "u", ("d",), b"1"))
    kept = a.keep("u", "d", b"k")  # not parked: refused, but it ran in its place
    second = a.send("Q", Envelope("deliver", "u", ("d",), b"2"))
    assert await asyncio.gather(first, kept, second) == [True, False, True]
    entries = await redis.xrange(inbox)
    assert [[e.frame for e in decode_entry(f)] for _, f in entries] == [[b"1"], [b"2"]]


async def test_send_to_a_gone_worker_is_false_and_creates_nothing(
    make_bp: Any, redis: Any
) -> None:
    a, _ = await make_bp("A")
    assert await a.send("ghost", Envelope("kick", "u", ("d",), conn="c")) is False
    assert not await redis.exists(keys.inbox("ghost"))


async def test_inbox_expires_and_heartbeat_refreshes_it(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    assert 0 < await redis.ttl(keys.inbox("A")) <= 20
    await redis.persist(keys.inbox("A"))
    await a.heartbeat()
    assert 0 < await redis.ttl(keys.inbox("A")) <= 20


async def test_reader_recovers_after_redis_lost_everything(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await redis.flushall()  # like a restart without persistence: NOGROUP next read
    # False while B's inbox is gone; True if B's reader already recreated it (a race)
    assert await a.send("B", Envelope("deliver", "u", ("d",), b"lost")) in (False, True)
    await asyncio.sleep(0.5)
    ok = False
    for _ in range(50):
        if await a.send("B", Envelope("deliver", "u", ("d",), b"back")):
            ok = True
            break
        await asyncio.sleep(0.1)
    assert ok, "inbox of B was not recreated"
    got = await inbox_b.wait_for(1)
    assert got[-1].frame == b"back"


async def test_a_killed_reader_connection_reads_again_and_loses_nothing(
    make_bp: Any, redis: Any
) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    assert await a.send("B", Envelope("deliver", "u", ("d",), b"before"))
    await inbox_b.wait_for(1)
    clients = (await redis.execute_command("CLIENT", "LIST")).decode().splitlines()
    readers = [c for c in clients if "cmd=xreadgroup" in c]
    assert readers, clients
    for line in readers:
        client_id = line.split("id=", 1)[1].split(" ", 1)[0]
        await redis.execute_command("CLIENT", "KILL", "ID", client_id)
    frames = [b"after-%d" % i for i in range(20)]
    for frame in frames:
        assert await a.send("B", Envelope("deliver", "u", ("d",), frame))
    got = await inbox_b.wait_for(21)
    assert [e.frame for e in got] == [b"before", *frames]


async def test_write_failure_raises_not_false(redis_url: str) -> None:
    from tests.support import free_port

    dead = make_client(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    bp = RedisBackplane(dead, dead, ttl=10)
    try:
        with pytest.raises(ConnectionError):
            await bp.send("B", Envelope("deliver", "u", ("d",), b"x"))
    finally:
        await bp.close()
        await dead.aclose()


async def test_salvage_returns_only_what_the_dead_worker_never_acknowledged(
    make_bp: Any, redis: Any
) -> None:
    """Delivered entries may linger until their stream node is trimmed; a resume elsewhere
    must get the unread and the read-but-unacknowledged ones, never a delivered one twice."""
    bp, _ = await make_bp("A")
    dead = keys.inbox("dead")
    await redis.xgroup_create(dead, keys.GROUP, id="0", mkstream=True)
    for i in range(4):
        env = Envelope("deliver", "u", ("d",), f"f{i}".encode())
        await redis.xadd(dead, encode_envelope(env))  # type: ignore[arg-type]
    other = Envelope("deliver", "u", ("e",), b"not-d")
    batch = [Envelope("deliver", "u", ("d", "e"), b"f4"), other]
    await redis.xadd(dead, {b"b": encode_batch(batch)})  # the batched format, read too
    read = await redis.xreadgroup(keys.GROUP, keys.CONSUMER, {dead: ">"}, count=2)
    first_id = read[0][1][0][0]
    await redis.xack(dead, keys.GROUP, first_id)  # f0 delivered; f1 read, unacknowledged
    assert await bp.salvage("dead", "u", "d") == [b"f1", b"f2", b"f3", b"f4"]
    assert await bp.salvage("nobody", "u", "d") == []


# ---------------------------------------------------------------- route: lookup + XADD


async def _devices_at(redis: Any, user: str, **where: str) -> None:
    """``user``'s devices as the presence stores them (device -> "node|conn"), each node
    alive (a parked device: node "~" with its deadline, alive for a minute)."""
    for device, value in where.items():
        await redis.hset(keys.devices(user), device, value)
        node = value.partition("|")[0]
        if node != "~":
            await redis.set(keys.node_alive(node), "1", ex=60)


def _parked(conn: str) -> str:
    return f"~|{conn}|{int(time.time() * 1000) + 60_000}"


async def test_reads_ride_a_busy_writer_lane_and_keep_their_order(make_bp: Any) -> None:
    a, _ = await make_bp("A")
    b, inbox_b = await make_bp("B")
    assert await b.route("nobody", None, None, b"", 1, 1) == 0
    busy = True

    async def routing() -> None:  # B's writer lane always has a round trip out
        while busy:
            assert await b.route("nobody", None, None, b"", 1, 1) == 0

    task = asyncio.create_task(routing())
    await asyncio.sleep(0.05)
    reads_before, writes_before = b._inbox_lane.round_trips, b._lane.round_trips
    envs = [Envelope("deliver", "u", ("d",), b"%d" % i) for i in range(100)]
    for env in envs:
        assert await a.send("B", env)
    assert await inbox_b.wait_for(100) == envs
    busy = False
    await task
    # the reads went with B's route round trips, not on the reader's own connection
    assert b._lane.round_trips - writes_before >= 50
    assert b._inbox_lane.round_trips - reads_before <= 10
    # and with the writer's lane idle again, a blocking read serves the inbox
    assert await a.send("B", Envelope("deliver", "u", ("d",), b"idle"))
    assert (await inbox_b.wait_for(101))[-1].frame == b"idle"


async def test_route_queues_to_every_remote_worker_in_one_step(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    _, inbox_c = await make_bp("C")
    await _devices_at(redis, "bob", d1="B|c1", d2="B|c2", d3="C|c3")
    assert await a.route("nobody", None, None, b"", 1, 1) == 0  # loads the script
    before = a._lane.round_trips
    frames = [b'{"n":%d}' % i for i in range(3)]
    results = await asyncio.gather(
        *(a.route("bob", None, None, f, 100 + i, 1) for i, f in enumerate(frames)))
    assert results == [3, 3, 3]
    assert a._lane.round_trips - before == 1
    got_b, got_c = await inbox_b.wait_for(3), await inbox_c.wait_for(3)
    assert got_b == [Envelope("deliver", "bob", ("d1", "d2"), f, ts=100 + i)
                     for i, f in enumerate(frames)]
    assert got_c == [Envelope("deliver", "bob", ("d3",), f, ts=100 + i)
                     for i, f in enumerate(frames)]
    # ``only`` picks one device, ``skip`` leaves one out
    assert await a.route("bob", "d3", None, b"x", 1, 1) == 1
    assert await a.route("bob", None, "d1", b"y", 1, 1) == 2
    assert (await inbox_c.wait_for(5))[3:] == [Envelope("deliver", "bob", ("d3",), b"x", ts=1),
                                                Envelope("deliver", "bob", ("d3",), b"y", ts=1)]
    assert (await inbox_b.wait_for(4))[3:] == [Envelope("deliver", "bob", ("d2",), b"y", ts=1)]


async def test_route_entries_are_cut_within_bounds_like_sends(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    inbox = await _silent_inbox(redis, "Q")
    await _devices_at(redis, "u", d="Q|c")
    small = [b"%d" % i for i in range(ENTRY_ENVELOPES * 2 + 1)]
    big = [bytes(ENTRY_BYTES // 2 + 1) for _ in range(3)]
    long_name = "x" * 40  # a devices field past the short string form
    await redis.hset(keys.devices("v"), long_name, "Q|c")
    results = await asyncio.gather(*(a.route("u", None, None, f, 7, 1) for f in small + big),
                                   a.route("v", None, None, b"v", 8, 1))
    assert results == [1] * (len(small) + len(big) + 1)
    entries = await redis.xrange(inbox)
    assert [len(decode_entry(f)) for _, f in entries] == [ENTRY_ENVELOPES, ENTRY_ENVELOPES, 2,
                                                          1, 2]
    assert [e for _, f in entries for e in decode_entry(f)] == [
        Envelope("deliver", "u", ("d",), f, ts=7) for f in small + big
    ] + [Envelope("deliver", "v", (long_name,), b"v", ts=8)]


async def test_route_leaves_a_device_here_or_parked_to_the_caller(
    make_bp: Any, redis: Any
) -> None:
    """Nothing is queued when a device is on this worker or parked: the answer is the
    lookup's.  The same sender's later calls are not queued either, in that script run and
    in later ones, until ``resume``; another sender's are."""
    a, _ = await make_bp("A")
    inbox = await _silent_inbox(redis, "Q")
    await _devices_at(redis, "carol", c1="A|x", c2="Q|y")
    await _devices_at(redis, "dave", d1=_parked("z"), d2="Q|w")
    await _devices_at(redis, "erin", e1="Q|v")
    carol, dave, erin_1, erin_2 = await asyncio.gather(
        a.route("carol", None, None, b"1", 1, 1),
        a.route("dave", None, None, b"2", 1, 2),
        a.route("erin", None, None, b"3", 1, 1),  # after sender 1's first: not queued
        a.route("erin", None, None, b"4", 1, 3),
    )
    assert carol == {"c1": Location("A", "x"), "c2": Location("Q", "y")}
    assert dave == {"d1": Location(PARKED, "z"), "d2": Location("Q", "w")}
    assert erin_1 == {"e1": Location("Q", "v")} and erin_2 == 1
    entries = await redis.xrange(inbox)
    assert [e.frame for _, f in entries for e in decode_entry(f)] == [b"4"]
    # held back in a later round too, until the sender has nothing in flight
    assert await a.route("erin", None, None, b"5", 1, 1) == {"e1": Location("Q", "v")}
    assert await a.route("erin", None, None, b"6", 1, 3) == 1
    a.resume(1)
    assert await a.route("erin", None, None, b"7", 1, 1) == 1
    # the device here is not a target: the rest is queued
    assert await a.route("carol", "c2", None, b"8", 1, 1) == 1
    assert await a.route("carol", None, "c1", b"9", 1, 1) == 1
    entries = await redis.xrange(inbox)
    assert [e.frame for _, f in entries for e in decode_entry(f)] == [
        b"4", b"6", b"7", b"8", b"9"]


async def test_route_counts_no_device_for_a_gone_worker_or_nobody(
    make_bp: Any, redis: Any
) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await _devices_at(redis, "bob", d1="ghost|c1", d2="B|c2")  # ghost: alive, no inbox
    assert await a.route("bob", None, None, b"x", 1, 1) == 1
    assert await a.route("bob", "d1", None, b"y", 1, 1) == 0
    assert await a.route("nobody", None, None, b"z", 1, 1) == 0
    assert await a.route("bob", "d9", None, b"z", 1, 1) == 0
    assert [e.frame for e in await inbox_b.wait_for(1)] == [b"x"]
    assert not await redis.exists(keys.inbox("ghost"))


async def test_route_of_a_one_device_user_takes_the_general_path_unless_it_is_queued(
    make_bp: Any, redis: Any
) -> None:
    """The script's shortcut for a user with one device queues only a live device on
    another live worker; every other case answers as with several devices."""
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await _devices_at(redis, "ghosted", g="ghost|c1")  # alive, no inbox
    await _devices_at(redis, "here", h="A|c2")
    await _devices_at(redis, "bob", b="B|c3")
    await redis.hset(keys.devices("dead"), "d", "D|c4")  # no liveness key
    await _devices_at(redis, "parked", p=_parked("c5"))
    assert await a.route("ghosted", None, None, b"1", 1, 1) == 0
    assert await a.route("here", None, None, b"2", 1, 2) == {"h": Location("A", "c2")}
    assert await a.route("dead", None, None, b"3", 1, 3) == 0
    assert await a.route("parked", None, None, b"4", 1, 4) == {"p": Location(PARKED, "c5")}
    assert await a.route("bob", None, "b", b"5", 1, 5) == 0
    assert await a.route("bob", "x", None, b"6", 1, 5) == 0
    assert await a.route("bob", "b", None, b"7", 1, 5) == 1
    assert await a.route("bob", None, None, b"8", 1, 5) == 1
    assert [e.frame for e in await inbox_b.wait_for(2)] == [b"7", b"8"]


async def test_route_runs_again_when_redis_forgot_its_script(make_bp: Any, redis: Any) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await _devices_at(redis, "bob", d1="B|c1")
    assert await a.route("bob", None, None, b"1", 1, 1) == 1
    await redis.script_flush()  # a restart without persistence
    assert await asyncio.gather(a.route("bob", None, None, b"2", 2, 1),
                                a.route("bob", "d1", None, b"3", 3, 2)) == [1, 1]
    assert [e.frame for e in await inbox_b.wait_for(3)] == [b"1", b"2", b"3"]


async def test_a_route_run_again_is_not_overtaken_by_the_next_round_trip(
    make_bp: Any, redis: Any
) -> None:
    """NOSCRIPT (a restart, or a worker's first calls): the call runs again ahead of the
    routes submitted while it was out, so a sender's messages keep their order in the
    recipient's inbox and in their outcomes; its later ones are held back meanwhile."""
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await _devices_at(redis, "bob", d1="B|c1")
    assert await a.route("bob", None, None, b"0", 1, 7) == 1
    await redis.script_flush()
    outcomes: list[Any] = []
    a.route_then("bob", None, None, b"1", 1, 7, lambda o: outcomes.append((1, o)))
    for _ in range(3):  # the round trip goes (and comes back NOSCRIPT)
        await asyncio.sleep(0)
    a.route_then("bob", None, None, b"2", 2, 7, lambda o: outcomes.append((2, o)))
    a.route_then("bob", None, None, b"3", 3, 7, lambda o: outcomes.append((3, o)))
    got = await inbox_b.wait_for(2)
    await asyncio.sleep(0.05)
    # 1 was run again first; 2 and 3 came back as devices to deliver (held back), in order
    assert [e.frame for e in got] == [b"0", b"1"]
    assert [n for n, _ in outcomes] == [1, 2, 3]
    assert outcomes[0][1] == 1
    assert outcomes[1][1] == outcomes[2][1] == {"d1": Location("B", "c1")}
    a.resume(7)
    assert await a.route("bob", None, None, b"4", 4, 7) == 1  # queued in one step again


async def test_route_then_tells_each_caller_even_after_one_callback_failed(
    make_bp: Any, redis: Any
) -> None:
    a, _ = await make_bp("A")
    _, inbox_b = await make_bp("B")
    await _devices_at(redis, "bob", d1="B|c1")
    await _devices_at(redis, "carol", c1="A|c2")
    got: list[Any] = []

    def broken(outcome: Any) -> None:
        raise RuntimeError("a caller's bug")

    a.route_then("bob", None, None, b"1", 1, 1, broken)
    a.route_then("carol", None, None, b"2", 1, 2, got.append)
    a.route_then("bob", None, None, b"3", 1, 3, got.append)
    await inbox_b.wait_for(2)
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    assert got == [{"c1": Location("A", "c2")}, 1]
    await a.close()
    a.route_then("bob", None, None, b"4", 1, 4, got.append)
    await asyncio.sleep(0)
    assert isinstance(got[-1], ConnectionError)


async def test_route_after_close_fails(make_bp: Any) -> None:
    a, _ = await make_bp("A")
    await a.close()
    with pytest.raises(ConnectionError):
        await a.route("bob", None, None, b"x", 1, 1)


async def test_keep_first_puts_frames_ahead_of_those_kept_within_the_bound(
    make_bp: Any, redis: Any
) -> None:
    a, _ = await make_bp("A", keep_max=4)
    await _devices_at(redis, "u", d=_parked("c"), e="A|x")
    assert await a.keep("u", "d", b"k1")
    assert await a.keep_first("u", "d", [b"h1", b"h2"])
    assert await redis.lrange(keys.kept("u", "d"), 0, -1) == [b"h1", b"h2", b"k1"]
    assert await a.keep_first("u", "d", [b"g1", b"g2"])  # over the bound: oldest go
    assert await redis.lrange(keys.kept("u", "d"), 0, -1) == [b"g2", b"h1", b"h2", b"k1"]
    assert 0 < await redis.ttl(keys.kept("u", "d")) <= 10
    # not parked (live, or unknown): refused, nothing written
    assert not await a.keep_first("u", "e", [b"z"])
    assert not await a.keep_first("u", "nobody", [b"z"])
    assert not await redis.exists(keys.kept("u", "e"), keys.kept("u", "nobody"))


def test_the_commands_made_once_are_those_packed_from_their_arguments() -> None:
    """``_Made``'s prebuilt reads, acknowledgements and the route call's head are byte for
    byte what ``pack`` makes of the commands written out (so Redis sees no difference)."""
    made = _Made("n1", "f" * 40, 10000, 512, 1000)
    inbox = keys.inbox("n1")
    head = ["XREADGROUP", "GROUP", keys.GROUP, keys.CONSUMER, "COUNT", 512]
    assert pack([made.read_block]) == pack([[*head, "BLOCK", 1000, "STREAMS", inbox, ">"]])
    assert pack([made.read_now]) == pack([[*head, "STREAMS", inbox, ">"]])
    cases = [([b"1700000000000-7"], "1700000000000-8"),
             (["1700000000000-7", "1700000000001-0"], "1700000000001-1")]
    for ids, above in cases:
        assert pack([made.xack(ids), made.xtrim(ids[-1])]) == pack([
            ["XACK", inbox, keys.GROUP, *ids], ["XTRIM", inbox, "MINID", "~", above]])
    count = 3
    assert made.evalsha + b"$1\r\n3\r\n" == pack([["EVALSHA", "f" * 40, count]])[4:]
