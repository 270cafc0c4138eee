"""Fault injection against real server processes (issue 4): a slow consumer, a flood of
hostile connections, and Redis becoming unreachable while clients keep sending.

* Slow consumer: a client that stops reading is closed by the server with 1008
  ``slow consumer`` once its bounded outgoing queue overflows; its sender never waits on it
  (every reply within 1 s) and another client of the same server keeps getting its messages.
* Connection flood: hundreds of upgrades with bad tokens (401, fast), oversize frames from
  many connections (1009), malformed frames (error frames), junk on raw TCP — while a good
  pair of clients round-trips offers with acks; afterwards the server is alive and serving.
* Redis unreachable: with Redis stopped, offers get ``internal`` or ``peer_offline`` (never a
  false ``ack``), connections stay open and answer pings; when Redis is back on the same
  port, offers are acked and delivered again within seconds.  The rate limiter fails open
  while Redis is down (documented behaviour), so the messages reach the router at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
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
    connect,
    http_get,
    server_env,
    start_redis,
    start_server,
    token,
    uid,
)

pytestmark = pytest.mark.e2e

FAST = "100000/second"  # rate limit out of the way: these tests are about other limits





@contextlib.asynccontextmanager
async def server_running(env: dict[str, str], **kw: Any) -> AsyncIterator[ServerProcess]:
    server = await asyncio.to_thread(start_server, env, **kw)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def reply_to(client: Client, msg_id: str, timeout: float) -> dict[str, Any]:
    """The ack or error answering ``msg_id`` within ``timeout`` (deliveries are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await client.recv(max(deadline - loop.time(), 0.01))
        if msg.get("type") in ("ack", "error") and msg.get("id") == msg_id:
            return msg
        assert msg.get("type") not in ("ack", "error"), f"answer to another message: {msg}"


async def offer_round_trip(src: Client, dst: Client, msg_id: str, timeout: float) -> None:
    """``src`` offers to ``dst``: acked (devices=1) and delivered intact, both in time."""
    payload = {"sdp": f"v=0 {msg_id}", "type": "offer"}
    await src.send(type="offer", to=dst.welcome["user_id"], payload=payload, id=msg_id)
    ack = await src.recv(timeout)
    assert ack == {"type": "ack", "id": msg_id, "devices": 1}, ack
    got = await dst.recv(timeout)
    assert got["type"] == "offer" and got["id"] == msg_id, got
    assert got["payload"] == payload, got
    assert got["from"] == src.welcome["user_id"], got


# ---------------------------------------------------------------------- slow consumer

BIG = 60_000  # bytes of payload per offer to the slow client
MAX_BIG = 200  # 12 MB: far beyond what loopback socket buffers and the outbox can hold


async def test_slow_consumer_closed_1008_sender_and_others_never_wait(
    redis_url: str, conns: Conns
) -> None:
    env = server_env(
        redis_url, OUTBOX_MAX_BYTES="262144", OUTBOX_MAX_MESSAGES="64", RATE_LIMIT=FAST
    )
    async with server_running(env) as server:
        sender = await conns.open(server, uid("sender"))
        normal = await conns.open(server, uid("normal"))
        slow_user = uid("slow")
        slow = await conns.open(server, slow_user)
        await offer_round_trip(sender, slow, "warm-up", 2)
        # the slow client stops reading: its kernel buffer, then the server's socket buffer,
        # then its outbox fill up
        slow.ws.transport.pause_reading()

        loop = asyncio.get_running_loop()
        answers: Counter[str] = Counter()
        acked: list[str] = []
        first_refusal: int | None = None
        worst = 0.0
        for i in range(MAX_BIG):
            msg_id = f"big{i}"
            payload = {"n": i, "blob": "x" * BIG}
            started = loop.time()
            await sender.send(type="offer", to=slow_user, payload=payload, id=msg_id)
            answer = await reply_to(sender, msg_id, 1.0)  # never blocks on the slow client
            worst = max(worst, loop.time() - started)
            if answer["type"] == "ack":
                assert answer["devices"] == 1, answer
                answers["ack"] += 1
                acked.append(msg_id)
            else:
                assert answer["code"] == "peer_offline", answer
                assert answer["to"] == slow_user, answer
                answers["peer_offline"] += 1
                if first_refusal is None:
                    first_refusal = i
            if i % 5 == 0:
                # the other client of the same server is served all along
                await offer_round_trip(sender, normal, f"normal{i}", 1.0)
            if first_refusal is not None and i >= first_refusal + 5:
                break

        # the other client still round-trips, in both directions
        await offer_round_trip(sender, normal, "normal-after", 1.0)
        await offer_round_trip(normal, sender, "back-after", 1.0)

        # read what the slow client was sent, then the server's close frame
        slow.ws.transport.resume_reading()
        received: list[str] = []
        code: int | None = None
        reason: str | None = None
        try:
            while True:
                raw = await asyncio.wait_for(slow.ws.recv(), 10)
                msg = json.loads(raw)
                if msg.get("type") == "offer":
                    received.append(msg["id"])
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                code, reason = exc.rcvd.code, exc.rcvd.reason
        assert (code, reason) == (1008, "slow consumer"), (
            f"close frame {code} {reason!r}; answers {dict(answers)}, worst reply {worst:.3f}s,"
            f" {len(received)} offers read"
        )
        # what got through came in order, each once, and only what was acknowledged
        assert received == acked[: len(received)], (received[:5], acked[:5])
        assert len(received) < len(acked) or first_refusal is not None
        # the server dropped the slow client: no sender waited on it
        assert worst < 1.0, worst
        assert server.proc.poll() is None
        assert http_get(server.http + "/health")[0] == 200


# ---------------------------------------------------------------------- connection flood

FLOOD_MAX_BYTES = 4096
BAD_UPGRADES = 300
OVERSIZE_CONNS = 60
MALFORMED_CONNS = 30
JUNK_CONNS = 50
BATCH = 50


def _bad_token(i: int) -> tuple[dict[str, Any], str]:
    """Connection arguments for the i-th hostile upgrade and the 401 code it must get."""
    user = f"flood-{i}"
    kind = i % 5
    if kind == 0:
        return {"query": "token=not-a-jwt"}, "invalid_token"
    if kind == 1:
        tok = token(user, "d1", secret="wrong-secret-0123456789-abcdefghijklmnopqrs")
        return {"query": f"token={tok}"}, "invalid_token"
    if kind == 2:
        return {"query": f"token={token(user, 'd1', ttl=-60)}"}, "token_expired"
    if kind == 3:
        return {"headers": {"Authorization": "Bearer aaa.bbb.ccc"}}, "invalid_token"
    return {}, "missing_token"


async def _bounded(n: int, limit: int, job: Any) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Any:
        async with sem:
            return await job(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_connection_flood_leaves_server_serving(redis_url: str, conns: Conns) -> None:
    env = server_env(redis_url, RATE_LIMIT=FAST, MAX_MESSAGE_BYTES=str(FLOOD_MAX_BYTES))
    async with server_running(env) as server:
        alice = await conns.open(server, uid("good-a"))
        bob = await conns.open(server, uid("good-b"))
        loop = asyncio.get_running_loop()

        # a good pair keeps talking through the whole flood
        stop = asyncio.Event()
        rounds = 0
        worst_round = 0.0

        async def good_traffic() -> None:
            nonlocal rounds, worst_round
            while not stop.is_set():
                started = loop.time()
                src, dst = (alice, bob) if rounds % 2 == 0 else (bob, alice)
                await offer_round_trip(src, dst, f"good{rounds}", 3.0)
                worst_round = max(worst_round, loop.time() - started)
                rounds += 1
                await asyncio.sleep(0.02)

        async def bad_upgrade(i: int) -> tuple[int, str, float]:
            args, expected = _bad_token(i)
            url = server.ws_url + (f"?{args['query']}" if "query" in args else "")
            started = loop.time()
            try:
                ws = await websockets.connect(
                    url, additional_headers=args.get("headers"), open_timeout=10
                )
            except InvalidStatus as exc:
                body = json.loads(exc.response.body or b"{}")
                assert body.get("error") == expected, (i, body)
                return exc.response.status_code, body["error"], loop.time() - started
            await ws.close()
            raise AssertionError(f"hostile upgrade {i} was accepted")

        async def oversize(i: int) -> int | None:
            client = await connect(server.ws_url, f"big-{uuid.uuid4().hex[:8]}-{i}", "d1")
            try:
                frame = json.dumps({"type": "offer", "to": "nobody", "payload": "x" * 5000})
                assert len(frame) > FLOOD_MAX_BYTES
                await client.send_raw(frame)
                return await closed_code(client, 5)
            finally:
                await client.ws.close()

        malformed_frames: list[tuple[str | bytes, str]] = [
            ("not json", "bad_json"),
            ("{", "bad_json"),
            ("[1, 2]", "bad_json"),
            (b"\x00\x01\x02", "bad_frame"),
            ('{"type": "frobnicate", "id": "q"}', "unknown_type"),
            ('{"id": "q"}', "invalid_message"),
            ('{"type": "offer", "to": "bad user", "id": "q"}', "invalid_message"),
            (json.dumps({"type": "ping", "id": "i" * 65}), "invalid_message"),
        ]

        async def malformed(i: int) -> list[str]:
            client = await connect(server.ws_url, f"junk-{uuid.uuid4().hex[:8]}-{i}", "d1")
            try:
                codes = []
                for frame, _ in malformed_frames:
                    await client.send_raw(frame)
                for _ in malformed_frames:
                    err = await client.recv(5)
                    assert err["type"] == "error", err
                    codes.append(err["code"])
                await client.send(type="ping", id="still-here")
                pong = await client.recv(5)
                assert pong["type"] == "pong" and pong["id"] == "still-here", pong
                return codes
            finally:
                await client.ws.close()

        async def junk_tcp(i: int) -> None:
            """Not HTTP at all, or an upgrade that never finishes its headers."""
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                if i % 2:
                    writer.write(random.randbytes(512) + b"\r\n\r\n")
                else:
                    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                await writer.drain()
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(1024), 0.5)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        traffic = asyncio.create_task(good_traffic())
        flood_started = loop.time()
        bad, big, junk, _ = await asyncio.gather(
            _bounded(BAD_UPGRADES, BATCH, bad_upgrade),
            _bounded(OVERSIZE_CONNS, 20, oversize),
            _bounded(MALFORMED_CONNS, 10, malformed),
            _bounded(JUNK_CONNS, 25, junk_tcp),
        )
        flood_took = loop.time() - flood_started
        stop.set()
        await traffic  # re-raises a failed round trip

        assert all(status == 401 for status, _, _ in bad), Counter(s for s, _, _ in bad)
        slowest = max(t for _, _, t in bad)
        assert slowest < 3.0, f"a hostile upgrade took {slowest:.2f}s to be refused"
        assert Counter(big) == {1009: OVERSIZE_CONNS}, Counter(big)
        expected_codes = [code for _, code in malformed_frames]
        assert all(codes == expected_codes for codes in junk), junk[:3]
        assert rounds >= 5, f"only {rounds} good round trips in {flood_took:.1f}s of flood"
        assert worst_round < 3.0

        # after the flood: alive, healthy, and a new client gets through
        assert server.proc.poll() is None, server.log()[-3000:]
        assert http_get(server.http + "/health")[0] == 200
        assert http_get(server.http + "/ready")[0] == 200
        carol = await conns.open(server, uid("good-c"))
        for n in range(5):
            await offer_round_trip(carol, alice, f"after{n}", 2.0)
            await offer_round_trip(bob, carol, f"after-b{n}", 2.0)


# ---------------------------------------------------------------------- Redis unreachable


@pytest.fixture
def private_redis() -> Iterator[list[RedisServer]]:
    """A Redis of this test's own (stopped and restarted by it); all stopped at the end."""
    started = [start_redis()]
    try:
        yield started
    finally:
        for r in started:
            r.stop()


async def _pong(client: Client, msg_id: str, timeout: float) -> None:
    await client.send(type="ping", id=msg_id)
    pong = await client.recv(timeout)
    assert pong["type"] == "pong" and pong["id"] == msg_id, pong


async def _delivered_eventually(src: Client, dst: Client, tag: str, deadline: float) -> int:
    """Offer until one is acked, which must then be delivered; refusals must be errors
    ``internal``/``peer_offline``.  Returns the attempts it took."""
    loop = asyncio.get_running_loop()
    refusals: list[dict[str, Any]] = []
    attempt = 0
    while loop.time() < deadline:
        attempt += 1
        msg_id = f"{tag}{attempt}"
        payload = {"tag": tag, "n": attempt}
        await src.send(type="offer", to=dst.welcome["user_id"], payload=payload, id=msg_id)
        answer = await reply_to(src, msg_id, 5)
        if answer["type"] == "ack":
            assert answer["devices"] == 1, answer
            while True:  # stale offers of the outage ("internal" may have been delivered)
                got = await dst.recv(5)
                if got.get("type") == "offer" and got.get("id") == msg_id:
                    break
            assert got["payload"] == payload, got
            return attempt
        assert answer["code"] in ("internal", "peer_offline"), answer
        refusals.append(answer)
        await asyncio.sleep(0.25)
    raise AssertionError(f"{tag}: nothing acked and delivered after Redis came back: {refusals}")


async def test_redis_unreachable_no_false_ack_then_recovers(
    private_redis: list[RedisServer], conns: Conns
) -> None:
    redis = private_redis[0]
    env = server_env(redis.url, RATE_LIMIT=FAST)
    async with server_running(env) as one, server_running(env) as two:
        alice = await conns.open(one, uid("alice"))
        bob = await conns.open(two, uid("bob"))
        await offer_round_trip(alice, bob, "before-ab", 3)
        await offer_round_trip(bob, alice, "before-ba", 3)

        await asyncio.to_thread(redis.stop)
        loop = asyncio.get_running_loop()
        refusals: Counter[str] = Counter()
        for n in range(4):
            for src, dst, tag in ((alice, bob, "ab"), (bob, alice, "ba")):
                msg_id = f"down-{tag}{n}"
                started = loop.time()
                await src.send(type="offer", to=dst.welcome["user_id"],
                               payload={"down": n}, id=msg_id)
                answer = await reply_to(src, msg_id, 5)
                assert answer["type"] == "error", f"a false ack while Redis is down: {answer}"
                assert answer["code"] in ("internal", "peer_offline"), answer
                assert loop.time() - started < 5
                refusals[answer["code"]] += 1
            # the connections are open and answer pings (no Redis needed for a pong)
            await _pong(alice, f"ping-a{n}", 3)
            await _pong(bob, f"ping-b{n}", 3)
        assert alice.ws.close_code is None and bob.ws.close_code is None
        assert http_get(one.http + "/health")[0] == 200
        assert http_get(two.http + "/health")[0] == 200

        private_redis.append(await asyncio.to_thread(start_redis, redis.port))
        back = loop.time()
        deadline = back + 12
        await _delivered_eventually(alice, bob, "back-ab", deadline)
        await _delivered_eventually(bob, alice, "back-ba", deadline)
        recovered = loop.time() - back
        assert recovered < 12, recovered
        # and steadily so
        for n in range(5):
            await offer_round_trip(alice, bob, f"steady-ab{n}", 3)
            await offer_round_trip(bob, alice, f"steady-ba{n}", 3)
