"""The lean websocket path against a real server process: keepalive from the worker's one
pinger (no task per connection), fragmented messages, and the close handshake."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time

import websockets

from tests.support import ServerProcess, running, server_env, token, uid

PING_ENV = {"WS_PING_INTERVAL": "0.5", "WS_PING_TIMEOUT": "0.5"}


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def raw_upgrade(server: ServerProcess, user: str) -> Stream:
    """A websocket that never answers pings: the handshake by hand, then silence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?token={token(user, 'd')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frames(reader: asyncio.StreamReader, seconds: float) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every frame until the server closes the TCP connection."""
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), deadline - time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError):
            return frames
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        frames.append((b0 & 0x0F, await reader.readexactly(n)))
    raise AssertionError(f"the server kept the connection open: {frames}")


async def test_a_client_that_never_answers_pings_is_closed_1011() -> None:
    with running(server_env(None, **PING_ENV)) as server:
        reader, writer = await raw_upgrade(server, uid("silent"))
        frames = await read_frames(reader, 8)
        writer.close()
        opcodes = [op for op, _ in frames]
        assert opcodes[0] == 0x1 and json.loads(frames[0][1])["type"] == "welcome"
        assert 0x9 in opcodes, opcodes  # pinged
        close = [payload for op, payload in frames if op == 0x8]
        assert close and struct.unpack("!H", close[0][:2])[0] == 1011, frames


async def test_a_client_that_answers_pings_stays_and_fragments_are_reassembled() -> None:
    with running(server_env(None, **PING_ENV)) as server:
        alice, bob = uid("frag-a"), uid("frag-b")
        a = await websockets.connect(f"{server.ws_url}?token={token(alice, 'd')}")
        b = await websockets.connect(f"{server.ws_url}?token={token(bob, 'd')}")
        await a.recv(), await b.recv()
        await asyncio.sleep(2.5)  # five ping intervals: websockets answers every ping
        text = json.dumps({"type": "offer", "to": bob, "payload": {"sdp": "x" * 3000}, "id": "f"})
        await a.send([text[:10], text[10:2000], text[2000:]])  # one message, three frames
        assert json.loads(await asyncio.wait_for(a.recv(), 5)) == {
            "type": "ack", "id": "f", "devices": 1
        }
        got = json.loads(await asyncio.wait_for(b.recv(), 5))
        assert got["payload"] == {"sdp": "x" * 3000}
        await a.close()
        assert a.close_code == 1000
        await b.close()


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes(((0x80 if fin else 0) | opcode,))
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes((m | n,))
    elif n < 65536:
        head += bytes((m | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((m | 127,)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_frames_split_anywhere_pings_answered_and_violations_closed() -> None:
    with running(server_env(None)) as server:
        reader, writer = await raw_upgrade(server, uid("raw"))
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)  # the welcome first
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        welcome = await reader.readexactly(n)
        assert json.loads(welcome)["type"] == "welcome"
        # a ping and a message, written one byte at a time
        data = client_frame(0x9, b"hello") + client_frame(0x1, b'{"type":"ping","id":"p1"}')
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
        frames = [(b0 & 0x0F, welcome)]
        while len(frames) < 3:  # the pong, then the reply to the json ping
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            frames.append((b0 & 0x0F, await reader.readexactly(n)))
        assert frames[1] == (0xA, b"hello")
        assert json.loads(frames[2][1])["type"] == "pong"
        writer.close()

        for bad, code in (
            (client_frame(0x1, b'"\xff\xfe"'), 1007),  # text that is not UTF-8
            (client_frame(0x1, b"{}", mask=False), 1002),  # clients must mask
            (client_frame(0x0, b"{}"), 1002),  # a continuation with nothing to continue
        ):
            reader, writer = await raw_upgrade(server, uid("bad"))
            writer.write(bad)
            got = await read_frames(reader, 5)
            close = [payload for op, payload in got if op == 0x8]
            assert close and struct.unpack("!H", close[0][:2])[0] == code, (bad, got)
            writer.close()


async def _read_n(reader: asyncio.StreamReader, count: int) -> list[tuple[int, bytes]]:
    frames: list[tuple[int, bytes]] = []
    while len(frames) < count:
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        frames.append((b0 & 0x0F, await reader.readexactly(n)))
    return frames


async def test_replies_keep_frame_order_across_the_inline_and_queued_paths() -> None:
    """Direct messages to a local peer are handled in the read callback, everything else by
    the connection's read loop: frames written in one go, mixed, are answered in order."""
    with running(server_env(None)) as server:
        alice, bob = uid("alice"), uid("bob")
        a_reader, a_writer = await raw_upgrade(server, alice)
        b_reader, b_writer = await raw_upgrade(server, bob)
        for reader in (a_reader, b_reader):
            [(_, welcome)] = await _read_n(reader, 1)
            assert json.loads(welcome)["type"] == "welcome"

        def offer(to: str, i: str) -> bytes:
            return client_frame(0x1, json.dumps(
                {"type": "offer", "to": to, "payload": {"n": i}, "id": i}).encode())

        a_writer.write(b"".join([
            offer(bob, "m1"),
            client_frame(0x1, b'{"type":"ping","id":"p1"}'),
            offer(bob, "m2"),
            offer(uid("nobody"), "m3"),
            client_frame(0x2, b"\x00"),
            offer(bob, "m4"),
            client_frame(0x1, json.dumps({"type": "presence", "users": [bob], "id": "q"})
                         .encode()),
            offer(bob, "m5"),
        ]))
        got = [json.loads(p) for _, p in await _read_n(a_reader, 8)]
        assert [(f["type"], f.get("id"), f.get("code")) for f in got] == [
            ("ack", "m1", None),
            ("pong", "p1", None),
            ("ack", "m2", None),
            ("error", "m3", "peer_offline"),
            ("error", None, "bad_frame"),
            ("ack", "m4", None),
            ("presence", "q", None),
            ("ack", "m5", None),
        ]
        delivered = [json.loads(p) for _, p in await _read_n(b_reader, 4)]
        assert [f["payload"]["n"] for f in delivered] == ["m1", "m2", "m4", "m5"]
        a_writer.close()
        b_writer.close()
