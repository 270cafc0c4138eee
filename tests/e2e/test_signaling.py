"""End-to-end signaling across two real server processes sharing one real Redis, driven with
the ``websockets`` client: PROTOCOL.md §1 (connecting, auth), §2 (frames), §3 (direct
signaling), §5 (presence query), §6 (ping), §7 (errors and limits) and §8 (health/ready).

Most tests share one pair of instances (module fixture ``cluster``); every test uses its own
user names (presence lives in Redis and outlives a test).  The rate-limit test starts its own
pair with a small budget.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support import (
    SECRET,
    Client,
    Conns,
    RedisServer,
    ServerProcess,
    closed_code,
    http_get,
    now_ms,
    server_env,
    start_server,
    token,
    uid,
)

pytestmark = pytest.mark.e2e

MAX_DEVICES = 3
MAX_BYTES = 4096
SHARED_RATE = 1000


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess

    def __iter__(self) -> Iterator[ServerProcess]:
        return iter((self.a, self.b))


def _start_pair(env: dict[str, str]) -> Pair:
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, env) for _ in range(2)]
        started: list[ServerProcess] = []
        errors: list[BaseException] = []
        for fut in futures:
            try:
                started.append(fut.result())
            except BaseException as exc:  # re-raised below
                errors.append(exc)
    if errors:
        for server in started:
            server.stop()
        raise errors[0]
    return Pair(started[0], started[1])


@contextlib.contextmanager
def _pair(env: dict[str, str]) -> Iterator[Pair]:
    pair = _start_pair(env)
    try:
        yield pair
    finally:
        for server in pair:
            server.stop()


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Pair]:
    """Two instances on one Redis, with limits that the shared tests rely on."""
    env = server_env(
        redis_server.url,
        RATE_LIMIT=f"{SHARED_RATE}/second",
        MAX_DEVICES_PER_USER=str(MAX_DEVICES),
        MAX_MESSAGE_BYTES=str(MAX_BYTES),
        MAX_TOKEN_TTL="3600",
    )
    with _pair(env) as pair:
        yield pair


async def recv_raw(client: Client, timeout: float = 5.0) -> str:
    raw = await asyncio.wait_for(client.ws.recv(), timeout)
    assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
    return raw


async def rejected(url: str, **kw: Any) -> tuple[int, dict[str, Any], Any]:
    """Try an upgrade that must be refused; (status, JSON body, headers)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(url, open_timeout=10, **kw)
        await ws.close()
    response = info.value.response
    return response.status_code, json.loads(response.body), response.headers


async def assert_pong(client: Client, msg_id: str | None = None) -> dict[str, Any]:
    before = now_ms()
    if msg_id is None:
        await client.send(type="ping")
    else:
        await client.send(type="ping", id=msg_id)
    pong = await client.recv()
    after = now_ms()
    assert pong["type"] == "pong", pong
    assert isinstance(pong["ts"], int) and before - 1000 <= pong["ts"] <= after + 1000, pong
    if msg_id is None:
        assert "id" not in pong, pong
    else:
        assert pong["id"] == msg_id, pong
    return pong


async def presence(client: Client, users: list[str], msg_id: str = "pq") -> dict[str, Any]:
    await client.send(type="presence", users=users, id=msg_id)
    reply = await client.recv_type("presence")
    assert reply["id"] == msg_id, reply
    users_body = reply["users"]
    assert isinstance(users_body, dict)
    return users_body


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---------------------------------------------------------------------------- §8 endpoints


def test_health_and_ready_on_both_instances(cluster: Pair) -> None:
    for server in cluster:
        before = int(time.time())
        status, body = http_get(server.http + "/health")
        assert status == 200, body
        health = json.loads(body)
        assert health["status"] == "healthy"
        assert isinstance(health["timestamp"], int)
        assert before - 5 <= health["timestamp"] <= int(time.time()) + 5

        status, body = http_get(server.http + "/ready")
        assert status == 200, body
        assert json.loads(body)["status"] == "ready"


# ---------------------------------------------------------------------------- §1 connecting


async def test_welcome_frame_on_both_instances(cluster: Pair, conns: Conns) -> None:
    user = uid("welcome")
    seen_ids = set()
    for n, server in enumerate(cluster):
        device = f"dev-{n}"
        tok = token(user, device, ttl=900)
        exp = jwt.decode(tok, SECRET, algorithms=["HS256"])["exp"]
        before = now_ms()
        ws = conns.track(await websockets.connect(f"{server.ws_url}?token={tok}", open_timeout=10))
        raw = await asyncio.wait_for(ws.recv(), 5)
        after = now_ms()
        assert isinstance(raw, str)
        welcome = json.loads(raw)
        assert welcome["type"] == "welcome"
        assert welcome["user_id"] == user
        assert welcome["device_id"] == device
        assert isinstance(welcome["connection_id"], str) and welcome["connection_id"]
        assert welcome["expires_at"] == exp
        assert isinstance(welcome["server_time"], int)
        assert before - 1000 <= welcome["server_time"] <= after + 1000
        assert welcome["rate_limit"] == {"limit": SHARED_RATE, "period_s": 1}
        seen_ids.add(welcome["connection_id"])
    assert len(seen_ids) == 2


async def test_token_in_authorization_header(cluster: Pair, conns: Conns) -> None:
    user = uid("hdr")
    ws = conns.track(
        await websockets.connect(
            cluster.b.ws_url,
            additional_headers={"Authorization": f"Bearer {token(user, 'd1')}"},
            open_timeout=10,
        )
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome"
    assert (welcome["user_id"], welcome["device_id"]) == (user, "d1")


async def test_token_in_subprotocol_selects_signaling_v1(cluster: Pair, conns: Conns) -> None:
    user = uid("subp")
    tok = token(user, "d1")
    ws = conns.track(
        await websockets.connect(
            cluster.a.ws_url,
            subprotocols=["signaling.v1", f"bearer.{tok}"],  # type: ignore[list-item]
            open_timeout=10,
        )
    )
    assert ws.subprotocol == "signaling.v1"
    assert ws.response.headers["Sec-WebSocket-Protocol"] == "signaling.v1"
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome"
    assert (welcome["user_id"], welcome["device_id"]) == (user, "d1")


async def test_empty_query_token_counts_as_absent(cluster: Pair, conns: Conns) -> None:
    user = uid("empty")
    # alone: no token at all
    status, body, _ = await rejected(f"{cluster.a.ws_url}?token=")
    assert status == 401
    assert body["error"] == "missing_token"
    # with a header: the header's token is used
    ws = conns.track(
        await websockets.connect(
            f"{cluster.a.ws_url}?token=",
            additional_headers={"Authorization": f"Bearer {token(user, 'd1')}"},
            open_timeout=10,
        )
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome" and welcome["user_id"] == user
    # with a subprotocol: likewise
    ws = conns.track(
        await websockets.connect(
            f"{cluster.b.ws_url}?token=",
            subprotocols=["signaling.v1", f"bearer.{token(user, 'd2')}"],  # type: ignore[list-item]
            open_timeout=10,
        )
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert welcome["type"] == "welcome" and welcome["device_id"] == "d2"


async def test_first_carrier_found_wins(cluster: Pair, conns: Conns) -> None:
    user = uid("first")
    # a valid query token wins over a broken header
    ws = conns.track(
        await websockets.connect(
            f"{cluster.a.ws_url}?token={token(user, 'd1')}",
            additional_headers={"Authorization": "Bearer not-a-token"},
            open_timeout=10,
        )
    )
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
    # a broken query token wins over a valid header
    status, body, _ = await rejected(
        f"{cluster.a.ws_url}?token=not-a-token",
        additional_headers={"Authorization": f"Bearer {token(user, 'd2')}"},
    )
    assert (status, body["error"]) == (401, "invalid_token")


async def test_missing_token_401(cluster: Pair) -> None:
    for server in cluster:
        for kw in (
            {},
            {"additional_headers": {"Authorization": "Bearer "}},
            {"subprotocols": ["signaling.v1"]},
            {"additional_headers": {"Authorization": "Basic dXNlcjpwYXNz"}},
        ):
            status, body, headers = await rejected(server.ws_url, **kw)
            assert status == 401, (kw, body)
            assert body["error"] == "missing_token", (kw, body)
            assert isinstance(body["message"], str) and body["message"]
            assert "application/json" in headers.get("Content-Type", "")


def _bad_tokens(user: str) -> dict[str, str]:
    now = int(time.time())
    claims = {"user_id": user, "device_id": "d1", "iat": now, "exp": now + 600}
    none_token = (
        b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        + "."
        + b64url(json.dumps(claims).encode())
        + "."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that the key is short for HS512
        hs512 = jwt.encode(claims, SECRET, algorithm="HS512")
    return {
        "bad_signature": token(user, "d1", secret="another-secret-0123456789-abcdefghijklmn"),
        "alg_none": none_token,
        "alg_hs512": hs512,
        "malformed": "not-a-jwt",
        "malformed_parts": "aaa.bbb.ccc",
        "no_device_id": jwt.encode(
            {"user_id": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256"
        ),
        "no_user_id": jwt.encode(
            {"device_id": "d1", "iat": now, "exp": now + 600}, SECRET, algorithm="HS256"
        ),
        "no_exp": jwt.encode({"user_id": user, "device_id": "d1", "iat": now}, SECRET),
        "user_with_space": token("bad user", "d1"),
        "user_with_slash": token("bad/user", "d1"),
        "device_with_bad_char": token(user, "dev#1"),
        "user_too_long": token("u" * 129, "d1"),
        "user_not_string": jwt.encode(
            {"user_id": 42, "device_id": "d1", "exp": now + 600}, SECRET, algorithm="HS256"
        ),
        "not_before_in_future": token(user, "d1", nbf=now + 120),
    }


async def test_invalid_tokens_401_before_upgrade(cluster: Pair) -> None:
    user = uid("bad")
    for server in cluster:
        for name, tok in _bad_tokens(user).items():
            status, body, _ = await rejected(f"{server.ws_url}?token={tok}")
            assert status == 401, (name, body)
            assert body["error"] == "invalid_token", (name, body)
            assert isinstance(body["message"], str) and body["message"], (name, body)
            assert tok not in body["message"]
    # the same through the other two carriers
    tok = _bad_tokens(user)["bad_signature"]
    status, body, _ = await rejected(
        cluster.a.ws_url, additional_headers={"Authorization": f"Bearer {tok}"}
    )
    assert (status, body["error"]) == (401, "invalid_token")
    status, body, _ = await rejected(
        cluster.b.ws_url, subprotocols=["signaling.v1", f"bearer.{tok}"]
    )
    assert (status, body["error"]) == (401, "invalid_token")


async def test_expired_and_too_long_tokens_401(cluster: Pair, conns: Conns) -> None:
    user = uid("ttl")
    for server in cluster:
        status, body, _ = await rejected(f"{server.ws_url}?token={token(user, 'd1', ttl=-30)}")
        assert (status, body["error"]) == (401, "token_expired"), body
        assert body["message"]

        status, body, _ = await rejected(f"{server.ws_url}?token={token(user, 'd1', ttl=3720)}")
        assert (status, body["error"]) == (401, "token_lifetime_too_long"), body
        assert body["message"]

        status, body, _ = await rejected(
            server.ws_url,
            additional_headers={"Authorization": f"Bearer {token(user, 'd1', ttl=86400)}"},
        )
        assert (status, body["error"]) == (401, "token_lifetime_too_long"), body
    # exactly MAX_TOKEN_TTL is fine
    client = await conns.open(cluster.a, user, "d1", ttl=3600)
    assert client.welcome["user_id"] == user


# ---------------------------------------------------------------------------- §3 signaling


async def test_direct_types_across_instances_both_ways(cluster: Pair, conns: Conns) -> None:
    alice, bob = uid("alice"), uid("bob")
    ca = await conns.open(cluster.a, alice, "a-phone")
    cb = await conns.open(cluster.b, bob, "b-laptop")
    payloads: dict[str, Any] = {
        "offer": {"sdp": "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\n", "type": "offer"},
        "answer": {"sdp": "v=0\r\n", "type": "answer"},
        "candidate": {"candidate": "candidate:1 1 udp 2122260223 x 5000 typ host", "sdpMid": "0"},
        "bye": "ciphertext:AAECAwQ=",
    }
    for sender, receiver, to, frm, dev in (
        (ca, cb, bob, alice, "a-phone"),
        (cb, ca, alice, bob, "b-laptop"),
    ):
        for kind, payload in payloads.items():
            msg_id = f"{kind}-{frm[:5]}"
            before = now_ms()
            await sender.send(type=kind, to=to, payload=payload, id=msg_id)
            got = await receiver.recv()
            after = now_ms()
            assert got == {
                "type": kind,
                "from": frm,
                "from_device": dev,
                "payload": payload,
                "ts": got["ts"],
                "id": msg_id,
            }
            assert isinstance(got["ts"], int) and before - 1000 <= got["ts"] <= after + 1000
            ack = await sender.recv()
            assert ack == {"type": "ack", "id": msg_id, "devices": 1}
            # without an id: delivered without id, and no ack
            await sender.send(type=kind, to=to, payload=payload)
            got = await receiver.recv()
            assert "id" not in got, got
            assert got["type"] == kind and got["from"] == frm and got["payload"] == payload
            assert isinstance(got["ts"], int)
            await sender.nothing(0.2)
    await ca.nothing(0.1)
    await cb.nothing(0.1)


async def test_payload_delivered_byte_for_byte(cluster: Pair, conns: Conns) -> None:
    alice, bob = uid("alice"), uid("bob")
    ca = await conns.open(cluster.a, alice, "a1")
    cb = await conns.open(cluster.b, bob, "b1")
    weird = (
        '{ "sdp" :\t"v=0\\r\\n\\u00e9\\ud83d\\ude00 \\"q\\" \\/" ,\n'
        '  "n": 1.50E+2, "big": 12345678901234567890123, "x" : [ ] ,"u":"é😀",'
        '"z":{"b":1,"a":2} }'
    )
    cases = [
        weird,
        '"  ciphertext with \\u0041 escapes  "',
        "[1, 2 ,3]",
        "null",
        "-0.0e-0",
    ]
    for n, payload_text in enumerate(cases):
        frame = '{"type":"offer","to":"' + bob + f'","id":"p{n}","payload":' + payload_text + "}"
        await ca.send_raw(frame)
        raw = await recv_raw(cb)
        assert ('"payload":' + payload_text) in raw, raw
        assert json.loads(raw)["payload"] == json.loads(payload_text)
        assert await ca.recv() == {"type": "ack", "id": f"p{n}", "devices": 1}
    # payload before `to` and with whitespace around the colon, answer direction
    frame = '{"payload" :  ' + weird + ' , "type":"answer","to":"' + alice + '"}'
    await cb.send_raw(frame)
    raw = await recv_raw(ca)
    assert weird in raw, raw


async def test_fan_out_to_all_devices_over_both_instances(cluster: Pair, conns: Conns) -> None:
    alice, bob = uid("alice"), uid("bob")
    sender = await conns.open(cluster.a, alice, "a1")
    b1 = await conns.open(cluster.a, bob, "b1")  # same instance as the sender
    b2 = await conns.open(cluster.b, bob, "b2")
    b3 = await conns.open(cluster.b, bob, "b3")
    await sender.send(type="offer", to=bob, payload={"sdp": "x"}, id="fan")
    for device in (b1, b2, b3):
        got = await device.recv()
        assert got["type"] == "offer" and got["from"] == alice and got["id"] == "fan"
        assert got["from_device"] == "a1" and got["payload"] == {"sdp": "x"}
    assert await sender.recv() == {"type": "ack", "id": "fan", "devices": 3}
    await asyncio.gather(*(c.nothing(0.3) for c in (sender, b1, b2, b3)))

    # two devices once b1 is gone (clean close: offline at once)
    await b1.close()
    await asyncio.sleep(0.1)
    await sender.send(type="candidate", to=bob, payload={"candidate": "c"}, id="fan2")
    for device in (b2, b3):
        assert (await device.recv())["id"] == "fan2"
    assert await sender.recv() == {"type": "ack", "id": "fan2", "devices": 2}


async def test_to_device_targets_one_device(cluster: Pair, conns: Conns) -> None:
    alice, bob = uid("alice"), uid("bob")
    sender = await conns.open(cluster.b, alice, "a1")
    b1 = await conns.open(cluster.a, bob, "b1")
    b2 = await conns.open(cluster.b, bob, "b2")
    b3 = await conns.open(cluster.a, bob, "b3")
    for target, client, others in (("b1", b1, (b2, b3)), ("b2", b2, (b1, b3))):
        await sender.send(
            type="candidate", to=bob, to_device=target, payload={"c": target}, id=f"td-{target}"
        )
        got = await client.recv()
        assert got["type"] == "candidate" and got["payload"] == {"c": target}
        assert got["from"] == alice and got["from_device"] == "a1"
        assert await sender.recv() == {"type": "ack", "id": f"td-{target}", "devices": 1}
        await asyncio.gather(*(o.nothing(0.3) for o in others))


async def test_never_back_to_the_sending_device(cluster: Pair, conns: Conns) -> None:
    me = uid("me")
    d1 = await conns.open(cluster.a, me, "d1")
    # alone: messaging oneself has nowhere to go
    await d1.send(type="offer", to=me, payload={}, id="self0")
    err = await d1.recv()
    assert err["type"] == "error" and err["code"] == "peer_offline", err
    assert err["id"] == "self0" and err["to"] == me
    # with another device on the other instance: only that device gets it
    d2 = await conns.open(cluster.b, me, "d2")
    await d1.send(type="offer", to=me, payload={"hi": 1}, id="self1")
    got = await d2.recv()
    assert got["from"] == me and got["from_device"] == "d1" and got["payload"] == {"hi": 1}
    assert await d1.recv() == {"type": "ack", "id": "self1", "devices": 1}
    await d1.nothing(0.3)
    # naming one's own device: peer_offline
    await d1.send(type="offer", to=me, to_device="d1", payload={}, id="self2")
    err = await d1.recv()
    assert err["type"] == "error" and err["code"] == "peer_offline", err
    assert err["id"] == "self2" and err["to"] == me
    await d2.nothing(0.3)
    # the other way round
    await d2.send(type="bye", to=me, to_device="d1", payload=None, id="self3")
    got = await d1.recv()
    assert got["type"] == "bye" and got["from_device"] == "d2" and got["payload"] is None
    assert await d2.recv() == {"type": "ack", "id": "self3", "devices": 1}


async def test_peer_offline(cluster: Pair, conns: Conns) -> None:
    alice, bob, ghost = uid("alice"), uid("bob"), uid("ghost")
    ca = await conns.open(cluster.a, alice, "a1")
    cb = await conns.open(cluster.b, bob, "b1")
    # user offline, with id
    await ca.send(type="offer", to=ghost, payload={}, id="po1")
    err = await ca.recv()
    assert err["type"] == "error" and err["code"] == "peer_offline"
    assert err["id"] == "po1" and err["to"] == ghost
    assert isinstance(err["message"], str) and err["message"]
    # user offline, without id: still told
    await ca.send(type="candidate", to=ghost, payload={})
    err = await ca.recv()
    assert err["type"] == "error" and err["code"] == "peer_offline" and err["to"] == ghost
    assert "id" not in err
    # user online but the named device is not
    await ca.send(type="offer", to=bob, to_device="b9", payload={}, id="po2")
    err = await ca.recv()
    assert err["code"] == "peer_offline" and err["id"] == "po2" and err["to"] == bob
    await ca.send(type="offer", to=bob, to_device="b9", payload={})
    err = await ca.recv()
    assert err["code"] == "peer_offline" and err["to"] == bob and "id" not in err
    await cb.nothing(0.3)
    # once the recipient closed cleanly
    await cb.close()
    await asyncio.sleep(0.1)
    await ca.send(type="answer", to=bob, payload={}, id="po3")
    err = await ca.recv()
    assert err["code"] == "peer_offline" and err["id"] == "po3" and err["to"] == bob


async def test_order_preserved_across_instances(cluster: Pair, conns: Conns) -> None:
    alice, bob = uid("alice"), uid("bob")
    sender = await conns.open(cluster.a, alice, "a1")
    remote = await conns.open(cluster.b, bob, "b-remote")
    local = await conns.open(cluster.a, bob, "b-local")
    n = 200
    frames = [
        json.dumps({"type": "candidate", "to": bob, "payload": {"n": i}, "id": f"o{i}"})
        for i in range(n)
    ]
    # send as fast as possible, then read
    for frame in frames:
        await sender.ws.send(frame)

    async def collect(client: Client) -> list[int]:
        got = []
        for _ in range(n):
            msg = await client.recv(10)
            assert msg["type"] == "candidate", msg
            got.append(msg["payload"]["n"])
        return got

    async def acks() -> list[str]:
        got = []
        for _ in range(n):
            msg = await sender.recv(10)
            assert msg["type"] == "ack" and msg["devices"] == 2, msg
            got.append(msg["id"])
        return got

    on_b, on_a, acked = await asyncio.gather(collect(remote), collect(local), acks())
    assert on_b == list(range(n))
    assert on_a == list(range(n))
    assert acked == [f"o{i}" for i in range(n)]  # replies keep the frames' order too


# ---------------------------------------------------------------------------- §5 presence


async def test_presence_query_across_instances(cluster: Pair, conns: Conns) -> None:
    asker, on_a, on_b, both, nobody = (uid(p) for p in ("ask", "ona", "onb", "both", "nobody"))
    qa = await conns.open(cluster.a, asker, "q1")
    qb = await conns.open(cluster.b, asker, "q2")
    await conns.open(cluster.a, on_a, "pa")
    await conns.open(cluster.b, on_b, "pb")
    await conns.open(cluster.a, both, "x1")
    await conns.open(cluster.b, both, "x2")
    await conns.open(cluster.b, both, "x3")
    users = [on_a, on_b, both, nobody]
    for client in (qa, qb):
        body = await presence(client, users, msg_id=f"pq-{client.welcome['device_id']}")
        assert set(body) == set(users)
        assert body[on_a] == {"online": True, "devices": ["pa"]}
        assert body[on_b] == {"online": True, "devices": ["pb"]}
        assert body[both]["online"] is True
        assert sorted(body[both]["devices"]) == ["x1", "x2", "x3"]
        assert body[nobody] == {"online": False, "devices": []}
    # the asker sees itself (both of its devices)
    body = await presence(qa, [asker])
    assert body[asker]["online"] is True and sorted(body[asker]["devices"]) == ["q1", "q2"]
    # without an id: no id in the reply
    await qa.send(type="presence", users=[on_a])
    reply = await qa.recv()
    assert reply["type"] == "presence" and "id" not in reply
    assert reply["users"] == {on_a: {"online": True, "devices": ["pa"]}}


async def test_presence_offline_promptly_after_clean_close(cluster: Pair, conns: Conns) -> None:
    asker, leaver = uid("ask"), uid("leaver")
    q = await conns.open(cluster.a, asker, "q1")
    keep = await conns.open(cluster.a, leaver, "stay")
    gone = await conns.open(cluster.b, leaver, "go")
    body = await presence(q, [leaver])
    assert sorted(body[leaver]["devices"]) == ["go", "stay"]
    await gone.close()
    deadline = time.monotonic() + 1.0
    while True:
        body = await presence(q, [leaver])
        if body[leaver]["devices"] == ["stay"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert body[leaver] == {"online": True, "devices": ["stay"]}
    await keep.close()
    deadline = time.monotonic() + 1.0
    while True:
        body = await presence(q, [leaver])
        if not body[leaver]["online"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert body[leaver] == {"online": False, "devices": []}


async def test_presence_query_limit(cluster: Pair, conns: Conns) -> None:
    q = await conns.open(cluster.b, uid("ask"), "q1")
    hundred = [f"u{i}" for i in range(100)]
    body = await presence(q, hundred, msg_id="ok100")
    assert set(body) == set(hundred)
    assert all(v == {"online": False, "devices": []} for v in body.values())
    await q.send(type="presence", users=[*hundred, "u100"], id="too-many")
    err = await q.recv()
    assert err["type"] == "error" and err["code"] == "invalid_message", err
    assert err["id"] == "too-many"
    await assert_pong(q, "after-presence")
    # a malformed user name, and users that are not a list
    for users in (["bad user"], "u1", [1, 2]):
        await q.send(type="presence", users=users, id="bad")
        err = await q.recv()
        assert err["code"] == "invalid_message" and err["id"] == "bad", (users, err)
    await q.send(type="presence", id="nousers")
    err = await q.recv()
    assert err["code"] == "invalid_message" and err["id"] == "nousers", err
    await assert_pong(q)


# ---------------------------------------------------------------------------- devices


async def test_max_devices_per_user_cluster_wide(cluster: Pair, conns: Conns) -> None:
    user = uid("many")
    await conns.open(cluster.a, user, "d1")
    await conns.open(cluster.b, user, "d2")
    d3 = await conns.open(cluster.a, user, "d3")
    for server in cluster:
        status, body, _ = await rejected(f"{server.ws_url}?token={token(user, 'd4')}")
        assert status == 429, body
        assert body["error"] == "too_many_devices"
        assert isinstance(body["message"], str) and body["message"]
    # the same device again is not an extra device (it replaces the old connection)
    again = await conns.open(cluster.b, user, "d1")
    assert again.welcome["device_id"] == "d1"
    # a device that leaves frees its slot
    await d3.close()
    deadline = time.monotonic() + 2.0
    while True:
        try:
            d4 = await conns.open(cluster.b, user, "d4")
            break
        except InvalidStatus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert d4.welcome["device_id"] == "d4"
    # other users are not affected
    other = await conns.open(cluster.a, uid("other"), "d1")
    assert other.welcome["type"] == "welcome"


async def test_device_takeover_across_instances(cluster: Pair, conns: Conns) -> None:
    user, peer = uid("take"), uid("peer")
    old = await conns.open(cluster.a, user, "phone")
    watcher = await conns.open(cluster.a, peer, "w1")
    new = await conns.open(cluster.b, user, "phone")
    assert await closed_code(old) == 4009
    assert old.ws.close_code == 4009
    await asyncio.sleep(0.3)  # let the old connection's clean-up run: it must not undo the new
    # the new connection is the device now: messages reach it, presence lists it once
    await watcher.send(type="offer", to=user, payload={"v": 1}, id="t1")
    got = await new.recv()
    assert got["payload"] == {"v": 1} and got["from"] == peer
    assert await watcher.recv() == {"type": "ack", "id": "t1", "devices": 1}
    body = await presence(watcher, [user])
    assert body[user] == {"online": True, "devices": ["phone"]}
    await assert_pong(new)
    # and back on the first instance, replacing the second connection
    newest = await conns.open(cluster.a, user, "phone")
    assert await closed_code(new) == 4009
    await watcher.send(type="offer", to=user, payload={"v": 2}, id="t2")
    assert (await newest.recv())["payload"] == {"v": 2}
    assert await watcher.recv() == {"type": "ack", "id": "t2", "devices": 1}


async def test_device_takeover_on_same_instance(cluster: Pair, conns: Conns) -> None:
    user = uid("take1")
    old = await conns.open(cluster.b, user, "phone")
    new = await conns.open(cluster.b, user, "phone")
    assert await closed_code(old) == 4009
    await assert_pong(new)


# ---------------------------------------------------------------------------- §2 / §7 errors


async def test_errors_keep_the_connection_open(cluster: Pair, conns: Conns) -> None:
    user = uid("err")
    c = await conns.open(cluster.a, user, "d1")
    long_id = "x" * 65
    cases: list[tuple[str | bytes, str, str | None]] = [
        ("this is not json", "bad_json", None),
        ("{", "bad_json", None),
        ("[1, 2, 3]", "bad_json", None),
        ('[{"type": "ping"}]', "bad_json", None),
        ('"ping"', "bad_json", None),
        ("42", "bad_json", None),
        ("null", "bad_json", None),
        (b"\x00\x01binary", "bad_frame", None),
        (b'{"type": "ping"}', "bad_frame", None),
        ('{"id": "m1"}', "invalid_message", "m1"),
        ('{"type": 5, "id": "m2"}', "invalid_message", "m2"),
        ('{"type": null, "id": "m3"}', "invalid_message", "m3"),
        ('{"type": "frobnicate", "id": "m4"}', "unknown_type", "m4"),
        ('{"type": "frobnicate"}', "unknown_type", None),
        (json.dumps({"type": "ping", "id": long_id}), "invalid_message", None),
        (json.dumps({"type": "offer", "to": "bob", "id": long_id}), "invalid_message", None),
        ('{"type": "offer", "to": "bad user", "id": "m5"}', "invalid_message", "m5"),
        ('{"type": "offer", "to": "a/b", "id": "m6"}', "invalid_message", "m6"),
        (json.dumps({"type": "offer", "to": "u" * 129, "id": "m7"}), "invalid_message", "m7"),
        ('{"type": "offer", "to": "", "id": "m8"}', "invalid_message", "m8"),
        ('{"type": "offer", "to": 7, "id": "m9"}', "invalid_message", "m9"),
        ('{"type": "offer", "payload": {}, "id": "m10"}', "invalid_message", "m10"),
        (
            '{"type": "candidate", "to": "bob", "to_device": "d 1", "id": "m11"}',
            "invalid_message",
            "m11",
        ),
    ]
    for n, (frame, code, msg_id) in enumerate(cases):
        await c.send_raw(frame)
        err = await c.recv()
        assert err["type"] == "error", (frame, err)
        assert err["code"] == code, (frame, err)
        assert isinstance(err["message"], str) and err["message"], (frame, err)
        if msg_id is None:
            assert "id" not in err, (frame, err)
        else:
            assert err["id"] == msg_id, (frame, err)
        await assert_pong(c, f"alive-{n}")
    # an id of exactly 64 characters is fine
    await assert_pong(c, "y" * 64)


async def test_oversize_frame_closes_1009_others_carry_on(cluster: Pair, conns: Conns) -> None:
    big, other, far = uid("big"), uid("other"), uid("far")
    c = await conns.open(cluster.a, big, "d1")
    neighbour = await conns.open(cluster.a, other, "d1")
    remote = await conns.open(cluster.b, far, "d1")
    head = '{"type":"offer","to":"' + far + '","id":"fits","payload":"'
    filler = "x" * (MAX_BYTES - len(head) - 2)
    frame = head + filler + '"}'
    assert len(frame.encode()) == MAX_BYTES
    # exactly the limit is accepted
    await c.send_raw(frame)
    assert (await remote.recv())["payload"] == filler
    assert await c.recv() == {"type": "ack", "id": "fits", "devices": 1}
    # one byte over the limit closes
    await c.send_raw(head + filler + 'x"}')
    assert await closed_code(c) == 1009
    await remote.nothing(0.3)
    await assert_pong(neighbour, "n1")
    await assert_pong(remote, "r1")
    await neighbour.send(type="offer", to=far, payload={"ok": True}, id="after")
    assert (await remote.recv())["payload"] == {"ok": True}
    assert await neighbour.recv() == {"type": "ack", "id": "after", "devices": 1}


# ---------------------------------------------------------------------------- §6 ping


async def test_ping_pong_on_both_instances(cluster: Pair, conns: Conns) -> None:
    user = uid("ping")
    for n, server in enumerate(cluster):
        c = await conns.open(server, user, f"d{n}")
        await assert_pong(c, "p-1")
        await assert_pong(c)
        await assert_pong(c, "")


# ---------------------------------------------------------------------------- §7 rate limit


async def test_rate_limit_is_cluster_wide(redis_server: RedisServer, conns: Conns) -> None:
    env = server_env(redis_server.url, RATE_LIMIT="10/second")
    with _pair(env) as pair:
        user, other = uid("rl"), uid("rl-other")
        d1 = await conns.open(pair.a, user, "d1")
        d2 = await conns.open(pair.b, user, "d2")
        bystander = await conns.open(pair.a, other, "o1")
        assert d1.welcome["rate_limit"] == {"limit": 10, "period_s": 1}
        assert d2.welcome["rate_limit"] == {"limit": 10, "period_s": 1}

        # 12 messages of every kind from both devices at once: exactly 10 get through
        sent1 = [json.dumps({"type": "ping", "id": f"a{i}"}) for i in range(6)]
        sent2: list[str | bytes] = [
            json.dumps({"type": "ping", "id": f"b{i}"}) for i in range(2)
        ] + [
            "not json",
            b"\x01binary",
            '{"type": "frobnicate", "id": "b4"}',
            '{"type": "ping", "id": "b5"}',
        ]
        await asyncio.gather(*(d1.send_raw(f) for f in sent1), *(d2.send_raw(f) for f in sent2))
        replies = [await d1.recv() for _ in sent1] + [await d2.recv() for _ in sent2]
        limited = [r for r in replies if r.get("code") == "rate_limited"]
        assert len(limited) == 2, replies
        assert len(replies) - len(limited) == 10
        for err in limited:
            assert err["type"] == "error"
            assert isinstance(err["retry_after_ms"], int)
            assert not isinstance(err["retry_after_ms"], bool)
            assert 0 < err["retry_after_ms"] <= 1000, err
        await asyncio.gather(d1.nothing(0.2), d2.nothing(0.2))

        # the next one is dropped too, with the id echoed; the peer never sees it
        await d2.send(type="offer", to=other, payload={}, id="dropped")
        err = await d2.recv()
        assert err["type"] == "error" and err["code"] == "rate_limited", err
        assert err["id"] == "dropped"
        assert isinstance(err["retry_after_ms"], int) and err["retry_after_ms"] > 0
        await d1.send(type="ping", id="dropped-too")
        err = await d1.recv()
        assert err["code"] == "rate_limited" and err["id"] == "dropped-too", err
        await bystander.nothing(0.2)

        # other users are not affected
        await assert_pong(bystander, "free")

        # the connections stayed open; after the window the budget is back
        await asyncio.sleep(max(err["retry_after_ms"], 1000) / 1000 + 0.1)
        await assert_pong(d1, "again1")
        await assert_pong(d2, "again2")
        await d2.send(type="offer", to=other, payload={"late": 1}, id="late")
        assert (await bystander.recv())["payload"] == {"late": 1}
        assert await d2.recv() == {"type": "ack", "id": "late", "devices": 1}
        await conns.close_all()
