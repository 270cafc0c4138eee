"""End-to-end tests of graceful drain and resume after a network blip (PROTOCOL.md §10, §7
close codes; issue 4: "Graceful drain", "A worker or instance killed with SIGKILL", "Resume
after a network blip") against real server processes on one private, real redis-server.

One module fixture starts, in parallel:

- ``drain`` (two workers) and ``drain_peer``: DRAIN_SECONDS=2, GRACEFUL_SHUTDOWN_TIMEOUT=6,
  RESUME_WINDOW=10. The drain test sends SIGTERM to ``drain``; its clients resume on
  ``drain_peer``.
- ``r[0..3]``: PRESENCE_TTL=2, RESUME_WINDOW=4, RESUME_MAX_MESSAGES=5. ``r[0]``/``r[1]`` are
  shared by the resume tests; the SIGKILL tests kill ``r[2]`` and ``r[3]`` (one each).

A drop "without a close frame" is ``ws.transport.abort()`` on the client. Presence, rooms and
kept messages live in Redis and outlive a test, so every test uses uuid-suffixed names.

Beyond the cases of the issue, three tests look at the edges of §10: a drop in the first
milliseconds after the welcome, messages that arrive while the device resumes (the seam
between kept and live traffic; many devices at once, a few rounds, since it is a race), and a
reconnect right after the instance was killed, before it is known dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
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
    connect,
    frames_for,
    now_ms,
    server_env,
    start_redis,
    start_server,
    token,
    uid,
)

pytestmark = pytest.mark.e2e

FAST = "100000/second"  # the rate limit is not what these tests are about

PRESENCE_TTL = 2
HEARTBEAT = PRESENCE_TTL / 3
RESUME_WINDOW = 4
RESUME_MAX = 5

DRAIN_SECONDS = 2.0
GRACE = 6.0  # GRACEFUL_SHUTDOWN_TIMEOUT of the drained instance
DRAIN_WINDOW = 10  # RESUME_WINDOW of the drain pair: room to check, then resume 20 devices
DRAIN_TTL = 3
DRAINED = 20

# ---------------------------------------------------------------------------- fixtures


@dataclass
class Servers:
    redis: RedisServer
    drain: ServerProcess  # two workers; SIGTERMed by the drain test
    drain_peer: ServerProcess
    r: list[ServerProcess]  # r[0], r[1] shared; r[2], r[3] killed with SIGKILL


def start_settled(env: dict[str, str], workers: int) -> ServerProcess:
    """Start a server and wait until Sanic's main process has logged every worker ready: a
    SIGTERM before that leaves it stuck in its start-up handshake (a Sanic limitation that
    tests/e2e/test_operations.py works around the same way), which is not what this module
    is about."""
    server = start_server(env, workers=workers)
    deadline = time.monotonic() + 10
    while server.log().count("Worker ready") < workers:
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"workers never reported ready:\n{server.log()[-3000:]}")
        time.sleep(0.05)
    time.sleep(0.3)
    return server


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    redis = start_redis()
    drain_env = server_env(
        redis.url,
        RATE_LIMIT=FAST,
        PRESENCE_TTL=str(DRAIN_TTL),
        RESUME_WINDOW=str(DRAIN_WINDOW),
        DRAIN_SECONDS=str(DRAIN_SECONDS),
        GRACEFUL_SHUTDOWN_TIMEOUT=str(GRACE),
    )
    r_env = server_env(
        redis.url,
        RATE_LIMIT=FAST,
        PRESENCE_TTL=str(PRESENCE_TTL),
        RESUME_WINDOW=str(RESUME_WINDOW),
        RESUME_MAX_MESSAGES=str(RESUME_MAX),
    )
    plan: list[tuple[dict[str, str], int]] = [(drain_env, 2), (drain_env, 1)] + [(r_env, 1)] * 4
    started: list[ServerProcess] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = [pool.submit(start_settled, env, n) for env, n in plan]
        for fut in futures:
            try:
                started.append(fut.result())
            except BaseException as exc:  # re-raised below, after stopping the others
                errors.append(exc)
    try:
        if errors:
            raise errors[0]
        yield Servers(redis, started[0], started[1], started[2:])
    finally:
        for server in started:
            server.stop(signal.SIGKILL)
        redis.stop()


class ResumeConns(Conns):
    """Conns that check ``resumed``/``missed`` in every welcome."""

    async def open(  # type: ignore[override]
        self,
        server: ServerProcess,
        user: str,
        device: str,
        resumed: bool = False,
        missed: int | None = 0,
    ) -> Client:
        """``missed=None``: any count (checked by the caller)."""
        client = await connect(server.ws_url, user, device)
        self.opened.append(client.ws)
        w = client.welcome
        assert (w["user_id"], w["device_id"]) == (user, device), w
        assert "resumed" in w and "missed" in w, f"welcome without resumed/missed: {w}"
        assert isinstance(w["missed"], int) and w["missed"] >= 0, w
        got_missed = w["missed"] if missed is None else missed
        assert (w["resumed"], w["missed"]) == (resumed, got_missed), (
            f"{user}/{device} on {server.port}: expected resumed={resumed} missed={missed}, "
            f"got welcome {w}"
        )
        return client

@pytest.fixture
async def conns() -> AsyncIterator[ResumeConns]:
    c = ResumeConns()
    try:
        yield c
    finally:
        await c.close_all()


# ---------------------------------------------------------------------------- helpers


def member(user: str, device: str) -> dict[str, str]:
    return {"user_id": user, "device_id": device}


def joined(room: str, user: str, device: str) -> dict[str, Any]:
    return {"type": "joined", "room": room, "user_id": user, "device_id": device}


def left(room: str, user: str, device: str) -> dict[str, Any]:
    return {"type": "left", "room": room, "user_id": user, "device_id": device}


def changed(user: str, devices: list[str]) -> dict[str, Any]:
    return {"type": "presence_changed", "user_id": user, "online": bool(devices),
            "devices": devices}


def presence(users: dict[str, list[str]], msg_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "presence",
        "users": {u: {"online": bool(d), "devices": d} for u, d in users.items()},
    }
    if msg_id is not None:
        body["id"] = msg_id
    return body


def ack(msg_id: str, devices: int = 1) -> dict[str, Any]:
    return {"type": "ack", "id": msg_id, "devices": devices}


def assert_error(msg: dict[str, Any], code: str, msg_id: str | None = None, **extra: Any) -> None:
    expected_keys = {"type", "code", "message", *extra} | ({"id"} if msg_id is not None else set())
    assert msg.get("type") == "error", msg
    assert msg["code"] == code, msg
    assert set(msg) == expected_keys, msg
    assert isinstance(msg["message"], str) and msg["message"], msg
    if msg_id is not None:
        assert msg["id"] == msg_id, msg
    for k, value in extra.items():
        assert msg[k] == value, msg


async def collect(client: Client, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Exactly the next ``count`` frames (failing when they do not come within ``timeout``)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        try:
            out.append(await client.recv(max(deadline - time.monotonic(), 0.01)))
        except TimeoutError:
            raise AssertionError(f"got only {out!r} within {timeout} s") from None
    return out


async def subscribe(client: Client, room: str) -> dict[str, Any]:
    await client.send(type="subscribe", room=room)
    return await client.recv()


def expect_subscribed(msg: dict[str, Any], room: str, members: list[dict[str, str]]) -> None:
    def order(ms: list[dict[str, str]]) -> list[dict[str, str]]:
        return sorted(ms, key=lambda m: (m["user_id"], m["device_id"]))

    assert msg.get("type") == "subscribed", msg
    assert {**msg, "members": order(msg["members"])} == {
        "type": "subscribed", "room": room, "members": order(members)
    }, msg


async def established(client: Client) -> None:
    """Wait until the server has finished setting the connection up: it reads the first
    client frame only then (a drop before that is another test's subject)."""
    await client.send(type="ping", id="up")
    while (await client.recv()).get("type") != "pong":
        pass


async def drop(client: Client, settle: float = 0.5) -> float:
    """End an established connection without a close frame (a network blip), give the
    server a moment to notice the lost TCP connection; the monotonic time of the drop."""
    await established(client)
    dropped_at = time.monotonic()
    client.ws.transport.abort()
    await asyncio.sleep(settle)
    return dropped_at


@dataclass
class Sent:
    """One direct message as sent, to check what the recipient gets."""

    kind: str
    frm: str
    frm_device: str
    payload: Any
    msg_id: str | None
    before: int
    after: int


async def send_direct(
    sender: Client,
    to: str,
    payload: Any,
    msg_id: str | None,
    kind: str = "offer",
    to_device: str | None = None,
    devices: int = 1,
) -> Sent:
    """Send one §3 message; with an id, expect the ack (``devices``) as the next frame."""
    msg: dict[str, Any] = {"type": kind, "to": to, "payload": payload}
    if to_device is not None:
        msg["to_device"] = to_device
    if msg_id is not None:
        msg["id"] = msg_id
    before = now_ms()
    await sender.send(**msg)
    if msg_id is not None:
        assert await sender.recv() == ack(msg_id, devices), (msg, "not acked")
    after = now_ms()
    w = sender.welcome
    return Sent(kind, w["user_id"], w["device_id"], payload, msg_id, before, after)


def expect_direct(got: dict[str, Any], sent: Sent) -> None:
    """The frame a recipient gets for ``sent`` (§3), ``ts`` from the original acceptance."""
    body = dict(got)
    ts = body.pop("ts", None)
    assert isinstance(ts, int), got
    # a kept message carries the time it was accepted, not the time it was delivered
    assert sent.before - 1000 <= ts <= sent.after + 1000, (got, sent)
    expected: dict[str, Any] = {
        "type": sent.kind,
        "from": sent.frm,
        "from_device": sent.frm_device,
        "payload": sent.payload,
    }
    if sent.msg_id is not None:
        expected["id"] = sent.msg_id
    assert body == expected, (got, sent)


async def expect_frames(client: Client, sent: list[Sent], what: str) -> None:
    got = await collect(client, len(sent))
    assert [g.get("id") for g in got] == [s.msg_id for s in sent], (what, got)
    for g, s in zip(got, sent, strict=True):
        expect_direct(g, s)


async def rejected(url: str) -> tuple[int, dict[str, Any]]:
    """Try an upgrade that must be refused; (status, JSON body)."""
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(url, open_timeout=5)
        await ws.close()
    response = info.value.response
    return response.status_code, json.loads(response.body)


async def publish_round_trip(
    frm: Client, to: Client, room: str, payload: Any, devices: int | None = 1
) -> None:
    """``frm`` publishes: the next frame of ``to`` is that publish, the next of ``frm`` the
    ack (``devices``; None: not checked, e.g. while another member is parked)."""
    await frm.send(type="publish", room=room, payload=payload, id="pub")
    got = await to.recv()
    assert isinstance(got.pop("ts", None), int), got
    got.pop("id", None)  # optional for publish (§3 forwards ids of direct messages)
    assert got == {"type": "publish", "room": room, "from": frm.welcome["user_id"],
                   "from_device": frm.welcome["device_id"], "payload": payload}, got
    reply = await frm.recv()
    assert reply.get("type") == "ack" and reply["id"] == "pub", reply
    if devices is not None:
        assert reply["devices"] == devices, reply


# ---------------------------------------------------------------------------- drain


async def test_sigterm_drains_with_1012_over_drain_seconds_and_parks_devices(
    servers: Servers, conns: Conns
) -> None:
    d, p = servers.drain, servers.drain_peer
    room = uid("drain-room")
    peer_user = uid("peer")
    peer = await conns.open(p, peer_user, "p1")
    expect_subscribed(await subscribe(peer, room), room, [])

    # DRAINED (or a few more) clients on the two-worker instance, on both of its workers:
    # connected in concurrent batches, which the two accept loops share
    users: list[str] = []
    clients: list[Client] = []
    while len(clients) < DRAINED or len({c.node for c in clients}) < 2:
        assert len(clients) < 4 * DRAINED, f"all connections went to one worker: {clients}"
        batch = [uid(f"dr{len(clients) + i}") for i in range(DRAINED // 2)]
        clients += await asyncio.gather(*(conns.open(d, u, "d") for u in batch))
        users += batch
    for n, (user, c) in enumerate(zip(users, clients, strict=True)):
        members = [member(peer_user, "p1")] + [member(u, "d") for u in users[:n]]
        expect_subscribed(await subscribe(c, room), room, members)
        assert await peer.recv() == joined(room, user, "d")
    await peer.send(type="watch", users=users, id="w")
    assert await peer.recv() == presence({u: ["d"] for u in users}, "w")

    async def close_of(c: Client) -> tuple[int | None, float]:
        try:
            while True:
                await c.ws.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), time.monotonic()

    closers = [asyncio.create_task(asyncio.wait_for(close_of(c), GRACE + 5)) for c in clients]

    def wait_exit() -> tuple[int | None, float]:
        try:
            rc = d.proc.wait(GRACE + 5)
        except subprocess.TimeoutExpired:
            return None, time.monotonic()
        return rc, time.monotonic()

    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    exited = asyncio.create_task(asyncio.to_thread(wait_exit))

    # /ready turns 503 at once (within 0.5 s), on every worker, and stays so
    first_503: float | None = None
    while time.monotonic() - t0 < 0.5:
        status, _ = await asyncio.to_thread(d.get, "/ready")
        if status == 503:
            first_503 = time.monotonic() - t0
            break
        await asyncio.sleep(0.02)
    assert first_503 is not None, "/ready did not answer 503 within 0.5 s of SIGTERM"
    ready = [(await asyncio.to_thread(d.get, "/ready"))[0] for _ in range(6)]
    assert ready == [503] * 6, ready
    # new upgrades are refused with 503 unavailable (also one for a device being drained)
    for user in (uid("late"), uid("late"), users[-1]):
        status, body = await rejected(f"{d.ws_url}?token={token(user, 'd')}")
        assert status == 503 and body["error"] == "unavailable", (status, body)
        assert isinstance(body.get("message"), str), body
    checked_at = time.monotonic() - t0
    still_open = sum(not t.done() for t in closers)
    assert still_open > 0 and checked_at < DRAIN_SECONDS, (
        f"the checks ran at {checked_at:.2f} s with {still_open} sockets open: not during the "
        "drain"
    )

    results = await asyncio.gather(*closers)
    codes = [code for code, _ in results]
    assert codes == [1012] * len(clients), f"close codes: {codes}"
    times = sorted(at - t0 for _, at in results)
    spread = times[-1] - times[0]
    early = sum(t <= times[0] + 0.1 for t in times)
    assert early < len(times) // 2, f"{early} of {len(times)} closed in the first 100 ms: {times}"
    assert spread >= DRAIN_SECONDS * 0.6, f"closes spread over {spread:.2f} s only: {times}"
    assert times[-1] <= DRAIN_SECONDS + 1.0, f"closes went on past DRAIN_SECONDS: {times}"

    rc, exit_at = await exited
    assert rc == 0, f"exit status {rc} after SIGTERM:\n{d.log()[-3000:]}"
    assert exit_at - t0 <= GRACE, f"exited {exit_at - t0:.2f} s after SIGTERM (> {GRACE})"

    # the drained devices are parked: no presence_changed, no `left` for the peer ...
    assert await frames_for(peer, 0.3) == []
    # ... still online, and direct messages to them are acknowledged and kept
    await peer.send(type="presence", users=users, id="q")
    assert await peer.recv() == presence({u: ["d"] for u in users}, "q")
    kept = [
        await send_direct(peer, u, {"sdp": f"after drain {i}"}, f"o{i}")
        for i, u in enumerate(users)
    ]

    # they resume on the other instance with what was kept, and are back in the room
    async def resume(i: int, user: str) -> Client:
        c = await conns.open(p, user, "d", resumed=True, missed=1)
        expect_direct(await c.recv(), kept[i])
        return c

    resumed = await asyncio.gather(*(resume(i, u) for i, u in enumerate(users)))
    await peer.nothing(0.5)  # no presence_changed, joined or left at any point
    await peer.send(type="publish", room=room, payload="everyone back?", id="all")
    for c in resumed:
        got = await c.recv()
        assert isinstance(got.pop("ts", None), int), got
        got.pop("id", None)
        assert got == {"type": "publish", "room": room, "from": peer_user, "from_device": "p1",
                       "payload": "everyone back?"}, got
    assert await peer.recv() == ack("all", len(users))

    log = d.log()
    assert "token=" not in log and "eyJ" not in log, "the drained instance logged a token"
    assert "eyJ" not in p.log(), "the peer instance logged a token"


# ---------------------------------------------------------------------------- resume


async def test_resume_after_abrupt_drop_on_another_instance(
    servers: Servers, conns: Conns
) -> None:
    a, b = servers.r[0], servers.r[1]
    user, snd, mem, wat, z = (uid(p) for p in ("blip", "snd", "mem", "wat", "z"))
    room = uid("room")
    x = await conns.open(a, user, "d1")
    s = await conns.open(b, snd, "s1")
    m = await conns.open(b, mem, "m1")
    w = await conns.open(a, wat, "w1")
    expect_subscribed(await subscribe(x, room), room, [])
    expect_subscribed(await subscribe(m, room), room, [member(user, "d1")])
    assert await x.recv() == joined(room, mem, "m1")
    await w.send(type="watch", users=[user], id="w")
    assert await w.recv() == presence({user: ["d1"]}, "w")
    await x.send(type="watch", users=[z], id="xz")  # a watch of the dropped connection
    assert await x.recv() == presence({z: []}, "xz")
    # live before the drop
    pre = await send_direct(s, user, {"before": "drop"}, "pre")
    await expect_frames(x, [pre], "live before the drop")

    await drop(x)
    # parked: online, messages acked and kept (every §3 type, with and without to_device/id)
    await s.send(type="presence", users=[user], id="q")
    assert await s.recv() == presence({user: ["d1"]}, "q")
    kept = [
        await send_direct(s, user, {"sdp": "v=0 kept", "type": "offer"}, "k0"),
        await send_direct(s, user, {"candidate": "c1", "sdpMid": "0"}, "k1", "candidate", "d1"),
        await send_direct(s, user, "ciphertext:AAEC", None, "candidate"),
        await send_direct(s, user, {"n": 3}, "k3", "answer", "d1"),
    ]
    await asyncio.gather(m.nothing(0.3), w.nothing(0.1), s.nothing(0.1))

    # resume on the other instance: the kept messages in order, first
    x2 = await conns.open(b, user, "d1", resumed=True, missed=len(kept))
    await expect_frames(x2, kept, "kept messages after resume")
    # then live traffic
    live = [await send_direct(s, user, {"live": i}, f"l{i}") for i in range(3)]
    await expect_frames(x2, live, "live messages after resume")
    await x2.nothing(0.3)

    # rooms kept: publish both ways; the other member never saw left/joined
    await publish_round_trip(m, x2, room, {"to": "resumed"})
    await publish_round_trip(x2, m, room, {"from": "resumed"})
    newcomer = await conns.open(a, uid("new"), "n1")
    expect_subscribed(
        await subscribe(newcomer, room), room, [member(user, "d1"), member(mem, "m1")]
    )
    # the watcher never saw the device go offline
    await w.nothing(0.3)

    # watches are not carried over: z comes online, the resumed connection is not told ...
    zc = await conns.open(a, z, "z1")
    assert await x2.recv() == joined(room, newcomer.welcome["user_id"], "n1")
    await x2.nothing(0.8)
    # ... until it watches again
    await x2.send(type="watch", users=[z], id="again")
    assert await x2.recv() == presence({z: ["z1"]}, "again")
    await zc.close()
    assert await x2.recv() == changed(z, [])
    # the room members only ever saw the newcomer join
    seen = await frames_for(m, 0.3)
    assert seen == [joined(room, newcomer.welcome["user_id"], "n1")], seen


async def test_resume_keeps_at_most_resume_max_messages_newest_last(
    servers: Servers, conns: Conns
) -> None:
    a, b = servers.r[0], servers.r[1]
    user, snd = uid("max"), uid("snd")
    x = await conns.open(a, user, "d1")
    s = await conns.open(b, snd, "s1")
    await drop(x)
    sent = [await send_direct(s, user, {"seq": i}, f"m{i}") for i in range(8)]
    x2 = await conns.open(b, user, "d1", resumed=True, missed=RESUME_MAX)
    await expect_frames(x2, sent[-RESUME_MAX:], "the newest RESUME_MAX_MESSAGES")
    await x2.nothing(0.3)


async def test_clean_close_ends_presence_at_once_and_keeps_nothing(
    servers: Servers, conns: Conns
) -> None:
    a, b = servers.r[0], servers.r[1]
    room = uid("room")
    for code in (1000, 1001):
        user, snd, mem, wat = (uid(p) for p in ("clean", "snd", "mem", "wat"))
        x = await conns.open(a, user, "d1")
        s = await conns.open(b, snd, "s1")
        m = await conns.open(b, mem, "m1")
        w = await conns.open(b, wat, "w1")
        expect_subscribed(await subscribe(x, room), room, [])
        expect_subscribed(await subscribe(m, room), room, [member(user, "d1")])
        assert await x.recv() == joined(room, mem, "m1")
        await w.send(type="watch", users=[user], id="w")
        assert await w.recv() == presence({user: ["d1"]}, "w")

        await x.ws.close(code)
        assert await w.recv(timeout=1.5) == changed(user, [])
        assert await m.recv(timeout=1.5) == left(room, user, "d1")
        await s.send(type="offer", to=user, payload={"sdp": "x"}, id="gone")
        assert_error(await s.recv(), "peer_offline", "gone", to=user)
        await s.send(type="candidate", to=user, to_device="d1", payload={})
        assert_error(await s.recv(), "peer_offline", to=user)
        await s.send(type="presence", users=[user], id="q")
        assert await s.recv() == presence({user: []}, "q")

        x2 = await conns.open(b, user, "d1", resumed=False, missed=0)
        await x2.nothing(0.3)
        assert await w.recv() == changed(user, ["d1"])
        await m.nothing(0.2)  # not a member any more: no joined
        # a room member again only by subscribing
        await m.send(type="publish", room=room, payload="alone?", id="p")
        assert await m.recv() == ack("p", 0)
        await x2.close()
        room = uid("room")


async def test_resume_window_expiry_reports_offline_and_left_and_drops_kept(
    servers: Servers, conns: Conns
) -> None:
    a, b = servers.r[0], servers.r[1]
    room = uid("room")
    user, snd, mem, wat, wat0 = (uid(p) for p in ("exp", "snd", "mem", "wat", "wat0"))
    x = await conns.open(a, user, "d1")
    s = await conns.open(b, snd, "s1")
    m = await conns.open(b, mem, "m1")
    w = await conns.open(b, wat, "w1")  # watchers on both instances
    w0 = await conns.open(a, wat0, "w1")
    expect_subscribed(await subscribe(x, room), room, [])
    expect_subscribed(await subscribe(m, room), room, [member(user, "d1")])
    assert await x.recv() == joined(room, mem, "m1")
    for watcher in (w, w0):
        await watcher.send(type="watch", users=[user], id="w")
        assert await watcher.recv() == presence({user: ["d1"]}, "w")

    dropped_at = await drop(x, settle=0.3)
    await send_direct(s, user, {"sdp": "will expire"}, "k")

    async def first(client: Client) -> tuple[dict[str, Any], float]:
        msg = await client.recv(timeout=RESUME_WINDOW + HEARTBEAT + 3)
        return msg, time.monotonic() - dropped_at

    (mw, tw), (mw0, tw0), (mm, tm) = await asyncio.gather(first(w), first(w0), first(m))
    assert mw == changed(user, []) and mw0 == changed(user, []), (mw, mw0)
    assert mm == left(room, user, "d1"), mm
    for at in (tw, tw0, tm):
        assert RESUME_WINDOW - 0.3 <= at <= RESUME_WINDOW + HEARTBEAT + 1.5, (tw, tw0, tm)
    await asyncio.gather(w.nothing(0.3), w0.nothing(0.1), m.nothing(0.1))

    await s.send(type="offer", to=user, payload={"sdp": "late"}, id="late")
    assert_error(await s.recv(), "peer_offline", "late", to=user)
    x2 = await conns.open(a, user, "d1", resumed=False, missed=0)
    await x2.nothing(0.3)  # the kept message was dropped
    assert await w.recv() == changed(user, ["d1"])
    assert await w0.recv() == changed(user, ["d1"])
    await m.nothing(0.2)


ROUNDS = 4  # the two tests below look for races: a few rounds of many devices at once


async def test_drop_right_after_the_welcome_is_parked(servers: Servers, conns: Conns) -> None:
    """A blip can come at any moment once the client has its welcome: the device is parked
    like any other (§10), also while the server still finishes the connect (here: telling
    a watcher). Twenty devices at once per round, so that some drops land in that moment."""
    a, b = servers.r[0], servers.r[1]
    s = await conns.open(b, uid("snd"), "s1")
    for rnd in range(ROUNDS):
        users = [uid(f"early{rnd}.{i}") for i in range(20)]
        w = await conns.open(b, uid("wat"), "w1")
        await w.send(type="watch", users=users, id="w")
        assert await w.recv() == presence({u: [] for u in users}, "w")

        async def connect_and_drop(user: str) -> None:
            c = await conns.open(a, user, "d1")
            c.ws.transport.abort()

        await asyncio.gather(*(connect_and_drop(u) for u in users))
        await asyncio.sleep(0.5)
        await s.send(type="presence", users=users, id="q")
        reply = await s.recv()
        offline = [u for u in users if not reply["users"][u]["online"]]
        assert offline == [], (
            f"round {rnd}: {len(offline)} of {len(users)} devices dropped right after their "
            f"welcome are offline, not parked: {offline}"
        )
        assert reply == presence({u: ["d1"] for u in users}, "q")
        sent = [await send_direct(s, u, {"for": u}, f"o{i}") for i, u in enumerate(users)]
        for u, one in zip(users, sent, strict=True):
            c = await conns.open(b, u, "d1", resumed=True, missed=1)
            await expect_frames(c, [one], "kept for a device dropped right after its welcome")
        # the watcher saw each device come online, and never go offline
        seen = sorted(map(json.dumps, await frames_for(w, 0.5)))
        assert seen == sorted(json.dumps(changed(u, ["d1"])) for u in users), seen


async def test_messages_sent_while_the_device_resumes_are_neither_lost_nor_reordered(
    servers: Servers, conns: Conns
) -> None:
    """Senders keep sending (each waiting for its ack) while their parked peers reconnect:
    every acknowledged message arrives exactly once, in order — the kept ones, then the live
    ones, no gap at the seam. Only the oldest may be missing, and only when more than
    RESUME_MAX_MESSAGES were kept. Thirty devices at once per round, their senders on the
    instance they resume on (a busy instance widens the window where the seam can break)."""
    a, b = servers.r[0], servers.r[1]
    senders = await asyncio.gather(*(conns.open(b, uid("snd"), "s1") for _ in range(30)))
    for rnd in range(ROUNDS):
        users = [uid(f"seam{rnd}.{i}") for i in range(len(senders))]
        devices = await asyncio.gather(*(conns.open(a, u, "d1") for u in users))
        await asyncio.gather(*(established(c) for c in devices))  # see the test above
        for c in devices:
            c.ws.transport.abort()
        await asyncio.sleep(0.5)
        stop = asyncio.Event()

        async def stream(s: Client, user: str, stop: asyncio.Event = stop) -> list[int]:
            """Offers every few ms without waiting for the acks (so that one is always in
            flight at the seam); then every one of them must have been acked, in order."""
            n = 0
            while not stop.is_set():
                await s.send(type="offer", to=user, payload={"seq": n}, id=f"m{n}")
                n += 1
                await asyncio.sleep(0.002)
            replies = await collect(s, n, timeout=10)
            assert replies == [ack(f"m{i}") for i in range(n)], (user, replies)
            return list(range(n))

        streams = [
            asyncio.create_task(stream(s, u)) for s, u in zip(senders, users, strict=True)
        ]
        await asyncio.sleep(0.02)
        back = await asyncio.gather(
            *(conns.open(b, u, "d1", resumed=True, missed=None) for u in users)
        )
        await asyncio.sleep(0.1)
        stop.set()
        acked_lists = await asyncio.gather(*streams)
        received = await asyncio.gather(*(frames_for(c, 0.5) for c in back))
        problems = []
        for user, c, acked, frames in zip(users, back, acked_lists, received, strict=True):
            got = [f["payload"]["seq"] for f in frames]
            dropped = len(acked) - len(got)
            missed = c.welcome["missed"]
            if got != acked[dropped:] or (dropped and missed != RESUME_MAX):
                lost = [i for i in acked if i not in got]
                problems.append(
                    f"{user}: welcome missed={missed}; acked m0..m{len(acked) - 1}; not "
                    f"delivered {lost}; delivered in order: {got == sorted(set(got))}"
                )
        assert problems == [], f"round {rnd}:\n" + "\n".join(problems)
        await asyncio.gather(*(c.close() for c in back))


# ---------------------------------------------------------------------------- SIGKILL


async def test_sigkilled_instance_devices_resumable_then_offline(
    servers: Servers, conns: Conns
) -> None:
    a, b, dead = servers.r[0], servers.r[1], servers.r[2]
    room = uid("room")
    k1, k2, snd, mem, wat = (uid(p) for p in ("k1", "k2", "snd", "mem", "wat"))
    c1 = await conns.open(dead, k1, "d1")
    c2 = await conns.open(dead, k2, "d2")
    s = await conns.open(a, snd, "s1")
    m = await conns.open(b, mem, "m1")
    w = await conns.open(a, wat, "w1")
    expect_subscribed(await subscribe(m, room), room, [])
    expect_subscribed(await subscribe(c1, room), room, [member(mem, "m1")])
    expect_subscribed(await subscribe(c2, room), room, [member(mem, "m1"), member(k1, "d1")])
    assert await m.recv() == joined(room, k1, "d1")
    assert await m.recv() == joined(room, k2, "d2")
    await w.send(type="watch", users=[k1, k2], id="w")
    assert await w.recv() == presence({k1: ["d1"], k2: ["d2"]}, "w")
    await asyncio.sleep(HEARTBEAT * 1.5)  # steady state: a heartbeat after the connects

    killed_at = time.monotonic()
    dead.stop(signal.SIGKILL)
    # right after the kill: online, acked (these reach the dead worker's inbox)
    await s.send(type="presence", users=[k1, k2], id="q1")
    assert await s.recv() == presence({k1: ["d1"], k2: ["d2"]}, "q1")
    sent = [await send_direct(s, k1, {"seq": i}, f"early{i}") for i in range(2)]

    # once the instance is known dead (PRESENCE_TTL), within the resume window: still acked
    await asyncio.sleep(max(0.0, killed_at + PRESENCE_TTL + 0.5 - time.monotonic()))
    await s.send(type="presence", users=[k1, k2], id="q2")
    assert await s.recv() == presence({k1: ["d1"], k2: ["d2"]}, "q2")
    sent += [await send_direct(s, k1, {"seq": i}, f"late{i}", to_device="d1") for i in (2, 3)]
    await asyncio.gather(w.nothing(0.05), m.nothing(0.05))

    # resume on another instance: everything, in order, resumed true; still in the room
    r1 = await conns.open(b, k1, "d1", resumed=True, missed=len(sent))
    await expect_frames(r1, sent, "messages for a device of a killed instance")
    await publish_round_trip(m, r1, room, "still here", devices=None)
    after = await send_direct(s, k1, {"seq": "live"}, "live")
    await expect_frames(r1, [after], "live after resume")

    # the device that never comes back goes offline within PRESENCE_TTL + RESUME_WINDOW + 4 s
    budget = PRESENCE_TTL + RESUME_WINDOW + 4

    async def within_budget(client: Client) -> tuple[list[dict[str, Any]], float]:
        """The first frame (if one comes before the budget runs out) and when, after the
        kill."""
        left_s = budget - (time.monotonic() - killed_at)
        with contextlib.suppress(TimeoutError):
            return [await client.recv(max(left_s, 0.01))], time.monotonic() - killed_at
        return [], budget

    (rw, tw), (rm, tm), (rr, tr) = await asyncio.gather(
        within_budget(w), within_budget(m), within_budget(r1)
    )
    assert rw == [changed(k2, [])], f"watcher: {rw} within {budget} s of the kill"
    assert rm == [left(room, k2, "d2")], f"room member: {rm} within {budget} s of the kill"
    assert rr == [left(room, k2, "d2")], f"resumed member: {rr} within {budget} s of the kill"
    # not before the resume window (counted from when the instance is known dead) ran out
    assert min(tw, tm, tr) >= RESUME_WINDOW - 0.2, (tw, tm, tr)
    await s.send(type="offer", to=k2, payload={"sdp": "gone"}, id="gone")
    assert_error(await s.recv(), "peer_offline", "gone", to=k2)
    await s.send(type="presence", users=[k1, k2], id="q3")
    assert await s.recv() == presence({k1: ["d1"], k2: []}, "q3")
    # nothing about the resumed device, nor a second report
    await asyncio.gather(w.nothing(1.0), m.nothing(0.1), r1.nothing(0.1))
    for client in (c1, c2):  # cut off by the kill: no close frame
        assert await closed_code(client, 2) is None


async def test_reconnect_right_after_sigkill_resumes(servers: Servers, conns: Conns) -> None:
    """A client whose instance is killed sees its TCP connection end at once and reconnects
    at once — before the instance is known dead. §10: the device is reachable from the
    death on, and a reconnect "in that time" resumes (the old connection is not open on a
    live instance): an acknowledged message must not be lost, the rooms must be kept."""
    a, b, dead = servers.r[0], servers.r[1], servers.r[3]
    room = uid("room")
    k, snd, mem = uid("quick"), uid("snd"), uid("mem")
    c = await conns.open(dead, k, "d1")
    s = await conns.open(a, snd, "s1")
    m = await conns.open(b, mem, "m1")
    expect_subscribed(await subscribe(m, room), room, [])
    expect_subscribed(await subscribe(c, room), room, [member(mem, "m1")])
    assert await m.recv() == joined(room, k, "d1")
    await asyncio.sleep(HEARTBEAT * 1.5)

    dead.stop(signal.SIGKILL)
    sent = await send_direct(s, k, {"sdp": "while dying"}, "acked")
    assert await closed_code(c, 2) is None  # the client sees the connection end at once
    again = await conns.open(b, k, "d1", resumed=True, missed=1)
    await expect_frames(again, [sent], "the acknowledged message")
    assert await frames_for(m, 0.5) == [], "the room member saw the device leave/join"
    await publish_round_trip(m, again, room, "kept the room?")


# ---------------------------------------------------------------------------- takeover


async def test_new_connection_while_old_one_open_replaces_it_not_resumed(
    servers: Servers, conns: Conns
) -> None:
    a, b = servers.r[0], servers.r[1]
    user, snd = uid("take"), uid("snd")
    s = await conns.open(a, snd, "s1")
    old = await conns.open(a, user, "d1")
    pre = await send_direct(s, user, {"to": "old"}, "pre")
    await expect_frames(old, [pre], "before the takeover")

    new = await conns.open(b, user, "d1", resumed=False, missed=0)  # another instance
    assert await closed_code(old) == 4009
    third = await conns.open(b, user, "d1", resumed=False, missed=0)  # the same instance
    assert await closed_code(new) == 4009
    await third.nothing(0.3)
    live = await send_direct(s, user, {"to": "third"}, "live")
    await expect_frames(third, [live], "after the takeovers")
    # a replaced connection is not parked: a clean close of the last one ends presence
    await s.send(type="watch", users=[user], id="w")
    assert await s.recv() == presence({user: ["d1"]}, "w")
    await third.close()
    assert await s.recv() == changed(user, [])
    await s.send(type="offer", to=user, payload={}, id="gone")
    assert_error(await s.recv(), "peer_offline", "gone", to=user)
