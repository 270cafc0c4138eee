"""The router and the hub on the Redis backends: round trips of the shared lane, and a
park racing the messages on their way to the parked device."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from service.auth import Identity
from service.backends import keys
from service.config import Settings
from service.core.contracts import Location
from service.core.session import Session
from service.runtime import Runtime
from tests.support import gate_park


def _runtime(redis_url: str, rate: str = "1/minute") -> Runtime:
    return Runtime.build(
        Settings.from_env({"JWT_SECRET": "s" * 40, "REDIS_URL": redis_url,
                           "RATE_LIMIT": rate})
    )


@contextlib.asynccontextmanager
async def _two_workers(redis_url: str, rate: str = "1/minute") -> AsyncIterator[
        tuple[Runtime, Runtime]]:
    """Two workers on the same Redis, started, and closed afterwards."""
    a, b = _runtime(redis_url, rate), _runtime(redis_url, rate)
    try:
        await a.start()
        await b.start()
        yield a, b
    finally:
        await a.close()
        await b.close()


def _session(rt: Runtime, user: str, device: str) -> Session:
    return Session(
        Identity(user, device, 2_000_000_000),
        Location(rt.node_id, f"{rt.node_id}.{user}.{device}"),
        lambda code, reason: None,
    )


def _frames(session: Session) -> list[dict[str, Any]]:
    return [json.loads(f) for f in session.outbox]


def _taken_from(session: Session) -> list[dict[str, Any]]:
    return [json.loads(f) for f in session.take()]


async def _send(rt: Runtime, session: Session, msg: dict[str, Any]) -> None:
    """What the edge does with one frame read alone in its tick."""
    admission = rt.limiter.admit(session.user_id)
    await rt.router.handle(session, json.dumps(msg), admission, counted=True)


async def test_a_lone_message_looks_up_its_recipient_with_the_limiter(redis_url: str) -> None:
    """A message that waits for the cluster-wide limiter has its recipient looked up in
    the same round trip: limiter + lookup, then the stream write (2 round trips, not 3)."""
    async with _two_workers(redis_url) as (a, b):
        alice = _session(a, "alice", "phone")
        bob = _session(b, "bob", "laptop")
        await a.hub.connect(alice)
        await b.hub.connect(bob)
        # the first message loads the scripts into Redis (NOSCRIPT, SCRIPT LOAD, again)
        carol = _session(a, "carol", "tablet")
        await a.hub.connect(carol)
        await _send(a, carol, {"type": "offer", "to": "bob", "payload": {}})
        lane = a.limiter._lane  # type: ignore[attr-defined]
        before = lane.round_trips
        await _send(a, alice, {"type": "offer", "to": "bob", "payload": {"sdp": "x"}, "id": "1"})
        assert lane.round_trips - before == 2
        for _ in range(200):
            if sum(f["type"] == "offer" for f in _frames(bob)) == 2:
                break
            await asyncio.sleep(0.01)
        assert [f["from"] for f in _frames(bob) if f["type"] == "offer"] == ["carol", "alice"]
        assert _frames(alice)[-1] == {"type": "ack", "id": "1", "devices": 1}

        # refused by the limiter (1/minute): the lookup started with it is dropped
        # quietly, and the message goes nowhere
        await _send(a, alice, {"type": "offer", "to": "bob", "payload": {}, "id": "2"})
        assert _frames(alice)[-1]["code"] == "rate_limited"
        await asyncio.sleep(0.1)
        assert sum(f["type"] == "offer" for f in _frames(bob)) == 2


async def test_an_admitted_message_is_looked_up_and_queued_in_one_round_trip(
    redis_url: str,
) -> None:
    """Admitted already (a lease, or a batch's answer): one round trip for the lookup and
    the stream write together; a recipient with a device on the sender's worker takes the
    lookup's round trip and then the write's."""
    async with _two_workers(redis_url) as (a, b):
        alice = _session(a, "alice", "phone")
        bob = _session(b, "bob", "laptop")
        carol_here, carol_there = _session(a, "carol", "c1"), _session(b, "carol", "c2")
        for rt, s in ((a, alice), (b, bob), (a, carol_here), (b, carol_there)):
            await rt.hub.connect(s)
        lane = a.limiter._lane  # type: ignore[attr-defined]

        async def admitted(msg: dict[str, Any]) -> int:
            before = lane.round_trips
            await a.router.handle(alice, json.dumps(msg), None, counted=True)
            return int(lane.round_trips - before)

        await admitted({"type": "offer", "to": "nobody", "payload": {}})  # loads the script
        assert await admitted({"type": "offer", "to": "bob", "payload": 1, "id": "1"}) == 1
        assert _frames(alice)[-1] == {"type": "ack", "id": "1", "devices": 1}
        assert await admitted({"type": "offer", "to": "carol", "payload": 2, "id": "2"}) == 2
        assert _frames(alice)[-1] == {"type": "ack", "id": "2", "devices": 2}
        assert [f["payload"] for f in _frames(carol_here)] == [2]
        for _ in range(200):
            if _frames(bob) and _frames(carol_there):
                break
            await asyncio.sleep(0.01)
        assert [f["payload"] for f in _frames(bob) if f["type"] == "offer"] == [1]
        assert [f["payload"] for f in _frames(carol_there) if f["type"] == "offer"] == [2]


async def test_leased_messages_start_in_the_read_callback_in_one_round_trip(
    redis_url: str,
) -> None:
    """Once a lease covers the sender, ``handle_now`` starts its messages itself, one after
    the other without waiting: they share one lane round trip, the acks come from its
    callback in order, and nothing is in flight afterwards."""
    async with _two_workers(redis_url, "1000/second") as (a, b):
        alice, bob = _session(a, "alice", "phone"), _session(b, "bob", "laptop")
        await a.hub.connect(alice)
        await b.hub.connect(bob)
        frame = b'{"type":"offer","to":"bob","payload":%d,"id":"%d"}'
        for i in range(2):  # two acquisitions: the second takes a lease ahead
            assert a.router.handle_now(alice, frame % (i, i)) is False
            await _send(a, alice, json.loads(frame % (i, i)))
        lane = a.limiter._lane  # type: ignore[attr-defined]
        before = lane.round_trips
        assert a.router.handle_now(alice, frame % (2, 2)) is True
        assert a.router.handle_now(alice, frame % (3, 3)) is True  # no wait
        assert alice.inflight == 2
        for _ in range(200):
            if not alice.inflight:
                break
            await asyncio.sleep(0.01)
        assert alice.inflight == 0 and lane.round_trips - before == 1
        assert [f["id"] for f in _frames(alice) if f["type"] == "ack"] == ["0", "1", "2", "3"]
        for _ in range(200):
            if len(_frames(bob)) >= 4:
                break
            await asyncio.sleep(0.01)
        assert [f["payload"] for f in _frames(bob) if f["type"] == "offer"] == [0, 1, 2, 3]


async def _read_everything(redis: Any, node: str) -> None:
    """Until worker ``node`` has read every entry of its inbox."""
    inbox = keys.inbox(node)
    for _ in range(500):
        last = (await redis.xinfo_stream(inbox))["last-generated-id"]
        group = (await redis.xinfo_groups(inbox))[0]
        if group["last-delivered-id"] == last:
            return
        await asyncio.sleep(0.01)


async def _kept(redis: Any, user: str, device: str, n: int) -> None:
    """Until ``n`` frames are kept for the device (or 5 s have passed)."""
    for _ in range(500):
        if await redis.llen(keys.kept(user, device)) >= n:
            return
        await asyncio.sleep(0.01)


async def test_messages_routed_to_a_worker_while_it_parks_the_device_are_kept_in_order(
    redis_url: str, redis: Any
) -> None:
    """The store says "live on A" until A's park lands: a message routed meanwhile is
    queued to A's inbox and acked.  A holds it, and once the marker it queued to itself
    after the park comes back, keeps it ahead of what senders kept since.  Before, A found
    no session and dropped it."""
    async with _two_workers(redis_url, "1000/second") as (a, b):
        # users of their own: the limiter's counts in Redis outlive the tests above
        alice = _session(b, "pia", "phone")
        bob = _session(a, "rex", "laptop")
        await b.hub.connect(alice)
        await a.hub.connect(bob)
        gate = gate_park(a.hub)
        parking = asyncio.create_task(a.hub.disconnect(bob, park=True))
        await _send(b, alice, {"type": "offer", "to": "rex", "payload": 1, "id": "m1"})
        await _read_everything(redis, a.node_id)  # m1 reached A, after the session left
        gate.set()
        await parking
        await _send(b, alice, {"type": "offer", "to": "rex", "payload": 2, "id": "m2"})
        await _kept(redis, "rex", "laptop", 2)
        assert [f.get("devices") for f in _taken_from(alice)] == [1, 1]
        bob2 = _session(b, "rex", "laptop")
        assert await b.hub.connect(bob2, lambda resumed, missed: json.dumps(
            {"type": "welcome", "resumed": resumed, "missed": missed}).encode()) is True
        got = _taken_from(bob2)
        assert got[0] == {"type": "welcome", "resumed": True, "missed": 2}
        assert [f["payload"] for f in got[1:]] == [1, 2]
