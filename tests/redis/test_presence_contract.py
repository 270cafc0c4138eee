"""One contract suite for presence, run against the in-memory twin and real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.backends import keys
from service.backends.redis_client import make_client
from service.backends.redis_presence import REASSERT_CHUNK, REASSERT_EVERY, RedisPresence
from service.core.contracts import PARKED, Location
from service.core.memory import MemoryCluster, MemoryPresence


class Twin:
    def __init__(self, presence: Any, kill: Any, advance: Any = None) -> None:
        self.p = presence
        self.kill = kill
        self.advance = advance


@pytest.fixture(params=["memory", "redis"])
async def twin(request: pytest.FixtureRequest) -> AsyncIterator[Twin]:
    if request.param == "memory":
        now = [1000.0]
        cluster = MemoryCluster(ttl=15, clock=lambda: now[0])

        async def kill_mem(node: str) -> None:
            cluster.alive_until.pop(node, None)

        def advance(seconds: float) -> None:
            now[0] += seconds

        yield Twin(MemoryPresence(cluster), kill_mem, advance)
        return
    redis = make_client(request.getfixturevalue("redis_url"), timeout=2.0)

    async def kill_redis(node: str) -> None:
        await redis.delete(keys.node_alive(node), keys.node_seen(node))

    yield Twin(RedisPresence(redis, ttl=15), kill_redis)
    await redis.aclose()


A1, A2, B1 = Location("A", "A.1"), Location("A", "A.2"), Location("B", "B.1")


async def test_claim_locate_release(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    assert (await p.claim("u", "d1", A1, 10)).ok
    assert (await p.claim("u", "d2", B1, 10)).ok
    assert await p.locate(["u", "v"]) == {"u": {"d1": A1, "d2": B1}, "v": {}}
    await p.release("u", "d1", A1)
    assert await p.locate(["u"]) == {"u": {"d2": B1}}


async def test_lookups_of_one_tick_each_own_their_answer(twin: Twin) -> None:
    """Lookups batched together answer with dicts of their own: a caller may change its
    answer without changing another's."""
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    assert (await p.claim("u", "d1", A1, 10)).ok
    assert (await p.claim("u", "d2", B1, 10)).ok
    first, second = await asyncio.gather(p.locate(["u"]), p.locate(["u", "v"]))
    assert first == {"u": {"d1": A1, "d2": B1}}
    assert second == {"u": {"d1": A1, "d2": B1}, "v": {}}
    first["u"].pop("d1")
    first["u"]["d3"] = A2
    assert second["u"] == {"d1": A1, "d2": B1}


async def test_device_limit_counts_other_devices_only(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    assert (await p.claim("u", "d1", A1, 2)).ok
    assert (await p.claim("u", "d2", A2, 2)).ok
    third = await p.claim("u", "d3", Location("A", "A.3"), 2)
    assert not third.ok
    again = await p.claim("u", "d1", Location("A", "A.9"), 2)
    assert again.ok and again.previous == A1


async def test_release_leaves_a_newer_claim_alone(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    await p.claim("u", "d1", A1, 10)
    await p.claim("u", "d1", B1, 10)
    await p.release("u", "d1", A1)
    assert await p.locate(["u"]) == {"u": {"d1": B1}}


async def test_devices_of_a_dead_node_vanish_and_free_the_limit(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    await p.claim("u", "d1", A1, 1)
    assert not (await p.claim("u", "d2", B1, 1)).ok
    await twin.kill("A")
    assert await p.locate(["u"]) == {"u": {}}
    assert (await p.claim("u", "d2", B1, 1)).ok


async def test_one_lookup_tells_live_and_dead_workers_apart(twin: Twin) -> None:
    """A batch names the same workers again and again (Redis reads each one's state once
    per lookup): every user still gets its own worker's answer."""
    p = twin.p
    for node in ("A", "B", "C"):
        await p.heartbeat(node, [])
    C1, C2 = Location("C", "C.1"), Location("C", "C.2")
    for user, loc in (("u", A1), ("v", C1), ("w", B1), ("x", C2), ("y", A2)):
        assert (await p.claim(user, "d", loc, 10)).ok
    await twin.kill("C")
    assert await p.locate(["v", "u", "x", "w", "y"]) == {
        "u": {"d": A1}, "v": {}, "w": {"d": B1}, "x": {}, "y": {"d": A2},
    }


async def test_heartbeat_restores_lost_registrations_without_overwriting(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [("u", "d1", A1)])
    await p.heartbeat("B", [])
    await p.claim("u", "d2", B1, 10)
    # A re-asserts d1 (lost, e.g. Redis restarted) and an old claim of d2 (taken over by B)
    await p.heartbeat("A", [("u", "d1", A1), ("u", "d2", A2)])
    assert await p.locate(["u"]) == {"u": {"d1": A1, "d2": B1}}


async def test_redis_keys_have_ttls_and_no_addresses(redis: Any) -> None:
    p = RedisPresence(redis, ttl=7, resume_window=5)
    await p.heartbeat("A", [])
    await p.claim("u", "d1", A1, 10)
    await p.join("r", ("u", "d1"), A1, 10)
    # entries outlive the worker's liveness by a heartbeat lifetime plus the resume window
    assert 7 < await redis.ttl(keys.devices("u")) <= 19
    assert 0 < await redis.ttl(keys.node_alive("A")) <= 7
    assert 7 < await redis.ttl(keys.node_seen("A")) <= 12
    for key in await redis.keys("*"):
        assert await redis.ttl(key) > 0, key


async def test_rooms_join_limit_leave(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    assert await p.join("r", ("u1", "d1"), A1, 2) == {}
    assert await p.join("r", ("u2", "d2"), B1, 2) == {("u1", "d1"): A1}
    assert await p.join("r", ("u3", "d3"), A2, 2) is None
    # re-joining as a present member is allowed even when full
    assert await p.join("r", ("u1", "d1"), A1, 2) == {("u2", "d2"): B1}
    assert not await p.leave("r", ("u1", "d1"), A2)  # not that connection
    assert await p.leave("r", ("u1", "d1"), A1)
    assert await p.members("r") == {("u2", "d2"): B1}


async def test_sweep_removes_dead_entries_exactly_once(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    await p.claim("u", "d1", A1, 10)
    await p.claim("u", "d2", B1, 10)
    await p.join("r", ("u", "d1"), A1, 10)
    await p.join("r", ("v", "d"), B1, 10)
    await twin.kill("A")
    assert await p.members("r") == {("v", "d"): B1}
    first = await p.sweep(["u", "nobody"], ["r", "empty"])
    assert first == (["u"], {"r": [("u", "d1")]})
    assert await p.sweep(["u"], ["r"]) == ([], {})


async def test_watchers(twin: Twin) -> None:
    p = twin.p
    await p.watch("A", ["u", "v"])
    await p.watch("B", ["u"])
    assert await p.watchers("u") == {"A", "B"}
    await p.unwatch("A", ["u"])
    assert await p.watchers("u") == {"B"}
    assert await p.watchers("nobody") == set()
    await p.heartbeat("C", [], watched=["u"])
    assert await p.watchers("u") == {"B", "C"}


async def test_park_keeps_device_and_rooms_until_resumed(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.heartbeat("B", [])
    await p.claim("u", "d", A1, 10)
    await p.join("r", ("u", "d"), A1, 10)
    await p.join("r", ("v", "x"), B1, 10)
    assert not await p.park("u", "d", A2, 30)  # not the current connection
    assert await p.park("u", "d", A1, 30)
    parked = Location(PARKED, A1.conn)
    assert await p.locate(["u"]) == {"u": {"d": parked}}
    assert (await p.members("r"))[("u", "d")] == parked
    assert await p.rooms_of(("u", "d")) == ["r"]
    claim = await p.claim("u", "d", B1, 10)
    assert claim.ok and claim.resumed and claim.previous is not None
    assert claim.previous.conn == A1.conn
    assert await p.adopt_rooms(("u", "d"), claim.previous, B1) == ["r"]
    assert (await p.members("r"))[("u", "d")] == B1


async def test_parked_device_expires_and_is_swept(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.claim("u", "d", A1, 10)
    await p.join("r", ("u", "d"), A1, 10)
    assert await p.park("u", "d", A1, 0.05)
    await asyncio.sleep(0.1) if isinstance(p, RedisPresence) else twin.advance(1)
    assert await p.locate(["u"]) == {"u": {}}
    assert await p.sweep(["u"], ["r"]) == (["u"], {"r": [("u", "d")]})
    claim = await p.claim("u", "d", A2, 10)
    assert claim.ok and not claim.resumed


async def test_clean_release_ends_everything(twin: Twin) -> None:
    p = twin.p
    await p.heartbeat("A", [])
    await p.claim("u", "d", A1, 10)
    await p.release("u", "d", A1)
    assert (await p.claim("u", "d", A2, 10)).resumed is False


async def test_heartbeat_reasserts_after_a_restart_and_every_few_beats(redis_url: str) -> None:
    """A beat that finds its liveness key gone (Redis restarted) re-asserts everything at
    once; otherwise only every REASSERT_EVERY beats, in chunked scripts."""
    redis = make_client(redis_url, timeout=2.0)
    p = RedisPresence(redis, ttl=15)
    devices = [(f"hb{i}", "d", Location("A", f"A.{i}")) for i in range(REASSERT_CHUNK + 7)]
    rooms = [("hb-room", ("hb3", "d"), Location("A", "A.3"))]
    await p.heartbeat("A", devices, rooms, ["watched-hb"])
    assert await redis.hget(keys.devices(f"hb{REASSERT_CHUNK + 6}"), "d") == b"A|A.%d" % (
        REASSERT_CHUNK + 6
    )
    assert await redis.sismember(keys.device_rooms("hb3", "d"), "hb-room")
    assert await redis.sismember(keys.watchers("watched-hb"), "A")
    await redis.delete(keys.devices("hb1"))  # lost, but the worker looks alive: not yet
    await p.heartbeat("A", devices, rooms, ["watched-hb"])
    assert not await redis.exists(keys.devices("hb1"))
    for _ in range(REASSERT_EVERY - 1):
        await p.heartbeat("A", devices, rooms, ["watched-hb"])
    assert await redis.hget(keys.devices("hb1"), "d") == b"A|A.1"
    # a restart without persistence (only this test's keys: the server is shared)
    await redis.delete(
        keys.node_alive("A"), keys.room("hb-room"), *(keys.devices(u) for u, _, _ in devices)
    )
    await p.heartbeat("A", devices, rooms, ["watched-hb"])
    assert await redis.hget(keys.devices("hb2"), "d") == b"A|A.2"
    assert await redis.hget(keys.room("hb-room"), "hb3/d") == b"A|A.3"
    assert 0 < await redis.ttl(keys.devices("hb2")) <= p._keep
    await redis.aclose()


async def test_a_claim_after_a_redis_restart_is_not_failed_by_dead_pooled_connections() -> None:
    from tests.support import start_redis

    server = start_redis()
    try:
        redis = make_client(server.url, timeout=1.0)
        presence = RedisPresence(redis, ttl=15)
        await asyncio.gather(*(redis.ping() for _ in range(4)))  # four idle pooled
        port = server.port
        server.stop()
        server = start_redis(port=port)
        claims = await asyncio.gather(
            *(presence.claim(f"u{i}", "d", Location("n1", f"c{i}"), 10) for i in range(4))
        )
        assert all(c.ok and c.previous is None for c in claims)
        again = await presence.claim("u0", "d", Location("n1", "c0"), 10)  # what a retry sees
        assert again.ok and again.previous == Location("n1", "c0")
        await presence.close()
        await redis.aclose()
    finally:
        server.stop()


def test_decoded_locations_are_shared_and_their_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.backends import redis_presence as rp

    monkeypatch.setattr(rp, "_LOCATIONS", {})
    monkeypatch.setattr(rp, "_LOCATIONS_MAX", 4)
    for i in range(10):
        raw = f"W{i}|W{i}.c{i}".encode()
        loc = rp._location(raw)
        assert loc == Location(f"W{i}", f"W{i}.c{i}")
        assert rp._location(raw) is loc
        assert len(rp._LOCATIONS) <= 4
    assert dict(rp._pairs([b"d1", b"~|A.1|123", b"d2", b"B|B.1"])) == {
        "d1": Location(PARKED, "A.1"), "d2": Location("B", "B.1"),
    }


async def test_a_release_while_a_reassertion_is_on_its_way_stays_released(
    redis_url: str,
) -> None:
    """A device released, and a room left, while a re-assertion that still listed them is
    on its way to Redis stay gone.  Without care the re-assertion's HSETNX, landing after
    the release, brings them back for good: a phantom device on a live worker, online until
    its key expires, and no ``presence_changed`` ever said otherwise."""
    redis = make_client(redis_url, timeout=2.0)
    p = RedisPresence(redis, ttl=15)
    loc, member = Location("A", "A.late"), ("late", "d")
    await p.claim("late", "d", loc, 10)
    assert await p.join("late-room", member, loc, 10) == {}
    ended: list[asyncio.Future[bool]] = []

    def sessions() -> Any:  # the worker's sessions, read as the re-assertion is built
        yield ("late", "d", loc)
        # the connection ends right then: its release and leave reach Redis first, while
        # the re-assertion waits behind a slow command on its connection
        ended.append(asyncio.ensure_future(p.release("late", "d", loc)))
        ended.append(asyncio.ensure_future(p.leave("late-room", member, loc)))

    slow = asyncio.ensure_future(p._beat_lane.execute([["BLPOP", "late-nothing", "0.3"]]))
    await p.heartbeat("A", sessions(), [("late-room", member, loc)])  # the first: re-asserts
    assert await asyncio.gather(*ended) == [True, True]
    await slow
    assert not await redis.hexists(keys.devices("late"), "d")
    assert not await redis.hexists(keys.room("late-room"), "late/d")
    assert not await redis.sismember(keys.device_rooms("late", "d"), "late-room")
    await redis.aclose()
