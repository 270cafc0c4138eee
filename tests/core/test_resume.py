"""Resume (§10) and takeover on the in-memory twins: no sockets, a fake clock."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.core.conftest import Node, frames, settle
from tests.support import gate_park


def welcome(resumed: bool, missed: int) -> bytes:
    return json.dumps({"type": "welcome", "resumed": resumed, "missed": missed}).encode()


async def test_parked_device_gets_kept_messages_in_order_on_another_worker(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    carol = await b.connect("carol", "c1")
    await a.send(bob, type="subscribe", room="r")
    await b.send(carol, type="subscribe", room="r")
    frames(bob), frames(carol)
    await a.hub.disconnect(bob, park=True)
    for i in range(3):
        await a.send(alice, type="offer", to="bob", payload=i, id=f"m{i}")
    assert [f["devices"] for f in frames(alice)] == [1, 1, 1]
    await a.send(alice, type="presence", users=["bob"])
    assert frames(alice)[0]["users"]["bob"] == {"online": True, "devices": ["b1"]}
    assert frames(carol) == []  # no `left`
    bob2 = Node.session(b, "bob", "b1")
    assert await b.hub.connect(bob2, welcome) is True
    got = frames(bob2)
    assert got[0] == {"type": "welcome", "resumed": True, "missed": 3}
    assert [f["payload"] for f in got[1:]] == [0, 1, 2]
    await b.send(carol, type="publish", room="r", payload="hi")
    assert frames(bob2)[0]["payload"] == "hi"
    assert all(f["type"] not in ("joined", "left") for f in frames(carol))


async def test_clean_disconnect_is_not_resumable(make_node):
    a = await make_node("A")
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    await a.hub.disconnect(bob)
    await a.send(alice, type="offer", to="bob", id="x")
    assert frames(alice)[0]["code"] == "peer_offline"
    again = Node.session(a, "bob", "b1")
    assert await a.hub.connect(again, welcome) is False
    assert frames(again) == [{"type": "welcome", "resumed": False, "missed": 0}]


async def test_window_expiry_reports_left_and_offline(make_node, clock):
    a = await make_node("A")
    w = await a.connect("w", "w1")
    bob = await a.connect("bob", "b1")
    await a.send(w, type="watch", users=["bob"])
    await a.send(w, type="subscribe", room="r")
    await a.send(bob, type="subscribe", room="r")
    frames(w)
    await a.hub.disconnect(bob, park=True)
    await settle()
    assert frames(w) == []  # still online, still in the room
    clock.t += 31  # the hub parks for RESUME_WINDOW (30 s by default)
    await a.hub.beat()
    await settle()
    got = frames(w)
    assert {"type": "left", "room": "r", "user_id": "bob", "device_id": "b1"} in got
    assert {"type": "presence_changed", "user_id": "bob", "online": False,
            "devices": []} in got
    again = Node.session(a, "bob", "b1")
    assert await a.hub.connect(again, welcome) is False


async def test_kept_messages_are_bounded_oldest_dropped(make_node, cluster):
    cluster.resume_max_messages = 2
    a = await make_node("A")
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    await a.hub.disconnect(bob, park=True)
    for i in range(4):
        await a.send(alice, type="candidate", to="bob", payload=i)
    again = Node.session(a, "bob", "b1")
    await a.hub.connect(again, welcome)
    got = frames(again)
    assert got[0]["missed"] == 2 and [f["payload"] for f in got[1:]] == [2, 3]


async def test_takeover_leaves_rooms_before_the_new_connection_joins(make_node):
    a, b = await make_node("A"), await make_node("B")
    old = await a.connect("u", "d")
    peer = await b.connect("p", "p1")
    await a.send(old, type="subscribe", room="r")
    await b.send(peer, type="subscribe", room="r")
    frames(peer)
    new = await b.connect("u", "d")
    await b.send(new, type="subscribe", room="r")
    await settle()
    events = [(f["type"], f["user_id"]) for f in frames(peer)]
    assert events == [("left", "u"), ("joined", "u")]
    assert old.closed and old.close_code == 4009
    await a.hub.disconnect(old)  # the old one's cleanup changes nothing for the new one
    await settle()
    assert frames(peer) == []
    assert ("u", "d") in await b.hub.presence.members("r")


async def test_replaced_connection_leaves_its_rooms_to_the_new_one(make_node):
    """The old connection's cleanup may run before the takeover's eviction (kick answered,
    socket closing): it must not send ``left`` itself, since that could overtake the new
    connection's ``joined`` on the way to a peer on another worker."""
    a, b = await make_node("A"), await make_node("B")
    old = await a.connect("u", "d")
    peer = await b.connect("p", "p1")
    await a.send(old, type="subscribe", room="r")
    await b.send(peer, type="subscribe", room="r")
    frames(peer)
    # B's eviction waits for this gate after A answered the kick: the cleanup below runs
    # first whatever the interpreter's scheduling (3.12+ reach the eviction in fewer hops)
    gate = asyncio.Event()
    answers_kick = b.hub._answers_kick

    async def answered_then_held(*args: Any) -> bool:
        answered = await answers_kick(*args)
        await gate.wait()
        return answered

    b.hub._answers_kick = answered_then_held  # type: ignore[method-assign]
    new = Node.session(b, "u", "d")
    connecting = asyncio.create_task(b.hub.connect(new, welcome))
    while not old.closed:  # the kick reaches worker A
        await asyncio.sleep(0)
    assert old.close_code == 4009
    await a.hub.disconnect(old)  # ... whose cleanup runs before B's eviction
    await settle()
    assert frames(peer) == []
    assert ("u", "d") in await b.hub.presence.members("r")  # left for the evictor
    gate.set()
    assert await connecting is False
    await b.send(new, type="subscribe", room="r")
    await settle()
    assert [(f["type"], f["user_id"]) for f in frames(peer)] == [("left", "u"), ("joined", "u")]


async def test_closed_as_replaced_but_not_taken_over_still_leaves(make_node):
    """Without a newer claim on the device, the cleanup leaves the rooms itself."""
    a = await make_node("A")
    old = await a.connect("u", "d")
    peer = await a.connect("p", "p1")
    await a.send(old, type="subscribe", room="r")
    await a.send(peer, type="subscribe", room="r")
    frames(peer)
    old.close(4009, "replaced")
    await a.hub.disconnect(old)
    await settle()
    assert [(f["type"], f["user_id"]) for f in frames(peer)] == [("left", "u")]
    assert ("u", "d") not in await a.hub.presence.members("r")


async def test_a_message_for_a_device_claimed_but_not_yet_registered_here_is_held(make_node):
    """The store says the device is live on this worker a moment before the worker's own
    connect has the answer: a message routed to it then waits with the live traffic,
    behind the welcome (it used to find no session and answer ``peer_offline``)."""
    a = await make_node("A")
    sender = await a.connect("s", "s1")
    gate = asyncio.Event()
    claim = a.hub.presence.claim

    async def claimed_then_held(*args: Any) -> Any:
        answer = await claim(*args)  # the store: live on A
        await gate.wait()  # ... and A's connect has not resumed yet
        return answer

    a.hub.presence.claim = claimed_then_held  # type: ignore[method-assign]
    new = Node.session(a, "u", "d")
    connecting = asyncio.create_task(a.hub.connect(new, welcome))
    await settle()
    await a.send(sender, type="offer", to="u", payload={"sdp": "x"}, id="m1")
    assert frames(sender) == [{"type": "ack", "id": "m1", "devices": 1}]
    gate.set()
    await connecting
    assert [f["type"] for f in frames(new)] == ["welcome", "offer"]


def _marker_gate(cluster: Any, name: str) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """Node ``name`` reads its ``parked`` markers only once the event is set (await the
    task after setting it)."""
    gate, late = asyncio.Event(), []
    sink = cluster.sinks[name]

    def gated(env: Any) -> None:
        if env.kind == "parked" and not gate.is_set():
            late.append(env)
        else:
            sink(env)

    async def release() -> None:
        await gate.wait()
        for env in late:
            sink(env)

    cluster.sinks[name] = gated
    return gate, asyncio.create_task(release())


async def test_messages_routed_while_the_device_is_being_parked_are_kept_in_order(
    make_node, cluster
):
    """A drop is seen, the session is gone from its worker, and the store still says "live
    there" until the park lands: what is routed to that worker meanwhile (from another
    worker, or from its own) is kept, ahead of what senders keep once the park landed, even
    when those come before the worker has read back all it held.  It used to be acked
    and dropped, or answered ``peer_offline``."""
    a, b = await make_node("A"), await make_node("B")
    alice = await b.connect("alice", "a1")
    local = await a.connect("lo", "l1")
    bob = await a.connect("bob", "b1")
    park_gate = gate_park(a.hub)
    marker_gate, released = _marker_gate(cluster, "A")
    parking = asyncio.create_task(a.hub.disconnect(bob, park=True))
    await settle()
    await b.send(alice, type="offer", to="bob", payload=1, id="m1")
    await a.send(local, type="offer", to="bob", payload=2, id="m2")
    park_gate.set()
    await parking
    await b.send(alice, type="offer", to="bob", payload=3, id="m3")  # kept by the sender
    marker_gate.set()
    await released
    await settle()
    assert [f["devices"] for f in frames(alice)] == [1, 1]
    assert [f["devices"] for f in frames(local)] == [1]
    bob2 = Node.session(b, "bob", "b1")
    assert await b.hub.connect(bob2, welcome) is True
    got = frames(bob2)
    assert got[0] == {"type": "welcome", "resumed": True, "missed": 3}
    assert [f["payload"] for f in got[1:]] == [1, 2, 3]


async def test_messages_held_for_a_park_that_lost_to_a_takeover_reach_the_new_connection(
    make_node
):
    a, b = await make_node("A"), await make_node("B")
    alice = await b.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    park_gate = gate_park(a.hub)
    parking = asyncio.create_task(a.hub.disconnect(bob, park=True))
    await settle()
    await b.send(alice, type="offer", to="bob", payload=1, id="m1")
    bob2 = await b.connect("bob", "b1")  # a new connection took the device meanwhile
    park_gate.set()
    await parking
    await settle()
    assert [f["devices"] for f in frames(alice)] == [1]
    assert [f.get("payload") for f in frames(bob2)] == [1]
    assert a.hub._parking == {}


async def test_what_is_held_for_a_parking_device_is_bounded(make_node, cluster):
    cluster.resume_max_messages = 3
    a = await make_node("A", resume_max_messages=3)
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    park_gate = gate_park(a.hub)
    parking = asyncio.create_task(a.hub.disconnect(bob, park=True))
    await settle()
    for i in range(5):
        await a.send(alice, type="offer", to="bob", payload=i)
    assert len(a.hub._parking[("bob", "b1")][1]) == 3
    park_gate.set()
    await parking
    await settle()
    bob2 = Node.session(a, "bob", "b1")
    assert await a.hub.connect(bob2, welcome) is True
    assert [f["payload"] for f in frames(bob2)[1:]] == [2, 3, 4]


async def test_frames_held_for_a_parking_device_are_kept_when_the_worker_stops_first(
    make_node, cluster
):
    a, b = await make_node("A"), await make_node("B")
    alice = await b.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    park_gate = gate_park(a.hub)
    _, never = _marker_gate(cluster, "A")  # the marker does not come back before the stop
    parking = asyncio.create_task(a.hub.disconnect(bob, park=True))
    await settle()
    await b.send(alice, type="offer", to="bob", payload=1, id="m1")
    park_gate.set()
    await parking
    await a.hub.close()
    assert frames(alice) == [{"type": "ack", "id": "m1", "devices": 1}]
    bob2 = Node.session(b, "bob", "b1")
    assert await b.hub.connect(bob2, welcome) is True
    assert [f.get("payload") for f in frames(bob2)] == [None, 1]
    never.cancel()
