"""Frames read together (``Router.handle_batch``): direct messages pipelined, deliveries and
replies in the frames' order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.core.conftest import frames, settle


def batch(*msgs: dict[str, Any] | bytes) -> list[tuple[bool, bytes]]:
    return [(False, m) if isinstance(m, bytes) else (True, json.dumps(m).encode()) for m in msgs]


async def test_a_mixed_batch_keeps_deliveries_and_replies_in_order(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    carol_here = await a.connect("carol", "c1")
    carol_there = await b.connect("carol", "c2")
    frames_in = batch(
        {"type": "offer", "to": "bob", "payload": 1, "id": "m1"},
        {"type": "candidate", "to": "bob", "payload": 2, "id": "m2"},
        {"type": "ping", "id": "p"},
        {"type": "candidate", "to": "carol", "payload": 3, "id": "m3"},
        {"type": "candidate", "to": "nobody", "payload": 4, "id": "m4"},
        b"\x00binary",
        {"type": "candidate", "to": "bob", "payload": 5},  # no id: no ack
        {"type": "bye", "to": "bob", "payload": 6, "id": "m6"},
    )
    await a.router.handle_batch(alice, frames_in, [None] * len(frames_in))
    await settle()
    assert [f["payload"] for f in frames(bob)] == [1, 2, 5, 6]
    assert [f["payload"] for f in frames(carol_here)] == [3]
    assert [f["payload"] for f in frames(carol_there)] == [3]
    replies = [(f["type"], f.get("id"), f.get("devices", f.get("code"))) for f in frames(alice)]
    assert replies == [
        ("ack", "m1", 1), ("ack", "m2", 1), ("pong", "p", None), ("ack", "m3", 2),
        ("error", "m4", "peer_offline"), ("error", None, "bad_frame"), ("ack", "m6", 1),
    ]


async def test_a_batch_routes_every_message_before_the_first_ack(make_node):
    """Three messages to another worker: all three are looked up and queued in one step
    each, all at once (one round trip on Redis), then the acks follow in order."""
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    real_route = a.hub.backplane.route
    gates: list[tuple[asyncio.Future[Any], tuple[Any, ...]]] = []

    def gated(*args: Any) -> asyncio.Future[Any]:
        gate: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        gates.append((gate, args))
        return gate

    a.hub.backplane.route = gated  # type: ignore[method-assign]
    frames_in = batch(*({"type": "candidate", "to": "bob", "payload": i, "id": f"m{i}"}
                        for i in range(3)))
    task = asyncio.ensure_future(a.router.handle_batch(alice, frames_in, [None] * 3))
    await settle()
    assert len(gates) == 3 and frames(alice) == [] and not task.done()
    assert [json.loads(args[3])["payload"] for _, args in gates] == [0, 1, 2]
    for gate, args in reversed(gates):  # answered out of order: acks still in order
        gate.set_result(await real_route(*args))
    await task
    await settle()
    assert [f["id"] for f in frames(alice)] == ["m2", "m1", "m0"][::-1]
    assert sorted(f["payload"] for f in frames(bob)) == [0, 1, 2]


async def test_after_a_message_not_routed_the_senders_next_ones_are_not_either(make_node):
    """carol has a device here and one on B: the first message is not routed (its local
    delivery and its envelope follow the lookup).  The second, for her device on B only,
    would be routed at once and overtake the first there: it waits its turn."""
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    await a.connect("carol", "c1")
    carol_there = await b.connect("carol", "c2")
    frames_in = batch(
        {"type": "candidate", "to": "carol", "payload": 1, "id": "m1"},
        {"type": "candidate", "to": "carol", "to_device": "c2", "payload": 2, "id": "m2"},
    )
    await a.router.handle_batch(alice, frames_in, [None] * 2)
    await settle()
    assert [f["payload"] for f in frames(carol_there)] == [1, 2]
    assert [(f["id"], f["devices"]) for f in frames(alice)] == [("m1", 2), ("m2", 1)]


async def test_a_batch_queues_every_envelope_before_the_first_ack(make_node):
    """Three messages for a user with a device here and one on another worker (not
    routed in one step): all three envelopes are queued at once (one round trip on Redis),
    then the acks follow in order as the writes are confirmed."""
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob_here = await a.connect("bob", "b0")
    bob = await b.connect("bob", "b1")
    real_send = a.hub.backplane.send
    gates: list[tuple[asyncio.Future[bool], Any]] = []

    def gated(node: str, envelope: Any) -> asyncio.Future[bool]:
        gate: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        gates.append((gate, (node, envelope)))
        return gate

    a.hub.backplane.send = gated  # type: ignore[method-assign]
    frames_in = batch(*({"type": "candidate", "to": "bob", "payload": i, "id": f"m{i}"}
                        for i in range(3)))
    task = asyncio.ensure_future(a.router.handle_batch(alice, frames_in, [None] * 3))
    await settle()
    assert len(gates) == 3  # one at a time, only the first would be queued
    assert [env.frame for _, (_, env) in gates] == sorted(env.frame for _, (_, env) in gates)
    assert frames(alice) == [] and not task.done()
    for gate, (node, envelope) in gates:
        gate.set_result(await real_send(node, envelope))
    await task
    await settle()
    assert [f["id"] for f in frames(alice)] == ["m0", "m1", "m2"]
    assert [f["payload"] for f in frames(bob)] == [0, 1, 2]
    assert [f["payload"] for f in frames(bob_here)] == [0, 1, 2]


async def test_a_refusal_in_a_batch_is_answered_in_its_place(make_node):
    a, b = await make_node("A", rate="2/minute"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    frames_in = batch(*({"type": "candidate", "to": "bob", "payload": i, "id": f"m{i}"}
                        for i in range(4)))
    admissions = [a.router.limiter.admit("alice") for _ in frames_in]
    await a.router.handle_batch(alice, frames_in, admissions)
    await settle()
    assert [f["payload"] for f in frames(bob)] == [0, 1]
    replies = [(f["type"], f["id"], f.get("code")) for f in frames(alice)]
    assert replies == [("ack", "m0", None), ("ack", "m1", None),
                       ("error", "m2", "rate_limited"), ("error", "m3", "rate_limited")]


async def test_a_failed_envelope_is_answered_in_its_place(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    await b.connect("bob", "b1")
    calls = 0
    real_route = a.hub.backplane.route

    def flaky(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(ConnectionError("backplane down"))
            return failed
        return real_route(*args)

    a.hub.backplane.route = flaky  # type: ignore[method-assign]
    frames_in = batch(*({"type": "candidate", "to": "bob", "payload": i, "id": f"m{i}"}
                        for i in range(3)))
    await a.router.handle_batch(alice, frames_in, [None] * 3)
    await settle()
    replies = [(f["type"], f["id"], f.get("code")) for f in frames(alice)]
    assert replies == [("ack", "m0", None), ("error", "m1", "internal"), ("ack", "m2", None)]


async def test_a_closed_session_stops_the_batch_and_leaves_nothing_pending(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    alice.close(1000, "bye")
    frames_in = batch(*({"type": "candidate", "to": "bob", "payload": i, "id": f"m{i}"}
                        for i in range(3)))
    await a.router.handle_batch(alice, frames_in, [None] * 3)
    await settle()
    assert frames(bob) == []
