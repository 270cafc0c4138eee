"""The routing rules of PROTOCOL.md §3, §5, §6, §7 on the in-memory twins: two simulated
workers sharing one MemoryCluster, no sockets, no timers."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

from service.core.contracts import Location
from tests.core.conftest import frames, settle


async def test_offer_reaches_every_device_across_workers_with_ack(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob1 = await a.connect("bob", "b1")
    bob2 = await b.connect("bob", "b2")
    await a.send(alice, type="offer", to="bob", payload={"sdp": "x"}, id="m1")
    got1, got2 = frames(bob1), frames(bob2)
    assert got1 == got2
    assert got1[0]["type"] == "offer" and got1[0]["from"] == "alice"
    assert got1[0]["from_device"] == "a1" and got1[0]["payload"] == {"sdp": "x"}
    assert got1[0]["id"] == "m1" and isinstance(got1[0]["ts"], int)
    assert frames(alice) == [{"type": "ack", "id": "m1", "devices": 2}]


async def test_payload_bytes_are_forwarded_untouched(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    raw_payload = '{ "sdp" :"v=0\\r\\n\\u00e9" ,"n":1.50e3 }'
    await a.handle(alice, '{"type":"answer","to":"bob","payload":' + raw_payload + "}")
    from tests.core.conftest import settle

    await settle()
    [frame] = bob.take()
    assert raw_payload.encode() in frame
    assert frames(alice) == []  # no id: no ack


async def test_to_device_and_never_back_to_sender(make_node):
    a, b = await make_node("A"), await make_node("B")
    me1 = await a.connect("me", "d1")
    me2 = await b.connect("me", "d2")
    await a.send(me1, type="candidate", to="me", payload="c", id="x")
    assert [f["type"] for f in frames(me2)] == ["candidate"]
    assert frames(me1) == [{"type": "ack", "id": "x", "devices": 1}]
    await a.send(me1, type="bye", to="me", to_device="d1", id="y")
    [err] = frames(me1)
    assert err["code"] == "peer_offline" and err["id"] == "y" and err["to"] == "me"
    assert frames(me2) == []


async def test_peer_offline_with_and_without_id(make_node):
    a = await make_node("A")
    alice = await a.connect("alice", "a1")
    await a.send(alice, type="offer", to="nobody", payload={})
    [err] = frames(alice)
    assert err == {
        "type": "error", "code": "peer_offline", "message": err["message"], "to": "nobody"
    }
    bob = await a.connect("bob", "b1")
    await a.send(alice, type="offer", to="bob", to_device="b9", id="q")
    [err] = frames(alice)
    assert (err["code"], err["id"]) == ("peer_offline", "q")
    assert frames(bob) == []


async def test_order_is_preserved_per_sender(make_node):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    for i in range(100):
        await a.handle(alice, json.dumps({"type": "candidate", "to": "bob", "payload": i}))
    from tests.core.conftest import settle

    await settle()
    assert [f["payload"] for f in frames(bob)] == list(range(100))


async def test_dead_worker_devices_are_offline_after_ttl(make_node, clock):
    a, b = await make_node("A"), await make_node("B")
    alice = await a.connect("alice", "a1")
    await b.connect("bob", "b1")
    await a.send(alice, type="presence", users=["bob"])
    assert frames(alice)[0]["users"]["bob"] == {"online": True, "devices": ["b1"]}
    clock.t += 16  # B stopped heart-beating: known dead, bob inside his resume window
    await a.hub.beat()
    await a.send(alice, type="presence", users=["bob"])
    assert frames(alice)[0]["users"]["bob"] == {"online": True, "devices": ["b1"]}
    clock.t += 10  # the resume window is over
    await a.hub.beat()
    await a.send(alice, type="presence", users=["bob"])
    assert frames(alice)[0]["users"]["bob"] == {"online": False, "devices": []}
    await a.send(alice, type="offer", to="bob", id="z")
    assert frames(alice)[0]["code"] == "peer_offline"


async def test_presence_query_lists_devices_and_echoes_id(make_node):
    a, b = await make_node("A"), await make_node("B")
    q = await a.connect("q", "q1")
    await a.connect("u1", "d2")
    await b.connect("u1", "d1")
    await a.send(q, type="presence", users=["u1", "u2", "u1"], id="p")
    assert frames(q) == [{
        "type": "presence",
        "users": {"u1": {"online": True, "devices": ["d1", "d2"]},
                  "u2": {"online": False, "devices": []}},
        "id": "p",
    }]
    await a.send(q, type="presence", users=[f"u{i}" for i in range(101)], id="big")
    [err] = frames(q)
    assert (err["code"], err["id"]) == ("invalid_message", "big")


async def test_disconnect_releases_presence(make_node):
    a, b = await make_node("A"), await make_node("B")
    q = await a.connect("q", "q1")
    bob = await b.connect("bob", "b1")
    await b.hub.disconnect(bob)
    await a.send(q, type="presence", users=["bob"])
    assert frames(q)[0]["users"]["bob"]["online"] is False


async def test_ping_and_errors_keep_going(make_node):
    a = await make_node("A")
    s = await a.connect("alice", "a1")
    await a.handle(s, "{nope")
    await a.router.handle_binary(s)
    await a.send(s, type="what", id="u")
    await a.send(s, type="ping", id="p")
    out = frames(s)
    assert [f.get("code") for f in out[:3]] == ["bad_json", "bad_frame", "unknown_type"]
    assert out[2]["id"] == "u"
    assert out[3]["type"] == "pong" and out[3]["id"] == "p" and isinstance(out[3]["ts"], int)
    assert not s.closed


async def test_rate_limit_is_per_user_across_devices_and_workers(make_node):
    a, b = await make_node("A", rate="4/minute"), await make_node("B", rate="4/minute")
    # one shared limiter storage, as Redis would be for the cluster
    b.router.limiter = a.router.limiter
    d1 = await a.connect("spam", "d1")
    d2 = await b.connect("spam", "d2")
    other = await a.connect("calm", "c1")
    for s, node in ((d1, a), (d2, b), (d1, a), (d2, b)):
        await node.send(s, type="ping")
    assert all(f["type"] == "pong" for f in frames(d1) + frames(d2))
    await b.send(d2, type="ping", id="over")
    [err] = frames(d2)
    assert err["code"] == "rate_limited" and err["id"] == "over"
    assert isinstance(err["retry_after_ms"], int) and 0 < err["retry_after_ms"] <= 60_000
    await a.send(other, type="ping")
    assert frames(other)[0]["type"] == "pong"
    assert not d2.closed


async def test_sustained_abuse_closes_with_1008(make_node):
    a = await make_node("A", rate="1/minute")
    s = await a.connect("abuser", "d")
    for _ in range(60):
        await a.handle(s, '{"type":"ping"}')
    assert s.closed and s.close_code == 1008
    assert s.closes == [(1008, "sustained abuse")]


async def test_device_limit_and_takeover(make_node):
    a, b = await make_node("A", max_devices_per_user=2), await make_node("B",
                                                                        max_devices_per_user=2)
    old = await a.connect("u", "d1")
    await b.connect("u", "d2")
    from service.core.hub import TooManyDevices

    try:
        await b.connect("u", "d3")
    except TooManyDevices:
        pass
    else:
        raise AssertionError("third device accepted")
    new = await b.connect("u", "d1")  # same device elsewhere: replaces, not counted
    from tests.core.conftest import settle

    await settle()
    assert old.closed and old.close_code == 4009
    located = await a.hub.presence.locate(["u"])
    assert located["u"]["d1"] == new.location
    await a.hub.disconnect(old)  # the old one's cleanup must not remove the new claim
    assert (await a.hub.presence.locate(["u"]))["u"]["d1"] == Location("B", new.conn_id)


async def test_slow_consumer_is_closed_and_sender_unaffected(make_node):
    a = await make_node("A")
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1", max_messages=5)
    for i in range(6):
        await a.send(alice, type="candidate", to="bob", payload=i, id=str(i))
    assert bob.closed and bob.close_code == 1008 and bob.close_reason == "slow consumer"
    acks = frames(alice)
    assert [f["type"] for f in acks[:5]] == ["ack"] * 5
    assert acks[5]["code"] == "peer_offline"


async def test_connection_count_follows_connects_takeovers_and_disconnects(make_node):
    a = await make_node("A")
    first = await a.connect("u", "d1")
    await a.connect("u", "d2")
    await a.connect("v", "d1")
    assert a.hub.connection_count == 3
    again = await a.connect("u", "d1")  # replaces ``first`` here: still three
    assert a.hub.connection_count == 3
    await a.hub.disconnect(first)  # the replaced one: nothing of the count is its
    assert a.hub.connection_count == 3
    await a.hub.disconnect(again)
    await a.hub.disconnect(again)  # twice: counted once
    assert a.hub.connection_count == 2
    assert a.hub.connection_count == sum(len(d) for d in a.hub.sessions.values())


async def test_a_lookup_started_before_admission_is_used_or_dropped_quietly(make_node):
    """A message whose admission is still pending has its recipient's lookup started with
    it: admitted, the message is routed with that lookup; refused, the lookup is dropped,
    and its failure is not reported as an exception nobody retrieved."""
    a = await make_node("a")
    b = await make_node("b")
    alice = await a.connect("alice", "phone")
    bob = await b.connect("bob", "laptop")
    loop = asyncio.get_running_loop()
    lookups: list[asyncio.Future[Any]] = []
    real = a.hub.presence.locate

    def locate(users):  # a batching backend: the lookup is registered at the call
        fut = loop.create_future()
        lookups.append(fut)
        return fut

    a.hub.presence.locate = locate  # type: ignore[method-assign]
    admitted = loop.create_future()
    pending = asyncio.ensure_future(a.router.handle(
        alice, json.dumps({"type": "offer", "to": "bob", "payload": 1, "id": "m1"}),
        admitted, counted=True,
    ))
    await settle()
    assert len(lookups) == 1 and not pending.done()  # looked up before admission came
    lookups[0].set_result(await real(["bob"]))
    admitted.set_result(None)
    await pending
    await settle()
    assert [f["type"] for f in frames(bob)][-1] == "offer"
    assert frames(alice) == [{"type": "ack", "id": "m1", "devices": 1}]

    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    refused = loop.create_future()
    pending = asyncio.ensure_future(a.router.handle(
        alice, json.dumps({"type": "offer", "to": "bob", "payload": 2, "id": "m2"}),
        refused, counted=True,
    ))
    await settle()
    refused.set_result(1.5)  # over the budget
    await pending
    lookups[1].set_exception(ConnectionError("redis down"))
    del lookups[:]
    await settle()
    gc.collect()
    assert frames(alice)[-1]["code"] == "rate_limited"
    assert frames(bob) == []
    assert unretrieved == []


class _BatchingLimiter:
    """A limiter that answers with futures, like the Redis one: nothing can be inline."""

    synchronous = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.limit, self.period_s = inner.limit, inner.period_s

    def admit(self, user: str) -> Any:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.inner.admit(user))
        return fut

    def leased(self, user: str) -> bool:
        return False  # no leases: every message asks ``admit``


async def test_handle_now_does_nothing_when_it_cannot_finish_at_once(make_node):
    a, b = await make_node("A", rate="3/minute"), await make_node("B")
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    carol = await b.connect("carol", "c1")
    dave = await a.connect("dave", "d1")
    await a.hub.disconnect(dave, park=True)  # parked: kept through the backplane
    refused = [
        b'{"type":"ping","id":"p"}',  # not a direct message
        b"{nope",  # answered by ``handle``
        b'{"type":"offer","to":"carol","payload":1}',  # on another worker
        b'{"type":"offer","to":"dave","payload":1}',  # parked
    ]
    for frame in refused:
        assert a.router.handle_now(alice, frame) is False
    await settle()
    assert frames(alice) == [] and frames(bob) == [] and frames(carol) == []
    # nothing was counted: the budget of 3 is whole, and the inline path spends it
    for i in range(3):
        assert a.router.handle_now(alice, b'{"type":"offer","to":"bob","payload":%d,"id":"m%d"}'
                                   % (i, i)) is True
    assert [f["payload"] for f in frames(bob)] == [0, 1, 2]
    assert frames(alice) == [{"type": "ack", "id": f"m{i}", "devices": 1} for i in range(3)]
    assert a.router.handle_now(alice, b'{"type":"offer","to":"bob","payload":3,"id":"m3"}')
    [err] = frames(alice)
    assert err["code"] == "rate_limited" and err["id"] == "m3" and frames(bob) == []


async def test_handle_now_answers_peer_offline_and_never_echoes_to_the_sender(make_node):
    a = await make_node("A")
    alice1 = await a.connect("alice", "a1")
    alice2 = await a.connect("alice", "a2")
    assert a.router.handle_now(alice1, b'{"type":"offer","to":"nobody","payload":1,"id":"x"}')
    [err] = frames(alice1)
    assert err["code"] == "peer_offline" and err["id"] == "x" and err["to"] == "nobody"
    assert a.router.handle_now(alice1, b'{"type":"candidate","to":"alice","payload":2,"id":"y"}')
    assert frames(alice1) == [{"type": "ack", "id": "y", "devices": 1}]
    [got] = frames(alice2)
    assert got["from_device"] == "a1" and got["payload"] == 2


async def test_handle_now_is_off_with_a_limiter_that_batches(make_node):
    a = await make_node("A")
    a.router = type(a.router)(a.hub, _BatchingLimiter(a.router.limiter))
    alice = await a.connect("alice", "a1")
    bob = await a.connect("bob", "b1")
    assert a.router.inline is False
    assert a.router.handle_now(alice, b'{"type":"offer","to":"bob","payload":1}') is False
    assert frames(bob) == []
    await a.router.handle(alice, b'{"type":"offer","to":"bob","payload":1}')
    assert [f["payload"] for f in frames(bob)] == [1]


async def test_sustained_abuse_inline_closes_with_1008(make_node):
    a = await make_node("A", rate="1/minute")
    s = await a.connect("abuser", "d")
    await a.connect("victim", "v")
    for _ in range(60):
        a.router.handle_now(s, b'{"type":"offer","to":"victim","payload":1}')
    assert s.closed and s.close_code == 1008
    assert s.closes == [(1008, "sustained abuse")]
    assert a.router.handle_now(s, b'{"type":"offer","to":"victim","payload":1}') is False


class _LeasingLimiter(_BatchingLimiter):
    """Batches like the Redis limiter, and holds ``leases`` slots taken ahead."""

    def __init__(self, inner: Any, leases: int) -> None:
        super().__init__(inner)
        self.leases = leases

    def leased(self, user: str) -> bool:
        if self.leases <= 0:
            return False
        self.leases -= 1
        return True


OFFER = '{"type":"offer","to":"%s","payload":%d,"id":"m%d"}'


async def finished(session: Any) -> None:
    """Loop passes until the session's messages started in the read callback are done."""
    for _ in range(100):
        if not session.inflight:
            break
        await asyncio.sleep(0)
    await settle()


async def test_leased_messages_start_in_the_read_callback_and_keep_their_order(make_node):
    """With a limiter that batches, ``handle_now`` starts every message a lease admits,
    one after the other, without waiting.  After one that could not be queued in one step
    (a device here), the sender's later ones wait behind it, even one started later that
    could have been (carol's remote device gets 2 before 3), until none is in flight."""
    a, b = await make_node("A"), await make_node("B")
    limiter = _LeasingLimiter(a.router.limiter, leases=6)
    a.router = type(a.router)(a.hub, limiter)
    alice = await a.connect("alice", "a1")
    bob = await b.connect("bob", "b1")
    carol_here, carol_there = await a.connect("carol", "c1"), await b.connect("carol", "c2")
    for to, n in (("bob", 1), ("carol", 2)):
        assert a.router.handle_now(alice, (OFFER % (to, n, n)).encode()) is True
    assert alice.inflight == 2 and alice.pending is None  # no future until one is awaited
    waiting = a.router.started(alice)
    assert waiting is not None and a.router.started(alice) is waiting and not waiting.done()
    await asyncio.sleep(0)  # a loop pass: carol's message is being finished in a task
    only_there = '{"type":"offer","to":"carol","to_device":"c2","payload":3,"id":"m3"}'
    assert a.router.handle_now(alice, only_there.encode()) is True
    assert a.router.handle_now(alice, (OFFER % ("bob", 4, 4)).encode()) is True
    await finished(alice)
    assert alice.pending is None and alice.inflight == 0 and alice.chain is None
    assert waiting.done() and a.router.started(alice) is None
    assert [f["id"] for f in frames(alice)] == ["m1", "m2", "m3", "m4"]
    assert [f["payload"] for f in frames(bob)] == [1, 4]
    assert [f["payload"] for f in frames(carol_here)] == [2]
    assert [f["payload"] for f in frames(carol_there)] == [2, 3]
    # nothing in flight: the sender's routes are queued in one step again
    assert await a.hub.backplane.route("bob", None, None, b"{}", 1, id(alice)) == 1
    # no lease left: refused, nothing counted, nothing sent
    limiter.leases = 0
    assert a.router.handle_now(alice, (OFFER % ("bob", 5, 5)).encode()) is False
    await settle()
    assert frames(alice) == []


async def test_a_message_started_in_the_read_callback_answers_errors(make_node):
    a = await make_node("A")
    a.router = type(a.router)(a.hub, _LeasingLimiter(a.router.limiter, leases=3))
    alice = await a.connect("alice", "a1")
    assert a.router.handle_now(alice, (OFFER % ("nobody", 1, 1)).encode()) is True
    await settle()
    assert [(f["id"], f["code"]) for f in frames(alice)] == [("m1", "peer_offline")]

    def broken(*args: Any) -> None:
        then = args[-1]
        asyncio.get_running_loop().call_soon(then, ConnectionError("backplane down"))

    a.hub.backplane.route_then = broken  # type: ignore[method-assign]
    for n in (2, 3):
        assert a.router.handle_now(alice, (OFFER % ("bob", n, n)).encode()) is True
    await finished(alice)
    assert alice.pending is None and alice.inflight == 0
    assert [(f["id"], f["code"]) for f in frames(alice)] == [
        ("m2", "internal"), ("m3", "internal")]
