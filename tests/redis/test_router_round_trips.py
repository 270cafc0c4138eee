"""The router on the Redis backends, counted in round trips of the shared lane."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from service.auth import Identity
from service.config import Settings
from service.core.contracts import Location
from service.core.session import Session
from service.runtime import Runtime


def _runtime(redis_url: str) -> Runtime:
    return Runtime.build(
        Settings.from_env({"JWT_SECRET": "s" * 40, "REDIS_URL": redis_url,
                           "RATE_LIMIT": "1/minute"})
    )


def _session(rt: Runtime, user: str, device: str) -> Session:
    return Session(
        Identity(user, device, 2_000_000_000),
        Location(rt.node_id, f"{rt.node_id}.{user}.{device}"),
        lambda code, reason: None,
    )


def _frames(session: Session) -> list[dict[str, Any]]:
    return [json.loads(f) for f in session.outbox]


async def _send(rt: Runtime, session: Session, msg: dict[str, Any]) -> None:
    """What the edge does with one frame read alone in its tick."""
    admission = rt.limiter.admit(session.user_id)
    await rt.router.handle(session, json.dumps(msg), admission, counted=True)


async def test_a_lone_message_looks_up_its_recipient_with_the_limiter(redis_url: str) -> None:
    """A message that waits for the cluster-wide limiter has its recipient looked up in
    the same round trip: limiter + lookup, then the stream write (2 round trips, not 3)."""
    a, b = _runtime(redis_url), _runtime(redis_url)
    try:
        await a.start()
        await b.start()
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
    finally:
        await a.close()
        await b.close()


async def test_an_admitted_message_is_looked_up_and_queued_in_one_round_trip(
    redis_url: str,
) -> None:
    """Admitted already (a lease, or a batch's answer): one round trip for the lookup and
    the stream write together; a recipient with a device on the sender's worker takes the
    lookup's round trip and then the write's."""
    a, b = _runtime(redis_url), _runtime(redis_url)
    try:
        await a.start()
        await b.start()
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
    finally:
        await a.close()
        await b.close()


async def test_leased_messages_start_in_the_read_callback_in_one_round_trip(
    redis_url: str,
) -> None:
    """Once a lease covers the sender, ``handle_now`` starts its messages itself, one after
    the other without waiting: they share one lane round trip, the acks come from its
    callback in order, and nothing is in flight afterwards."""
    settings = {"JWT_SECRET": "s" * 40, "REDIS_URL": redis_url, "RATE_LIMIT": "1000/second"}
    a, b = (Runtime.build(Settings.from_env(settings)) for _ in range(2))
    try:
        await a.start()
        await b.start()
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
    finally:
        await a.close()
        await b.close()
