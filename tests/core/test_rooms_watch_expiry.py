"""Rooms (§4), presence watch (§5), token lifetime (§6) and the janitor, on the in-memory
twins: simulated workers on one MemoryCluster, a fake clock, no sockets, no timers."""

from __future__ import annotations

from service.auth import Identity
from service.core.router import Router
from tests.core.conftest import frames, settle


async def test_room_lifecycle_across_workers(make_node):
    a, b = await make_node("A"), await make_node("B")
    s1 = await a.connect("u1", "d1")
    s2 = await b.connect("u2", "d2")
    await a.send(s1, type="subscribe", room="r", id="s")
    assert frames(s1) == [{"type": "subscribed", "room": "r", "members": [], "id": "s"}]
    await b.send(s2, type="subscribe", room="r")
    assert frames(s2) == [{"type": "subscribed", "room": "r",
                           "members": [{"user_id": "u1", "device_id": "d1"}]}]
    assert frames(s1) == [{"type": "joined", "room": "r", "user_id": "u2", "device_id": "d2"}]
    await a.send(s1, type="publish", room="r", payload={"k": [1]}, id="p")
    [pub] = frames(s2)
    assert pub["type"] == "publish" and pub["from"] == "u1" and pub["from_device"] == "d1"
    assert pub["payload"] == {"k": [1]} and pub["room"] == "r" and isinstance(pub["ts"], int)
    assert frames(s1) == [{"type": "ack", "id": "p", "devices": 1}]
    await b.send(s2, type="unsubscribe", room="r", id="u")
    assert frames(s2) == [{"type": "unsubscribed", "room": "r", "id": "u"}]
    assert frames(s1) == [{"type": "left", "room": "r", "user_id": "u2", "device_id": "d2"}]
    await b.send(s2, type="publish", room="r", payload=1, id="x")
    [err] = frames(s2)
    assert (err["code"], err["id"]) == ("not_subscribed", "x")


async def test_disconnect_leaves_every_room(make_node):
    a, b = await make_node("A"), await make_node("B")
    s1 = await a.connect("u1", "d1")
    s2 = await b.connect("u2", "d2")
    for room in ("r1", "r2"):
        await a.send(s1, type="subscribe", room=room)
        await b.send(s2, type="subscribe", room=room)
    frames(s1)
    await b.hub.disconnect(s2)
    await settle()
    left = frames(s1)
    assert sorted(f["room"] for f in left) == ["r1", "r2"]
    assert all(f["type"] == "left" and f["user_id"] == "u2" for f in left)


async def test_room_limits_and_claims(make_node):
    a = await make_node("A")
    a.router.max_rooms, a.router.max_room_members = 2, 2
    s = await a.connect("u", "d", )
    await a.send(s, type="subscribe", room="r1")
    await a.send(s, type="subscribe", room="r2")
    await a.send(s, type="subscribe", room="r3", id="t")
    out = frames(s)
    assert out[-1]["code"] == "too_many_rooms" and out[-1]["id"] == "t"
    x = await a.connect("x", "x")
    y = await a.connect("y", "y")
    await a.send(x, type="subscribe", room="r1")
    await a.send(y, type="subscribe", room="r1", id="f")
    assert frames(y)[-1]["code"] == "room_full"
    limited = await a.connect("lim", "d")
    limited.identity = Identity("lim", "d", 2_000_000_000, ("team-*", "lobby"))
    await a.send(limited, type="subscribe", room="team-7")
    await a.send(limited, type="subscribe", room="lobby")
    await a.send(limited, type="subscribe", room="lobby2", id="no")
    out = frames(limited)
    assert [f["type"] for f in out[:2]] == ["subscribed", "subscribed"]
    assert (out[2]["code"], out[2]["id"]) == ("forbidden_room", "no")


async def test_watch_reports_changes_across_workers(make_node):
    a, b = await make_node("A"), await make_node("B")
    w = await a.connect("w", "w1")
    await a.send(w, type="watch", users=["bob", "carol"], id="q")
    assert frames(w) == [{"type": "presence", "id": "q", "users": {
        "bob": {"online": False, "devices": []}, "carol": {"online": False, "devices": []}}}]
    bob1 = await b.connect("bob", "b1")
    await settle()
    assert frames(w) == [{"type": "presence_changed", "user_id": "bob", "online": True,
                          "devices": ["b1"]}]
    await a.connect("bob", "b2")
    await settle()
    assert frames(w)[-1]["devices"] == ["b1", "b2"]
    await a.send(w, type="unwatch", users=["carol", "bob"], id="u")
    assert frames(w) == [{"type": "unwatched", "users": ["carol", "bob"], "id": "u"}]
    await b.hub.disconnect(bob1)
    await settle()
    assert frames(w) == []


async def test_watch_limit(make_node):
    a = await make_node("A")
    w = await a.connect("w", "w1")
    await a.send(w, type="watch", users=[f"u{i}" for i in range(150)])
    await a.send(w, type="watch", users=[f"v{i}" for i in range(51)], id="big")
    out = frames(w)
    assert (out[-1]["code"], out[-1]["id"]) == ("invalid_message", "big")


async def test_janitor_reports_dead_worker_once(make_node, clock):
    a, b, c = await make_node("A"), await make_node("B"), await make_node("C")
    sa = await a.connect("ua", "da")
    sb = await b.connect("ub", "db")
    sc = await c.connect("uc", "dc")
    for node, s in ((a, sa), (b, sb), (c, sc)):
        await node.send(s, type="subscribe", room="r")
    await a.send(sa, type="watch", users=["uc"])
    frames(sa), frames(sb)
    for _ in range(6):  # A and B beat every 5 s; C stopped: dead after 15 s, + 10 s resume
        clock.t += 5
        await a.hub.beat()
        await b.hub.beat()
    await settle()
    got_a, got_b = frames(sa), frames(sb)
    left = {"type": "left", "room": "r", "user_id": "uc", "device_id": "dc"}
    assert got_a.count(left) == 1 and got_b.count(left) == 1
    assert {"type": "presence_changed", "user_id": "uc", "online": False,
            "devices": []} in got_a
    await a.hub.beat()
    await b.hub.beat()
    await settle()
    assert frames(sa) == [] and frames(sb) == []


async def test_refresh_and_expiry(make_node, clock):
    a = await make_node("A")
    s = await a.connect("u", "d")
    s.identity = Identity("u", "d", 5000)
    a.hub.token_expiring_notice = 60
    a.hub.schedule_expiry(s)
    a.hub.expire_due(4900)
    assert frames(s) == []
    a.hub.expire_due(4945)
    assert frames(s) == [{"type": "token_expiring", "expires_at": 5000}]
    new = Identity("u", "d", 9000)
    a.router._verify = lambda tok: new if tok == "good" else (_ for _ in ()).throw(ValueError())
    await a.send(s, type="refresh", token="bad", id="r1")
    assert frames(s)[0]["code"] == "invalid_token"
    a.router._verify = lambda tok: Identity("other", "d", 9000)
    await a.send(s, type="refresh", token="x", id="r2")
    assert frames(s)[0]["code"] == "identity_mismatch"
    a.router._verify = lambda tok: new
    await a.send(s, type="refresh", token="good", id="r3")
    assert frames(s) == [{"type": "refreshed", "expires_at": 9000, "id": "r3"}]
    a.hub.expire_due(5001)  # the old expiry no longer applies
    assert not s.closed
    a.hub.expire_due(9000)
    assert s.closed and s.close_code == 4001


def test_router_without_verifier_refuses_refresh() -> None:
    assert Router.__init__.__kwdefaults__["verify"] is None


async def test_one_deadline_per_connection_and_a_late_check_still_notices_then_closes(
    make_node, clock
):
    """An idle connection holds one deadline entry (its notice's, which arms the close when
    it comes due); an expiry check that comes only after both times sends the notice and
    closes 4001 in the same pass."""
    a = await make_node("A")
    sessions = [await a.connect(f"u{i}", "d") for i in range(3)]
    assert len(a.hub._deadlines) == len(sessions)
    a.hub.token_expiring_notice = 60
    late = sessions[0]
    late.identity = Identity("u0", "d", 6000)
    a.hub.schedule_expiry(late)
    a.hub.expire_due(5000)
    assert frames(late) == [] and not late.closed
    a.hub.expire_due(7000)
    assert frames(late) == [{"type": "token_expiring", "expires_at": 6000}]
    assert late.closed and late.close_code == 4001
    assert not any(s.closed for s in sessions[1:])
