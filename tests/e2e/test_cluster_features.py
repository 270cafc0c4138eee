"""End-to-end tests of the cluster features of PROTOCOL.md across real server processes on one
real Redis: rooms (§4), presence watch (§5), token refresh and expiry (§6), device takeover
(§1, 4009), ICE servers with TURN REST credentials (§9), the Origin allow-list (§1) and the
departure of an instance killed with SIGKILL (§4/§5 janitor).

One module fixture starts, in parallel, the two sets of instances the tests use:

- ``main``: a pair with small room limits, a short TOKEN_EXPIRING_NOTICE, TURN/STUN settings
  and ALLOWED_ORIGINS — shared by most tests;
- ``ttl``: three instances with PRESENCE_TTL=3 and no ICE settings; the SIGKILL test kills
  the third one.

Presence and rooms live in Redis and outlive a test, so every test uses uuid-suffixed names.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import (
    Client,
    Conns,
    RedisServer,
    ServerProcess,
    closed_code,
    frames_for,
    now_ms,
    server_env,
    start_server,
    token,
    uid,
)

pytestmark = pytest.mark.e2e

MAX_ROOMS = 3
MAX_MEMBERS = 3
NOTICE = 2
PRESENCE_TTL = 3
RESUME_WINDOW = 1  # §10 (not implemented yet): keeps the SIGKILL test valid once it is
TURN_SECRET = "turn-shared-secret-for-the-e2e-tests"
TURN_URLS = ["turn:turn1.example.org:3478?transport=udp", "turns:turn2.example.org:5349"]
STUN_URLS = ["stun:stun.example.org:3478"]
TURN_TTL = 3600
ORIGINS = ["https://a.example", "https://b.example"]
MAX_WATCH = 200


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Clusters:
    main: list[ServerProcess]  # two instances, shared settings below
    ttl: list[ServerProcess]  # three instances with PRESENCE_TTL=3; the third may be killed


@pytest.fixture(scope="module")
def clusters(redis_server: RedisServer) -> Iterator[Clusters]:
    main_env = server_env(
        redis_server.url,
        RATE_LIMIT="1000/second",
        MAX_ROOMS_PER_CONNECTION=str(MAX_ROOMS),
        MAX_ROOM_MEMBERS=str(MAX_MEMBERS),
        TOKEN_EXPIRING_NOTICE=str(NOTICE),
        TURN_SECRET=TURN_SECRET,
        TURN_URLS=",".join(TURN_URLS),
        STUN_URLS=",".join(STUN_URLS),
        ALLOWED_ORIGINS=",".join(ORIGINS),
    )
    ttl_env = server_env(
        redis_server.url,
        RATE_LIMIT="1000/second",
        PRESENCE_TTL=str(PRESENCE_TTL),
        RESUME_WINDOW=str(RESUME_WINDOW),
    )
    envs = [main_env, main_env, ttl_env, ttl_env, ttl_env]
    started: list[ServerProcess] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(len(envs)) as pool:
        for fut in [pool.submit(start_server, env) for env in envs]:
            try:
                started.append(fut.result())
            except BaseException as exc:  # re-raised below, after stopping the others
                errors.append(exc)
    if errors:
        for server in started:
            server.stop()
        raise errors[0]
    try:
        yield Clusters(main=started[:2], ttl=started[2:])
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def pair(clusters: Clusters) -> tuple[ServerProcess, ServerProcess]:
    return clusters.main[0], clusters.main[1]


def member(user: str, device: str) -> dict[str, str]:
    return {"user_id": user, "device_id": device}


def joined(room: str, user: str, device: str) -> dict[str, Any]:
    return {"type": "joined", "room": room, "user_id": user, "device_id": device}


def left(room: str, user: str, device: str) -> dict[str, Any]:
    return {"type": "left", "room": room, "user_id": user, "device_id": device}


def changed(user: str, devices: list[str]) -> dict[str, Any]:
    return {
        "type": "presence_changed",
        "user_id": user,
        "online": bool(devices),
        "devices": devices,
    }


def assert_error(msg: dict[str, Any], code: str, msg_id: str | None = None, **extra: Any) -> None:
    expected_keys = {"type", "code", "message", *extra} | ({"id"} if msg_id is not None else set())
    assert msg.get("type") == "error", msg
    assert msg["code"] == code, msg
    assert set(msg) == expected_keys, msg
    assert isinstance(msg["message"], str) and msg["message"], msg
    if msg_id is not None:
        assert msg["id"] == msg_id, msg
    for key, value in extra.items():
        assert msg[key] == value, msg


def sort_presence(msg: dict[str, Any]) -> dict[str, Any]:
    """presence_changed with its device list sorted (the order is not part of the contract)."""
    if isinstance(msg.get("devices"), list):
        msg = {**msg, "devices": sorted(msg["devices"])}
    return msg


async def recv_raw(client: Client, timeout: float = 5.0) -> str:
    raw = await asyncio.wait_for(client.ws.recv(), timeout)
    assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
    return raw


async def collect(client: Client, count: int, timeout: float) -> list[dict[str, Any]]:
    """Exactly the next ``count`` frames (failing when they do not come within ``timeout``)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left_s = deadline - time.monotonic()
        try:
            out.append(await client.recv(max(left_s, 0.01)))
        except TimeoutError:
            raise AssertionError(f"got only {out!r} within {timeout} s") from None
    return out


def key(msg: dict[str, Any]) -> str:
    return json.dumps(msg, sort_keys=True)


def assert_same_frames(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert sorted(map(key, got)) == sorted(map(key, expected)), (got, expected)


async def subscribe(client: Client, room: str, msg_id: str | None = None) -> dict[str, Any]:
    if msg_id is None:
        await client.send(type="subscribe", room=room)
    else:
        await client.send(type="subscribe", room=room, id=msg_id)
    return await client.recv()


def subscribed(
    room: str, members: list[dict[str, str]], msg_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "subscribed", "room": room, "members": members}
    if msg_id is not None:
        body["id"] = msg_id
    return body


def normal_subscribed(msg: dict[str, Any]) -> dict[str, Any]:
    """``subscribed`` with its member list sorted (the order is not part of the contract)."""
    if msg.get("type") == "subscribed":
        members = sorted(msg["members"], key=lambda m: (m["user_id"], m["device_id"]))
        msg = {**msg, "members": members}
    return msg


def expect_subscribed(
    msg: dict[str, Any], room: str, members: list[dict[str, str]], msg_id: str | None = None
) -> None:
    members = sorted(members, key=lambda m: (m["user_id"], m["device_id"]))
    assert normal_subscribed(msg) == subscribed(room, members, msg_id), msg


_PAYLOAD_AT = re.compile(r'"payload"\s*:\s*')


def check_publish(
    raw: str,
    room: str,
    frm: str,
    device: str,
    payload_text: str,
    before: int,
    after: int,
    msg_id: str | None = None,
) -> None:
    msg = json.loads(raw)
    ts = msg.pop("ts", None)
    assert isinstance(ts, int) and before - 1000 <= ts <= after + 1000, raw
    if msg_id is None:
        assert "id" not in msg, raw
    elif "id" in msg:  # §3 forwards a direct message's id; for publish it is optional
        assert msg.pop("id") == msg_id, raw
    assert msg == {
        "type": "publish",
        "room": room,
        "from": frm,
        "from_device": device,
        "payload": json.loads(payload_text),
    }, raw
    found = _PAYLOAD_AT.search(raw)
    assert found is not None, raw
    assert raw[found.end() :].startswith(payload_text), (raw, payload_text)


def turn_credential(username: str) -> str:
    digest = hmac.new(TURN_SECRET.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def check_ice(ice: Any, user: str, before: float, after: float) -> None:
    assert isinstance(ice, list) and len(ice) == 2, ice
    stun, turn = ice
    assert stun == {"urls": STUN_URLS}, ice
    assert set(turn) == {"urls", "username", "credential"}, ice
    assert turn["urls"] == TURN_URLS, ice
    expiry, sep, name = turn["username"].partition(":")
    assert sep == ":" and name == user, turn
    assert expiry.isdigit(), turn
    assert int(before) + TURN_TTL - 2 <= int(expiry) <= int(after) + TURN_TTL + 2, turn
    assert turn["credential"] == turn_credential(turn["username"]), turn


async def rejected(url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """Try an upgrade that must be refused; (status, JSON body)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(url, open_timeout=10, **kw)
        await ws.close()
    response = info.value.response
    return response.status_code, json.loads(response.body)


async def pong(client: Client) -> None:
    await client.send(type="ping", id="alive")
    reply = await client.recv()
    assert reply["type"] == "pong" and reply["id"] == "alive", reply


# ---------------------------------------------------------------------------- §4 rooms


async def test_room_members_joined_publish_left_across_instances(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    room = uid("room")
    alice, bob, carol = uid("alice"), uid("bob"), uid("carol")
    a1 = await conns.open(a, alice, "a1")
    b1 = await conns.open(b, bob, "b1")
    a2 = await conns.open(b, alice, "a2")  # the publisher's second device, other instance
    # non-members on both instances, one of them in another room
    c1 = await conns.open(a, carol, "c1")
    c2 = await conns.open(b, carol, "c2")
    other_room = uid("other")
    expect_subscribed(await subscribe(c2, other_room), other_room, [])

    expect_subscribed(await subscribe(a1, room, "s1"), room, [], "s1")
    expect_subscribed(await subscribe(b1, room), room, [member(alice, "a1")])
    assert await a1.recv() == joined(room, bob, "b1")
    expect_subscribed(
        await subscribe(a2, room, "s3"), room, [member(alice, "a1"), member(bob, "b1")], "s3"
    )
    assert await a1.recv() == joined(room, alice, "a2")
    assert await b1.recv() == joined(room, alice, "a2")

    # publish without id: every other member, both instances, the publisher's other device
    payload_text = (
        '{ "z" : [1, 2.50, -0.0, 1E3 ],\t"k":1, "k":2, "s":"é\\u00e9\\ud83d\\ude00 \\"q\\"",'
        ' "n": null, "big": 123456789012345678901234567890 }'
    )
    before = now_ms()
    await a1.send_raw('{"type":"publish","room":"' + room + '","payload":' + payload_text + "}")
    raws = [await recv_raw(b1), await recv_raw(a2)]
    after = now_ms()
    for raw in raws:
        check_publish(raw, room, alice, "a1", payload_text, before, after)
    await a1.nothing(0.3)  # no echo, no ack without an id

    # publish with id: ack with the number of devices; a string payload (ciphertext)
    payload_text = '"ciphertext:AAECAwQ=  \\/ "'
    before = now_ms()
    await b1.send_raw(
        '{"id":"pub-1","payload" : ' + payload_text + ',"type":"publish","room":"' + room + '"}'
    )
    raws = [await recv_raw(a1), await recv_raw(a2)]
    after = now_ms()
    for raw in raws:
        check_publish(raw, room, bob, "b1", payload_text, before, after, "pub-1")
    assert await b1.recv() == {"type": "ack", "id": "pub-1", "devices": 2}

    # a disconnect: `left` on both instances
    await b1.close()
    assert await a1.recv() == left(room, bob, "b1")
    assert await a2.recv() == left(room, bob, "b1")

    # unsubscribe: `unsubscribed` (id echoed), `left` to the others
    await a2.send(type="unsubscribe", room=room, id="u1")
    assert await a2.recv() == {"type": "unsubscribed", "room": room, "id": "u1"}
    assert await a1.recv() == left(room, alice, "a2")
    await a2.send(type="unsubscribe", room=room)
    assert_error(await a2.recv(), "not_subscribed")  # no longer a member

    # the last member publishes into an otherwise empty room: ack with 0 devices
    await a1.send(type="publish", room=room, payload={"x": 1}, id="alone")
    assert await a1.recv() == {"type": "ack", "id": "alone", "devices": 0}

    # room traffic never reached the non-members
    await asyncio.gather(c1.nothing(0.3), c2.nothing(0.1), a2.nothing(0.1))


async def test_room_member_lists_and_joined_without_id(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    """Same user on both instances plus another user: the subscriber is never in its own
    member list, and nobody gets `joined` for itself."""
    a, b = pair
    room = uid("room")
    u, v = uid("u"), uid("v")
    u1 = await conns.open(b, u, "d1")
    u2 = await conns.open(a, u, "d2")
    v1 = await conns.open(a, v, "d1")
    expect_subscribed(await subscribe(u1, room), room, [])
    expect_subscribed(await subscribe(u2, room), room, [member(u, "d1")])
    assert await u1.recv() == joined(room, u, "d2")
    expect_subscribed(
        await subscribe(v1, room, "x" * 64), room, [member(u, "d1"), member(u, "d2")], "x" * 64
    )
    assert await u1.recv() == joined(room, v, "d1")
    assert await u2.recv() == joined(room, v, "d1")
    await asyncio.gather(u1.nothing(0.3), u2.nothing(0.1), v1.nothing(0.1))


async def test_room_errors_not_subscribed_and_invalid_names(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    room = uid("room")
    user = uid("err")
    c = await conns.open(a, user, "d1")
    peer = await conns.open(b, uid("peer"), "p1")
    expect_subscribed(await subscribe(peer, room), room, [])

    await c.send(type="publish", room=room, payload={"x": 1}, id="np")
    assert_error(await c.recv(), "not_subscribed", "np")
    await c.send(type="publish", room=room, payload="no id")
    assert_error(await c.recv(), "not_subscribed")
    await c.send(type="unsubscribe", room=room, id="nu")
    assert_error(await c.recv(), "not_subscribed", "nu")
    await peer.nothing(0.3)  # nothing was published into the room

    bad_rooms: list[Any] = ["", "a b", "a/b", "room#1", "é", "x" * 129, 42, None, ["r"], {"r": 1}]
    for kind in ("subscribe", "unsubscribe", "publish"):
        for n, bad in enumerate(bad_rooms):
            msg_id = f"{kind}-{n}"
            await c.send(type=kind, room=bad, payload={}, id=msg_id)
            assert_error(await c.recv(), "invalid_message", msg_id)
        await c.send(type=kind, id=f"{kind}-missing")
        assert_error(await c.recv(), "invalid_message", f"{kind}-missing")
    # the longest valid name is fine
    long_room = "r" * 120 + uuid.uuid4().hex[:8]
    expect_subscribed(await subscribe(c, long_room, "long"), long_room, [], "long")
    # the connection is still usable and in no other room
    await pong(c)
    await peer.nothing(0.2)


async def test_rooms_claim_exact_names_and_prefixes(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex[:8]
    lobby, team_prefix = f"lobby-{tag}", f"team-{tag}-"
    user = uid("claim")
    c = await conns.open(a, user, "d1", rooms=[lobby, team_prefix + "*"])
    for n, room in enumerate(
        [
            f"other-{tag}",
            f"lobby-{tag}2",
            f"lobby-{tag}".upper(),
            f"xlobby-{tag}",
            f"team-{tag}",
            f"team-{tag}x-1",
        ]
    ):
        await c.send(type="subscribe", room=room, id=f"f{n}")
        assert_error(await c.recv(), "forbidden_room", f"f{n}")
    await c.send(type="subscribe", room=f"nope-{tag}")
    assert_error(await c.recv(), "forbidden_room")
    # a forbidden subscribe did not make it a member
    await c.send(type="publish", room=f"other-{tag}", payload=1, id="after")
    assert_error(await c.recv(), "not_subscribed", "after")

    expect_subscribed(await subscribe(c, lobby, "ok1"), lobby, [], "ok1")
    expect_subscribed(
        await subscribe(c, team_prefix + "red", "ok2"), team_prefix + "red", [], "ok2"
    )
    # the prefix entry also matches rooms named after it, deeper on the other instance too
    other = await conns.open(b, user, "d2", rooms=[team_prefix + "*"])
    expect_subscribed(
        await subscribe(other, team_prefix + "red.blue:1"), team_prefix + "red.blue:1", []
    )
    await other.send(type="subscribe", room=lobby, id="no-lobby")
    assert_error(await other.recv(), "forbidden_room", "no-lobby")

    # an empty list allows no room; no claim allows any room
    none = await conns.open(b, uid("empty"), "d1", rooms=[])
    await none.send(type="subscribe", room=lobby, id="e")
    assert_error(await none.recv(), "forbidden_room", "e")
    free = await conns.open(a, uid("free"), "d1")
    expect_subscribed(await subscribe(free, f"other-{tag}"), f"other-{tag}", [])
    await c.nothing(0.2)


async def test_too_many_rooms_per_connection(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    user = uid("many")
    rooms = [uid(f"r{n}") for n in range(MAX_ROOMS + 1)]
    c = await conns.open(a, user, "d1")
    for room in rooms[:MAX_ROOMS]:
        expect_subscribed(await subscribe(c, room), room, [])
    await c.send(type="subscribe", room=rooms[-1], id="over")
    assert_error(await c.recv(), "too_many_rooms", "over")
    await c.send(type="subscribe", room=uid("r"))
    assert_error(await c.recv(), "too_many_rooms")
    # the refused room was not joined
    await c.send(type="publish", room=rooms[-1], payload=1, id="p")
    assert_error(await c.recv(), "not_subscribed", "p")
    # the limit is per connection: another device of the same user, elsewhere, has its own
    other = await conns.open(b, user, "d2")
    for room in rooms[1:]:
        expect_subscribed(
            await subscribe(other, room),
            room,
            [member(user, "d1")] if room in rooms[:MAX_ROOMS] else [],
        )
    assert_same_frames(await collect(c, 2, 5), [joined(r, user, "d2") for r in rooms[1:MAX_ROOMS]])
    # leaving one frees a place
    await c.send(type="unsubscribe", room=rooms[0], id="u")
    assert await c.recv() == {"type": "unsubscribed", "room": rooms[0], "id": "u"}
    expect_subscribed(await subscribe(c, rooms[-1], "now"), rooms[-1], [member(user, "d2")], "now")
    assert await other.recv() == joined(rooms[-1], user, "d1")


async def test_room_full_counts_members_on_both_instances(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    room = uid("full")
    users = [uid(f"m{n}") for n in range(MAX_MEMBERS + 2)]
    m0 = await conns.open(a, users[0], "d")
    m1 = await conns.open(b, users[1], "d")
    m2 = await conns.open(a, users[2], "d")
    late_b = await conns.open(b, users[3], "d")
    late_a = await conns.open(a, users[4], "d")
    expect_subscribed(await subscribe(m0, room), room, [])
    expect_subscribed(await subscribe(m1, room), room, [member(users[0], "d")])
    expect_subscribed(
        await subscribe(m2, room), room, [member(users[0], "d"), member(users[1], "d")]
    )
    await m0.recv_type("joined")
    await m0.recv_type("joined")
    await m1.recv_type("joined")

    await late_b.send(type="subscribe", room=room, id="full-b")
    assert_error(await late_b.recv(), "room_full", "full-b")
    await late_a.send(type="subscribe", room=room)
    assert_error(await late_a.recv(), "room_full")
    # refused subscribers are not members: no joined, no publish, not counted
    await late_b.send(type="publish", room=room, payload=1, id="lp")
    assert_error(await late_b.recv(), "not_subscribed", "lp")
    await asyncio.gather(m0.nothing(0.3), m1.nothing(0.1), m2.nothing(0.1))
    await m0.send(type="publish", room=room, payload="hi", id="cnt")
    assert (await m1.recv())["payload"] == "hi"
    assert (await m2.recv())["payload"] == "hi"
    assert await m0.recv() == {"type": "ack", "id": "cnt", "devices": 2}
    await asyncio.gather(late_a.nothing(0.2), late_b.nothing(0.1))

    # a member on the other instance disconnects: there is room again
    await m1.close()
    assert await m0.recv() == left(room, users[1], "d")
    assert await m2.recv() == left(room, users[1], "d")
    expect_subscribed(
        await subscribe(late_a, room, "in"),
        room,
        [member(users[0], "d"), member(users[2], "d")],
        "in",
    )
    assert await m0.recv() == joined(room, users[4], "d")
    assert await m2.recv() == joined(room, users[4], "d")
    await late_b.send(type="subscribe", room=room, id="still-full")
    assert_error(await late_b.recv(), "room_full", "still-full")


# ---------------------------------------------------------------------------- §5 watch


async def test_watch_presence_changes_across_instances(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    target, online_user, stranger = uid("target"), uid("online"), uid("stranger")
    already = await conns.open(b, online_user, "o1")
    w = await conns.open(a, uid("watcher"), "w")
    w_same = await conns.open(a, uid("watcher2"), "w")  # a second watcher on the same node
    w_other = await conns.open(b, uid("watcher3"), "w")  # and one on the other node

    await w.send(type="watch", users=[target, online_user, target], id="w1")
    assert await w.recv() == {
        "type": "presence",
        "users": {
            target: {"online": False, "devices": []},
            online_user: {"online": True, "devices": ["o1"]},
        },
        "id": "w1",
    }
    await w_same.send(type="watch", users=[target])
    assert await w_same.recv() == {
        "type": "presence",
        "users": {target: {"online": False, "devices": []}},
    }
    await w_other.send(type="watch", users=[target], id="w3")
    assert (await w_other.recv())["id"] == "w3"
    watchers = (w, w_same, w_other)

    # a device connects on the other instance
    t1 = await conns.open(b, target, "t1")
    for client in watchers:
        assert sort_presence(await client.recv()) == changed(target, ["t1"])
    # a second device, on the watcher's instance
    t2 = await conns.open(a, target, "t2")
    for client in watchers:
        assert sort_presence(await client.recv()) == changed(target, ["t1", "t2"])
    # unwatched users come and go silently
    s1 = await conns.open(b, stranger, "s1")
    await s1.close()
    # a clean disconnect
    await t1.close()
    for client in watchers:
        assert sort_presence(await client.recv()) == changed(target, ["t2"])
    # the already-online watched user goes offline
    await already.close()
    assert await w.recv() == changed(online_user, [])
    await asyncio.gather(w_same.nothing(0.3), w_other.nothing(0.1))

    # unwatch: `unwatched` with the users, then silence for this connection only
    await w.send(type="unwatch", users=[target], id="uw")
    assert await w.recv() == {"type": "unwatched", "users": [target], "id": "uw"}
    await w_other.send(type="unwatch", users=[target])
    assert await w_other.recv() == {"type": "unwatched", "users": [target]}
    await t2.close()
    assert await w_same.recv() == changed(target, [])
    await asyncio.gather(w.nothing(0.5), w_other.nothing(0.1), w_same.nothing(0.1))
    # watching again gives a fresh snapshot and resumes reporting
    await w.send(type="watch", users=[target], id="again")
    assert await w.recv() == {
        "type": "presence",
        "users": {target: {"online": False, "devices": []}},
        "id": "again",
    }
    await conns.open(b, target, "t3")
    assert await w.recv() == changed(target, ["t3"])
    assert await w_same.recv() == changed(target, ["t3"])
    await w_other.nothing(0.3)


async def test_watch_limit_of_200_per_connection(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    tag = uuid.uuid4().hex[:8]
    names = [f"wl-{tag}-{n}" for n in range(MAX_WATCH + 60)]
    w = await conns.open(a, uid("wl"), "d")

    await w.send(type="watch", users=names[: MAX_WATCH + 1], id="too-many")
    assert_error(await w.recv(), "invalid_message", "too-many")
    await w.send(type="watch", users=["bad name"], id="bad")
    assert_error(await w.recv(), "invalid_message", "bad")
    await w.send(type="watch", users="x", id="not-list")
    assert_error(await w.recv(), "invalid_message", "not-list")

    first = names[:150]
    await w.send(type="watch", users=first, id="150")
    reply = await w.recv()
    assert reply["type"] == "presence" and reply["id"] == "150", reply
    assert reply["users"] == {u: {"online": False, "devices": []} for u in first}
    # re-watching the same users does not count twice; 51 new ones go over the limit
    refused = names[150:201]
    await w.send(type="watch", users=first + refused, id="over")
    assert_error(await w.recv(), "invalid_message", "over")
    # exactly 200 in total is fine
    await w.send(type="watch", users=names[201:251], id="200")
    reply = await w.recv()
    assert reply["type"] == "presence" and len(reply["users"]) == 50 and reply["id"] == "200"
    await w.send(type="watch", users=[names[251]], id="201st")
    assert_error(await w.recv(), "invalid_message", "201st")
    # the refused watches were not registered; the accepted ones were
    await conns.open(b, refused[0], "d")
    await conns.open(b, names[251], "d")
    await w.nothing(0.5)
    await conns.open(b, names[0], "d")
    assert await w.recv() == changed(names[0], ["d"])
    # unwatching frees places
    await w.send(type="unwatch", users=names[140:150], id="free")
    assert await w.recv() == {"type": "unwatched", "users": names[140:150], "id": "free"}
    await w.send(type="watch", users=names[251:261], id="again")
    reply = await w.recv()
    assert reply["type"] == "presence" and reply["id"] == "again", reply
    assert reply["users"][names[251]] == {"online": True, "devices": ["d"]}


# ---------------------------------------------------------------------------- §6 token lifetime


async def test_refresh_identity_and_invalid_tokens(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    user = uid("refresh")
    c = await conns.open(a, user, "d1", ttl=600)
    # a valid token of the same identity
    new = token(user, "d1", ttl=900)
    exp = int(time.time()) + 900
    before = time.time()
    await c.send(type="refresh", token=new, id="r1")
    reply = await c.recv()
    after = time.time()
    ice = reply.pop("ice_servers", None)
    assert reply == {"type": "refreshed", "expires_at": reply["expires_at"], "id": "r1"}, reply
    assert exp - 2 <= reply["expires_at"] <= exp + 2
    check_ice(ice, user, before, after)
    # without id
    await c.send(type="refresh", token=token(user, "d1", ttl=1200))
    reply = await c.recv()
    assert reply["type"] == "refreshed" and "id" not in reply, reply

    # another identity
    for n, tok in enumerate(
        [token(uid("other"), "d1"), token(user, "d2"), token(uid("other"), "d2")]
    ):
        await c.send(type="refresh", token=tok, id=f"m{n}")
        assert_error(await c.recv(), "identity_mismatch", f"m{n}")
    await c.send(type="refresh", token=token(user, "d9"))
    assert_error(await c.recv(), "identity_mismatch")

    # tokens that fail a §1 check
    now = int(time.time())
    bad = {
        "expired": token(user, "d1", ttl=-30),
        "too_long": token(user, "d1", ttl=7200),
        "bad_signature": token(user, "d1", secret="another-secret-0123456789-abcdefghijklmn"),
        "garbage": "not-a-jwt",
        "empty": "",
        "not_yet_valid": token(user, "d1", nbf=now + 120),
        "bad_rooms": token(user, "d1", rooms="lobby"),
    }
    for name, tok in bad.items():
        await c.send(type="refresh", token=tok, id=name)
        assert_error(await c.recv(), "invalid_token", name)
    # a missing or non-string token is a malformed message
    await c.send(type="refresh", id="no-token")
    assert_error(await c.recv(), "invalid_message", "no-token")
    await c.send(type="refresh", token=42, id="int-token")
    assert_error(await c.recv(), "invalid_message", "int-token")
    await pong(c)  # still open

    # the same on the other instance
    d = await conns.open(b, user, "d2")
    await d.send(type="refresh", token=token(user, "d1"), id="x")
    assert_error(await d.recv(), "identity_mismatch", "x")
    await d.send(type="refresh", token=token(user, "d2", ttl=-1), id="y")
    assert_error(await d.recv(), "invalid_token", "y")
    await d.send(type="refresh", token=token(user, "d2", ttl=300), id="z")
    reply = await d.recv()
    assert reply["type"] == "refreshed" and reply["id"] == "z", reply


async def test_token_expiring_notice_close_4001_and_refresh(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair

    async def refused_refreshes_then_expiry() -> None:
        """Failed refreshes leave the old expiry in force: notice, then 4001."""
        user = uid("exp")
        c = await conns.open(a, user, "d1", ttl=4)
        exp = c.welcome["expires_at"]
        for n, tok in enumerate(
            [
                token(user, "d1", ttl=-5),
                token(user, "d1", ttl=7200),
                token(user, "d1", secret="x" * 40),
                token(user, "d2"),
            ]
        ):
            await c.send(type="refresh", token=tok, id=f"bad{n}")
            reply = await c.recv()
            assert reply["type"] == "error" and reply["id"] == f"bad{n}", reply
        notice = await c.recv(timeout=exp - time.time() + 2)
        at = time.time()
        assert notice == {"type": "token_expiring", "expires_at": exp}
        assert exp - NOTICE - 0.5 <= at <= exp, (at, exp)
        code = await closed_code(c, timeout=exp - time.time() + 3)
        at = time.time()
        assert code == 4001
        assert c.ws.close_code == 4001
        assert exp - 0.5 <= at <= exp + 2.5, (at, exp)

    async def refresh_after_notice() -> None:
        user = uid("late")
        c = await conns.open(b, user, "d1", ttl=4)
        exp = c.welcome["expires_at"]
        notice = await c.recv(timeout=exp - time.time() + 2)
        assert notice == {"type": "token_expiring", "expires_at": exp}
        await c.send(type="refresh", token=token(user, "d1", ttl=600), id="late")
        reply = await c.recv()
        assert reply["type"] == "refreshed" and reply["id"] == "late", reply
        assert reply["expires_at"] >= exp + 590
        await c.nothing(exp + 2 - time.time())  # the old expiry passes: no close, no notice
        await pong(c)
        assert c.ws.close_code is None

    async def refresh_before_notice() -> None:
        user = uid("early")
        c = await conns.open(a, user, "d1", ttl=4)
        exp = c.welcome["expires_at"]
        await c.send(type="refresh", token=token(user, "d1", ttl=600))
        reply = await c.recv()
        assert reply["type"] == "refreshed" and reply["expires_at"] >= exp + 590, reply
        await c.nothing(exp + 2 - time.time())
        await pong(c)

    async def refresh_to_shorter_token() -> None:
        """The new token's expiry is the one enforced."""
        user = uid("short")
        c = await conns.open(b, user, "d1", ttl=600)
        await c.send(type="refresh", token=token(user, "d1", ttl=4), id="short")
        reply = await c.recv()
        exp = reply["expires_at"]
        assert reply["type"] == "refreshed" and exp <= time.time() + 4, reply
        notice = await c.recv(timeout=exp - time.time() + 2)
        assert notice == {"type": "token_expiring", "expires_at": exp}
        assert await closed_code(c, timeout=exp - time.time() + 3) == 4001
        assert time.time() >= exp - 0.5

    await asyncio.gather(
        refused_refreshes_then_expiry(),
        refresh_after_notice(),
        refresh_before_notice(),
        refresh_to_shorter_token(),
    )


# ---------------------------------------------------------------------------- §1 takeover


async def test_takeover_4009_keeps_the_new_connection_in_rooms_and_presence(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    user, peer = uid("take"), uid("peer")
    room = uid("room")
    old = await conns.open(a, user, "d1")
    other = await conns.open(b, peer, "p1")
    w = await conns.open(a, uid("watch"), "w")
    expect_subscribed(await subscribe(old, room), room, [])
    expect_subscribed(await subscribe(other, room), room, [member(user, "d1")])
    assert await old.recv() == joined(room, peer, "p1")
    await w.send(type="watch", users=[user], id="w")
    assert (await w.recv())["users"] == {user: {"online": True, "devices": ["d1"]}}

    # the same device connects on the other instance and at once re-joins the room
    new = await conns.open(b, user, "d1")
    await new.send(type="subscribe", room=room, id="re")
    assert await closed_code(old) == 4009
    reply = await new.recv()
    assert normal_subscribed(reply) == subscribed(room, [member(peer, "p1")], "re"), reply

    # what the peer is told about the device (checked at the end, after the state)
    seen = await frames_for(other, 1.5)

    # the device never went offline for its watcher
    await w.nothing(0.3)
    await w.send(type="presence", users=[user], id="q")
    assert await w.recv() == {
        "type": "presence",
        "users": {user: {"online": True, "devices": ["d1"]}},
        "id": "q",
    }
    # and it is a member: publish both ways, and a newcomer lists it
    await other.send(type="publish", room=room, payload={"n": 1}, id="p")
    got = await new.recv()
    assert got["type"] == "publish" and got["from"] == peer and got["payload"] == {"n": 1}
    assert await other.recv() == {"type": "ack", "id": "p", "devices": 1}
    await new.send(type="publish", room=room, payload="back", id="q2")
    assert (await other.recv())["payload"] == "back"
    assert await new.recv() == {"type": "ack", "id": "q2", "devices": 1}
    late = uid("newcomer")
    newcomer = await conns.open(a, late, "n1")
    expect_subscribed(
        await subscribe(newcomer, room), room, [member(user, "d1"), member(peer, "p1")]
    )
    assert await new.recv() == joined(room, late, "n1")
    assert await other.recv() == joined(room, late, "n1")
    # direct messages reach the new connection
    await other.send(type="offer", to=user, payload={"sdp": "x"}, id="o")
    assert (await new.recv())["type"] == "offer"
    assert await other.recv() == {"type": "ack", "id": "o", "devices": 1}

    check_takeover_events(seen, room, user, "d1")


def check_takeover_events(
    seen: list[dict[str, Any]], room: str, user: str, device: str, who: str = "peer"
) -> None:
    """A peer may be told that the replaced connection left (when that happened before the
    new one joined), but its last word about the device must be `joined`: a client that keeps
    its member list from joined/left must not see the device vanish while it is a member."""
    allowed = (left(room, user, device), joined(room, user, device))
    assert all(f in allowed for f in seen), (who, seen)
    assert seen.count(left(room, user, device)) <= 1, (who, seen)
    assert seen and seen[-1] == joined(room, user, device), (who, seen)


async def test_takeover_room_events_reach_every_peer_in_order(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    """Twelve takeovers at once, the new connection re-subscribing at staggered moments (more
    chances for the race between the old connection's `left` and the new one's `joined`),
    with a peer next to each of the two connections."""
    a, b = pair

    async def one(n: int) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]:
        room, user = uid(f"tr{n}"), uid(f"tu{n}")
        old = await conns.open(a, user, "d")
        near_old = await conns.open(a, uid("pa"), "p")
        near_new = await conns.open(b, uid("pb"), "p")
        expect_subscribed(await subscribe(old, room), room, [])
        await subscribe(near_old, room)
        await subscribe(near_new, room)
        await collect(old, 2, 5)
        await collect(near_old, 1, 5)
        new = await conns.open(b, user, "d")
        await asyncio.sleep(0.002 * n)  # sweep the new subscribe across the old cleanup
        await new.send(type="subscribe", room=room)
        assert (await new.recv())["type"] == "subscribed"
        assert await closed_code(old) == 4009
        seen_a, seen_b = await asyncio.gather(frames_for(near_old, 1.5), frames_for(near_new, 1.5))
        return room, user, seen_a, seen_b

    for room, user, seen_a, seen_b in await asyncio.gather(*(one(n) for n in range(12))):
        check_takeover_events(seen_a, room, user, "d", "peer on the old connection's instance")
        check_takeover_events(seen_b, room, user, "d", "peer on the new connection's instance")


async def test_takeover_on_the_same_instance_and_back(
    pair: tuple[ServerProcess, ServerProcess], conns: Conns
) -> None:
    a, b = pair
    user = uid("same")
    w = await conns.open(b, uid("watch"), "w")
    await w.send(type="watch", users=[user])
    await w.recv()
    first = await conns.open(a, user, "d1")
    assert await w.recv() == changed(user, ["d1"])
    second = await conns.open(a, user, "d1")
    assert await closed_code(first) == 4009
    third = await conns.open(b, user, "d1")
    assert await closed_code(second) == 4009
    await w.nothing(0.5)
    await pong(third)
    await third.close()
    assert await w.recv() == changed(user, [])


# ---------------------------------------------------------------------------- §9 ICE servers


async def test_ice_servers_in_welcome_and_refreshed(clusters: Clusters, conns: Conns) -> None:
    for n, server in enumerate(clusters.main):
        user = f"ice.user@example.org:{n}-{uuid.uuid4().hex[:8]}"  # ':' inside the user id
        before = time.time()
        c = await conns.open(server, user, "d1")
        after = time.time()
        check_ice(c.welcome.get("ice_servers"), user, before, after)
        before = time.time()
        await c.send(type="refresh", token=token(user, "d1", ttl=700), id="ice")
        reply = await c.recv()
        after = time.time()
        assert reply["type"] == "refreshed" and reply["id"] == "ice", reply
        assert set(reply) == {"type", "expires_at", "id", "ice_servers"}, reply
        check_ice(reply["ice_servers"], user, before, after)

    # without TURN/STUN settings there is no such field
    for server in clusters.ttl[:2]:
        user = uid("noice")
        c = await conns.open(server, user, "d1")
        assert "ice_servers" not in c.welcome, c.welcome
        await c.send(type="refresh", token=token(user, "d1"), id="r")
        reply = await c.recv()
        assert reply == {"type": "refreshed", "expires_at": reply["expires_at"], "id": "r"}


# ---------------------------------------------------------------------------- §1 origins


async def test_allowed_origins(pair: tuple[ServerProcess, ServerProcess], conns: Conns) -> None:
    for server in pair:
        for origin in ORIGINS:
            url = f"{server.ws_url}?token={token(uid('org'), 'd1')}"
            ws = conns.track(await websockets.connect(url, origin=origin, open_timeout=10))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
        for origin in [
            "https://c.example",
            "http://a.example",
            "https://a.example:8443",
            "https://a.example.evil.org",
            "null",
        ]:
            url = f"{server.ws_url}?token={token(uid('org'), 'd1')}"
            status, body = await rejected(url, origin=origin)
            assert status == 403, (origin, body)
            assert body["error"] == "forbidden_origin", (origin, body)
        # non-browser clients send no Origin at all
        user = uid("noorigin")
        c = await conns.open(server, user, "d1")
        assert c.welcome["user_id"] == user


# ---------------------------------------------------------------------------- SIGKILL janitor


async def test_sigkilled_instance_members_left_and_watchers_told(
    clusters: Clusters, conns: Conns
) -> None:
    a, b, c = clusters.ttl
    room = uid("room")
    x, y, z = uid("x"), uid("y"), uid("z")
    dead, dead2 = uid("dead"), uid("dead2")

    cx = await conns.open(a, x, "dx")
    cy = await conns.open(b, y, "dy")
    expect_subscribed(await subscribe(cx, room), room, [])
    expect_subscribed(await subscribe(cy, room), room, [member(x, "dx")])
    assert await cx.recv() == joined(room, y, "dy")
    d1 = await conns.open(c, dead, "d1")
    d2 = await conns.open(c, dead2, "d2")
    keep = await conns.open(a, dead2, "keep")  # dead2 keeps one device on a survivor
    expect_subscribed(await subscribe(d1, room), room, [member(x, "dx"), member(y, "dy")])
    # MAX_ROOM_MEMBERS is the default on these instances
    expect_subscribed(
        await subscribe(d2, room), room, [member(x, "dx"), member(y, "dy"), member(dead, "d1")]
    )
    for client in (cx, cy):
        assert_same_frames(
            await collect(client, 2, 5), [joined(room, dead, "d1"), joined(room, dead2, "d2")]
        )
    assert await d1.recv() == joined(room, dead2, "d2")
    await keep.nothing(0.1)

    w = await conns.open(a, uid("w"), "w")
    w2 = await conns.open(b, uid("w2"), "w")
    await w.send(type="watch", users=[dead, dead2], id="w")
    assert await w.recv() == {
        "type": "presence",
        "users": {
            dead: {"online": True, "devices": ["d1"]},
            dead2: {"online": True, "devices": ["d2", "keep"]},
        },
        "id": "w",
    }
    await w2.send(type="watch", users=[dead])
    assert await w2.recv() == {
        "type": "presence",
        "users": {dead: {"online": True, "devices": ["d1"]}},
    }

    # steady state: the doomed instance heart-beats at least once after its devices connected
    # (PRESENCE_TTL / 3 apart), so nothing about them is fresher than its liveness key
    await asyncio.sleep(PRESENCE_TTL / 3 * 1.5)

    killed_at = time.monotonic()
    c.stop(signal.SIGKILL)
    budget = PRESENCE_TTL + RESUME_WINDOW + 4  # seconds after the kill

    async def within_budget(client: Client, count: int) -> list[dict[str, Any]]:
        """Up to ``count`` frames: those that arrive before the budget runs out."""
        out: list[dict[str, Any]] = []
        while len(out) < count:
            left_s = budget - (time.monotonic() - killed_at)
            if left_s <= 0:
                break
            try:
                out.append(sort_presence(await client.recv(left_s)))
            except TimeoutError:
                break
        return out

    rx, ry, rw, rw2 = await asyncio.gather(
        within_budget(cx, 2), within_budget(cy, 2), within_budget(w, 2), within_budget(w2, 1)
    )
    # room members on both survivors are told within the budget, each departure once
    expected_left = [left(room, dead, "d1"), left(room, dead2, "d2")]
    assert_same_frames(rx, expected_left)
    assert_same_frames(ry, expected_left)
    # exactly once: no duplicate from the other survivor's janitor (nor a late report)
    late_x, late_y, late_w, late_w2 = await asyncio.gather(
        frames_for(cx, 3.0), frames_for(cy, 3.0), frames_for(w, 3.0), frames_for(w2, 3.0)
    )
    assert late_x == [] and late_y == [], (late_x, late_y)
    await keep.nothing(0.1)

    # the dead devices are gone for direct messages and from the room
    await cx.send(type="offer", to=dead, to_device="d1", payload={"sdp": "x"}, id="gone")
    assert_error(await cx.recv(), "peer_offline", "gone", to=dead)
    await cy.send(type="offer", to=dead, payload={"sdp": "x"})
    assert_error(await cy.recv(), "peer_offline", to=dead)
    await cx.send(type="candidate", to=dead2, to_device="d2", payload={}, id="gone2")
    assert_error(await cx.recv(), "peer_offline", "gone2", to=dead2)
    await cx.send(type="publish", room=room, payload="after", id="after")
    assert (await cy.recv())["payload"] == "after"
    assert await cx.recv() == {"type": "ack", "id": "after", "devices": 1}
    cz = await conns.open(b, z, "dz")
    expect_subscribed(await subscribe(cz, room), room, [member(x, "dx"), member(y, "dy")])
    await w.send(type="presence", users=[dead, dead2], id="q")
    assert await w.recv() == {
        "type": "presence",
        "users": {
            dead: {"online": False, "devices": []},
            dead2: {"online": True, "devices": ["keep"]},
        },
        "id": "q",
    }
    # the killed instance's clients were cut off
    for client in (d1, d2):
        with pytest.raises(ConnectionClosed):
            await client.recv(timeout=2)

    # watchers on both survivors were told, within the budget and once
    expected_w = [changed(dead, []), changed(dead2, ["keep"])]
    assert sorted(map(key, rw)) == sorted(map(key, expected_w)), (
        f"watcher on the first survivor: got {rw} within {budget} s (then {late_w}), "
        f"expected {expected_w}"
    )
    assert rw2 == [changed(dead, [])], (
        f"watcher on the second survivor: got {rw2} within {budget} s (then {late_w2})"
    )
    assert late_w == [] and late_w2 == [], (late_w, late_w2)

    # the device of the dead instance can connect again elsewhere and is reported online
    await conns.open(b, dead, "d1")
    assert await w.recv() == changed(dead, ["d1"])
    assert await w2.recv() == changed(dead, ["d1"])
