"""The websocket edge's per-connection object, without a socket."""

from __future__ import annotations

import asyncio
import sys

from websockets.protocol import OPEN

from service.transport import LeanWebsocket, PingWheel, SignalingServerProtocol


def test_an_idle_connection_keeps_a_small_shared_key_dict() -> None:
    """CPython shares an instance __dict__'s keys with its class only up to 30 attributes;
    past that every connection carries a 1.6 KB dict of its own instead of ~0.3 KB (this
    happened once: +1.4 KB per idle connection in the benchmark)."""
    ws = LeanWebsocket(SignalingServerProtocol())
    ws.fast = None  # set per connection by the read loop
    assert len(vars(ws)) < 30
    assert sys.getsizeof(vars(ws)) < 600
    # what Sanic's methods read is there
    for name in ("conn_mutex", "recv_cancel", "data_finished_fut", "keepalive_ping_task",
                 "auto_closer_task", "connection_lost_waiter", "pause_frame_fut", "can_pause"):
        assert hasattr(ws, name)


def test_the_per_connection_coroutines_keep_no_cells() -> None:
    """A closure or a comprehension in the handler or its read loop makes the variables it
    reads cells, objects of every open connection for its whole life (five of them once:
    ~0.3 KB per idle connection and five more objects for every full collection to scan)."""
    from service import transport

    assert transport.websocket_handler.__code__.co_cellvars == ()
    assert transport._read_loop.__code__.co_cellvars == ()


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass


class _Router:
    def __init__(self, handles: bool) -> None:
        self.handles = handles
        self.seen: list[bytes] = []

    def handle_now(self, session: object, frame: bytes) -> bool:
        self.seen.append(frame)
        return self.handles


def _frame(payload: bytes, first: int = 0x81, mask: bool = True) -> bytes:
    key = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    if not mask:
        return bytes((first, len(payload))) + payload
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + key + masked


def _reading(handles: bool) -> tuple[LeanWebsocket, _Router, _Transport, asyncio.Future[None]]:
    """A connection whose read loop waits on an empty inbox, with an inline router."""
    ws = LeanWebsocket(SignalingServerProtocol(), ping_interval=None)
    ws.ws_proto.state = OPEN
    transport = _Transport()
    ws.transport = transport
    router = _Router(handles)
    ws.fast = (router, object())  # type: ignore[assignment]
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ws._waiter = waiter
    return ws, router, transport, waiter


def _close_code(transport: _Transport) -> int | None:
    for chunk in transport.out:
        if chunk[:1] == b"\x88":
            return int.from_bytes(chunk[2:4], "big")
    return None


async def test_one_whole_frame_is_handled_in_the_read_callback() -> None:
    ws, router, transport, waiter = _reading(handles=True)
    ws.data_received(_frame(b'{"type":"offer"}'))
    assert router.seen == [b'{"type":"offer"}']
    assert ws.inbox == [] and not waiter.done()

    # not for the inline path: queued for the read loop, which is woken
    ws, router, transport, waiter = _reading(handles=False)
    ws.data_received(_frame(b'{"type":"ping"}'))
    assert router.seen == [b'{"type":"ping"}']
    assert ws.inbox == [(True, b'{"type":"ping"}')] and waiter.done()


async def test_a_lone_frame_breaking_the_rules_still_fails_with_the_rfc_code() -> None:
    for data, code in (
        (_frame(b'"\xff\xfe"'), 1007),  # not UTF-8
        (_frame(b"{}", mask=False), 1002),  # clients must mask
        (_frame(b"{}", first=0xC1), 1002),  # a reserved bit
        (_frame(b"{}", first=0x80), 1002),  # a continuation with nothing to continue
    ):
        ws, router, transport, waiter = _reading(handles=True)
        ws.data_received(data)
        assert router.seen == [], data
        assert _close_code(transport) == code, (data, transport.out)
        assert waiter.done()


async def test_nothing_after_a_close_frame_reaches_the_router() -> None:
    """The fast path does not read ``ws_proto.close_rcvd``: a close frame wakes the read
    loop, and a woken loop keeps later frames off the fast path (then the loop ends)."""
    ws, router, transport, waiter = _reading(handles=True)
    close = bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big")
    ws.data_received(close)
    assert waiter.done() and ws.ws_proto.close_rcvd is not None
    ws.data_received(_frame(b'{"type":"offer"}'))
    assert router.seen == [] and ws.inbox == []
    assert _close_code(transport) == 1000  # the close frame echoed


def test_a_tick_of_frames_goes_out_as_one_write_of_whole_frames() -> None:
    """However many frames a connection got in a tick, one write carries them, each with
    the header its length needs (7-bit, 16-bit and 64-bit lengths), in order."""
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from service.auth import Identity
    from service.core.contracts import Location
    from service.core.session import Session
    from service.transport import flush_one

    ws = LeanWebsocket(SignalingServerProtocol(), ping_interval=None)
    ws.ws_proto.state = OPEN
    transport = _Transport()
    ws.transport = transport
    session = Session(Identity("u", "d", 2_000_000_000), Location("n", "c"),
                      lambda code, reason: None, max_bytes=1 << 20)
    sizes = [5, 125, 126, 300, 65535, 65536, 70000]
    frames = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    for frame in frames:
        session.push(frame)
    assert flush_one(session, ws) == len(frames)
    session.push(b"last")
    assert flush_one(session, ws) == 1
    assert len(transport.out) == 2  # one write per flush

    reader = StreamReader()
    for chunk in transport.out:
        reader.feed_data(chunk)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    got: list[bytes] = []
    for _ in range(len(frames) + 1):
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        assert frame.opcode is Opcode.TEXT and frame.fin
        got.append(bytes(frame.data))
        parser = Frame.parse(reader.read_exact, mask=False)
    assert got == [*frames, b"last"]


class _Ticking:
    """A socket as the ping wheel sees it: records when it was looked at."""

    def __init__(self, due: float, every: float) -> None:
        self.ping_slot = -1
        self.ping_due = due
        self.every = every
        self.looked: list[float] = []

    def ping_now(self, now: float) -> float | None:
        self.looked.append(now)
        if now < self.ping_due:
            return self.ping_due
        self.ping_due = now + self.every
        return self.ping_due


def test_the_ping_wheel_looks_only_at_the_sockets_that_are_due() -> None:
    """1,000 sockets pinged every 20 s with their first pings spread over 20 s: each step
    of one second looks at the ~50 due then, never at the rest (a scan of every socket
    each second was what the keepalive cost an idle worker), and each socket is looked at
    once per interval, within a step of its time."""
    wheel = PingWheel(20.0, 20.0, now=0.0)
    socks = [_Ticking(due=1.0 + (i % 20) + 0.5, every=20.0) for i in range(1000)]
    for s in socks:
        wheel.add(s)
    assert wheel.size == 1000
    looks = []
    for step in range(1, 62):
        before = sum(len(s.looked) for s in socks)
        wheel.advance(float(step))
        looks.append(sum(len(s.looked) for s in socks) - before)
    assert max(looks) == 50 and sum(looks) == 3000, looks  # three pings each, no other look
    for i, s in enumerate(socks):
        assert 0 <= s.looked[0] - (1.5 + i % 20) < 1  # the first step at or after its time
        assert [b - a for a, b in zip(s.looked, s.looked[1:], strict=False)] == [20.0, 20.0]
    wheel.discard(socks[0])
    wheel.discard(socks[0])  # twice: no-op
    assert wheel.size == 999 and socks[0].ping_slot == -1
    wheel.advance(100.0)
    assert len(socks[0].looked) == 3


def test_a_stalled_loop_catches_up_once_per_socket() -> None:
    """Held up for longer than a turn of the wheel, the next step looks at every socket
    once (each is overdue), then the wheel counts on from then."""
    wheel = PingWheel(5.0, 5.0, now=0.0)
    socks = [_Ticking(due=float(1 + i % 5), every=5.0) for i in range(100)]
    for s in socks:
        wheel.add(s)
    wheel.advance(1000.0)
    assert [len(s.looked) for s in socks] == [1] * 100
    wheel.advance(1001.0)
    wheel.advance(1002.0)
    assert sum(len(s.looked) for s in socks) == 100  # next pings due at 1,005
    for t in range(1003, 1007):
        wheel.advance(float(t))
    assert [len(s.looked) for s in socks] == [2] * 100


def test_a_long_interval_keeps_the_wheel_small() -> None:
    """An hour's interval does not make 3,600 slots: the socket is looked at once a turn
    of the wheel until its time, and pinged then."""
    wheel = PingWheel(3600.0, 60.0, now=0.0)
    assert len(wheel.slots) <= 64
    sock = _Ticking(due=3600.0, every=3600.0)
    wheel.add(sock)
    for t in range(1, 7201):
        wheel.advance(float(t))
    pings = [t for t in sock.looked if t >= 3600.0]
    assert pings[0] == 3600.0 and 7200.0 in pings
    assert len(sock.looked) < 7200 / 50  # a look every turn, not every second


T0 = 1000.0  # a monotonic time (never 0, which ``ping_sent_at`` reads as "none out")


def _pinged(interval: float, timeout: float) -> tuple[LeanWebsocket, _Transport]:
    ws = LeanWebsocket(SignalingServerProtocol(), ping_interval=interval, ping_timeout=timeout)
    ws.ws_proto.state = OPEN
    ws.ws_proto.parser = None  # type: ignore[assignment]  # as connection_made leaves it
    transport = _Transport()
    ws.transport = transport
    ws.ping_due = T0
    return ws, transport


def test_a_ping_is_two_constant_bytes_and_a_pong_clears_it() -> None:
    ws, transport = _pinged(20.0, 20.0)
    assert ws.ping_now(T0) == T0 + 20  # the pong's deadline is the next ping's time
    assert transport.out == [b"\x89\x00"] and ws.ping_sent_at == T0
    ws.data_received(_frame(b"", first=0x8A))  # the client's pong (masked, empty)
    assert ws.ping_sent_at == 0.0
    assert ws.ping_now(T0 + 20) == T0 + 40 and transport.out == [b"\x89\x00"] * 2


def test_an_unanswered_ping_fails_the_connection_1011_at_its_timeout() -> None:
    """With a timeout shorter than the interval the socket is looked at when the timeout
    ends: answered, it waits for its next ping; unanswered, it is closed 1011 then, not
    at the next interval."""
    ws, transport = _pinged(20.0, 5.0)
    assert ws.ping_now(T0) == T0 + 5
    ws.data_received(_frame(b"", first=0x8A))
    assert ws.ping_now(T0 + 5) == T0 + 20 and transport.out == [b"\x89\x00"]  # no ping
    assert ws.ping_now(T0 + 20) == T0 + 25
    assert ws.ping_now(T0 + 24) == T0 + 25 and _close_code(transport) is None  # not yet
    assert ws.ping_now(T0 + 25) is None
    assert _close_code(transport) == 1011
    # a longer timeout than the interval: no second ping while the first is unanswered
    ws, transport = _pinged(5.0, 12.0)
    assert ws.ping_now(T0) == T0 + 5
    assert ws.ping_now(T0 + 5) == T0 + 12 and transport.out == [b"\x89\x00"]
    assert ws.ping_now(T0 + 12) is None and _close_code(transport) == 1011
