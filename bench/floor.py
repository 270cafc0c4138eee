"""The floor: the least a Python relay on uvloop does per message.  A measuring stick for
``bench.run`` (``--servers python-floor``), not a server to run.

    .venv/bin/python -m bench.floor PORT

It speaks the PeerJS wire (``/peerjs?id=ID``, first frame ``{"type":"OPEN"}``,
``{"type":"CANDIDATE","dst":ID,"payload":..}`` relayed as ``{..,"src":ID,..}``) with nothing
else: no token, no checks beyond JSON, no limiter, no presence, no acks, no metrics, no
pings.  One asyncio Protocol per socket; ``data_received`` unmasks the frames, msgspec
decodes them, a dict names the recipient, and every socket's frames of one loop tick leave
in one ``writelines``.  Whatever our server spends per message above this is the price of
its features and its framework; what this spends is the interpreter's and the kernel's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from typing import cast
from urllib.parse import parse_qs, urlsplit

import msgspec
import uvloop

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _Frame(msgspec.Struct):
    type: str
    dst: str = ""
    payload: msgspec.Raw = msgspec.Raw(b"null")


_decode = msgspec.json.Decoder(_Frame).decode


def _head(n: int) -> bytes:
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


class Relay(asyncio.Protocol):
    peers: dict[str, Relay] = {}
    pending: list[Relay] = []  # sockets with frames to write this tick
    scheduled = False

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.out: list[bytes] = []
        self.id = ""
        self.src = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if Relay.peers.get(self.id) is self:
            del Relay.peers[self.id]

    def send(self, data: bytes) -> None:
        if not self.out:
            Relay.pending.append(self)
            if not Relay.scheduled:
                Relay.scheduled = True
                asyncio.get_running_loop().call_soon(Relay.flush)
        self.out.append(_head(len(data)))
        self.out.append(data)

    @staticmethod
    def flush() -> None:
        Relay.scheduled = False
        pending, Relay.pending = Relay.pending, []
        for peer in pending:
            out, peer.out = peer.out, []
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.writelines(out)

    def _upgrade(self, data: bytes) -> bytes | None:
        """The handshake; returns what followed it, or None while it is incomplete."""
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head, rest = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        self.buf = b""
        lines = head.split("\r\n")
        fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        key = next(v.strip() for k, v in fields.items() if k.strip().lower() == "sec-websocket-key")
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.id = parse_qs(urlsplit(lines[0].split(" ")[1]).query)["id"][0]
        self.src = self.id.encode()
        Relay.peers[self.id] = self
        self.open = True
        self.send(b'{"type":"OPEN"}')
        return rest

    def data_received(self, data: bytes) -> None:
        if not self.open:
            rest = self._upgrade(data)
            if not rest:
                return
            data = rest
        if self.buf:
            data, self.buf = self.buf + data, b""
        pos, end = 0, len(data)
        while end - pos >= 2:
            b0, length, head = data[pos], data[pos + 1] & 0x7F, 2
            if length == 126:
                if end - pos < 4:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if end - pos < 10:
                    break
                length, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            start = pos + head + 4
            if end < start + length:
                break
            payload = apply_mask(data[start : start + length], data[start - 4 : start])
            pos = start + length
            op = b0 & 0x0F
            if op == 1:
                frame = _decode(payload)
                if frame.type == "CANDIDATE":
                    peer = Relay.peers.get(frame.dst)
                    if peer is not None:
                        peer.send(b'{"type":"CANDIDATE","src":"' + self.src + b'","payload":'
                                  + bytes(frame.payload) + b"}")
            elif op == 8:
                assert self.transport is not None
                self.transport.close()
                return
        if pos < end:
            self.buf = data[pos:]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Relay, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
