"""The Redis Streams backplane against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.backends import keys
from service.backends.redis_backplane import (
    ENTRY_BYTES,
    ENTRY_ENVELOPES,
    RedisBackplane,
    decode_entry,
    encode_batch,
    encode_envelope,
)
from service.backends.redis_client import make_client
from service.core.contracts import Envelope


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
