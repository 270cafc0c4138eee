"""The load generator: picows websocket clients on asyncio (uvloop), spread over several
processes, each connection bound to one of several ``127.0.0.x`` source addresses.

It speaks three protocols:

* ``signaling`` — ours (docs: /work/shared/PROTOCOL.md §1, §3): ``/ws?token=<jwt>``, first
  frame ``welcome``; sends ``{"type":"candidate","to":U,"payload":{"t":..,"s":..},"id":..}``,
  the recipient gets ``{"type":"candidate","from":..,"payload":{..}}``, the sender an ``ack``.
* ``peerjs`` — the PeerJS server (npm ``peer``): ``/peerjs?key=peerjs&id=ID&token=T``, first
  frame ``{"type":"OPEN"}``; ``{"type":"CANDIDATE","dst":ID,"payload":..}`` arrives as
  ``{"type":"CANDIDATE","src":..,"payload":..}``; ``HEARTBEAT`` frames keep it alive.
* ``socketio`` — socket.io v4 over engine.io v4 websocket (``bench/peers/socketio-server.js``):
  ``0{..}`` open, ``40`` connect, ``40{"sid":..}``; events ``42["c",{"to":ID,"p":..}]``
  arrive as ``42["c",{"f":..,"p":..}]``; ping ``2`` is answered with ``3``.

Connections come in pairs (2k, 2k+1), both in the same generator process; each sends to its
partner.  A payload carries the sender's ``time.time_ns()`` and a per-connection sequence
number; the receiver records the one-way latency, checks the order, and — in closed-loop
mode — lets its partner send the next message (the window is refilled on *delivery*, which
works identically for every server, acks or not).

The parent (:class:`LoadGen`) drives the processes over pipes, phase by phase: connect,
run (closed loop, fixed rate or idle), presence check, status, close.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import random
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# "signaling-noack": ours with messages that carry no ``id``, so the server sends no ack
# (PROTOCOL.md §3): the same work per message as the peers, neither of which acknowledges.
PROTOCOLS = ("signaling", "signaling-noack", "peerjs", "socketio")


# --------------------------------------------------------------------------------------
# worker side


def _import_picows() -> Any:
    import picows

    return picows


class Worker:
    """One generator process: its connections and counters."""

    def __init__(self, pipe: Connection, spec: dict[str, Any]) -> None:
        self.pipe = pipe
        self.spec = spec
        self.proto: str = spec["proto"]
        self.conns: list[Any] = []
        self.by_index: dict[int, Any] = {}
        self.sending = False
        self.closed_loop = False
        self.closing = False
        self.reset_stats()
        self.dropped = 0
        self.close_codes: Counter[str] = Counter()
        self.connect_errors: Counter[str] = Counter()
        self._cmds: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._bg: list[asyncio.Task[Any]] = []

    def reset_stats(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.delivered_win = 0
        self.acks = 0
        self.errors: Counter[str] = Counter()
        self.out_of_order = 0
        self.lat_us = array.array("q")
        self.sent_ms = array.array("i")  # each latency sample's send time, ms into the window
        self.win_start = 0
        self.win_end = 0

    # -- plumbing

    def _on_pipe(self) -> None:
        try:
            cmd = self.pipe.recv()
        except EOFError:
            cmd = {"op": "exit"}
        self._cmds.put_nowait(cmd)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._on_pipe)
        self._build()
        while True:
            cmd = await self._cmds.get()
            op = cmd["op"]
            if op == "exit":
                await self.close_all()
                return
            handler = getattr(self, "op_" + op)
            try:
                result = await handler(cmd)
            except Exception as exc:  # report, keep the process alive
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.set_blocking(self.pipe.fileno(), True)  # the loop made it non-blocking
            self.pipe.send(result)
            if op == "close":
                return

    def _build(self) -> None:
        picows = _import_picows()
        cls = {
            "signaling": _signaling_cls, "signaling-noack": _signaling_cls,
            "peerjs": _peerjs_cls, "socketio": _socketio_cls,
        }[self.proto](picows)
        for idx, user, partner, host, port, src in self.spec["conns"]:
            c = cls(self, idx, user, partner, host, port, src)
            self.conns.append(c)
            self.by_index[idx] = c
        for c in self.conns:
            c.partner_conn = self.by_index[c.partner]
            c.prepare()

    # -- phases

    async def op_connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        picows = _import_picows()
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 64)))
        retries = int(cmd.get("retries", 6))
        t0 = time.monotonic()

        async def one(c: Any) -> bool:
            for attempt in range(retries):
                async with sem:
                    c.ready = asyncio.get_running_loop().create_future()
                    try:
                        await picows.ws_connect(
                            _factory(c),
                            c.url(),
                            local_addr=(c.src, 0),
                            websocket_handshake_timeout=60,
                            enable_auto_pong=True,
                        )
                        await asyncio.wait_for(c.ready, 60)
                        return True
                    except Exception as exc:
                        self.connect_errors[_err_name(exc)] += 1
                        if c.transport is not None:
                            c.closing = True
                            with contextlib.suppress(Exception):
                                c.transport.disconnect()
                            c.closing = False
                        c.transport = None
                        c.open = False
                await asyncio.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
            return False

        tasks = [asyncio.ensure_future(one(c)) for c in self.conns]
        limit = cmd.get("deadline")
        _done, pending = await asyncio.wait(tasks, timeout=float(limit) if limit else None)
        for t in pending:  # out of time: give up on the rest
            t.cancel()
        if pending:
            await asyncio.wait(pending)
            self.connect_errors["gave_up_at_deadline"] += len(pending)
            for c in self.conns:
                if not c.open:
                    c.abandoned = True  # a handshake that completes later is closed at once
                    if c.transport is not None:
                        c.closing = True
                        with contextlib.suppress(Exception):
                            c.transport.disconnect()
        ok = [c.open for c in self.conns]
        if self.proto == "peerjs":
            self._bg.append(asyncio.create_task(self._heartbeats()))
        return {
            "connected": sum(ok),
            "failed": len(ok) - sum(ok),
            "seconds": time.monotonic() - t0,
            "connect_errors": dict(self.connect_errors),
        }

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(20)
            for c in self.conns:
                if c.open:
                    c.heartbeat()

    async def op_run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.reset_stats()
        mode = cmd["mode"]
        start = float(cmd["start"])
        warm = float(cmd["warmup"])
        dur = float(cmd["duration"])
        self.win_start = int((start + warm) * 1e9)
        self.win_end = int((start + warm + dur) * 1e9)
        end = start + warm + dur
        await asyncio.sleep(max(0.0, start - time.time()))
        live = [c for c in self.conns if c.open]
        if mode == "closed":
            self.closed_loop = True
            self.sending = True
            window = int(cmd.get("window", 1))
            for c in live:
                if c.partner_conn.open:
                    for _ in range(window):
                        c.send_msg()
            await asyncio.sleep(max(0.0, end - time.time()))
            self.sending = False
        elif mode == "rate":
            self.closed_loop = False
            rate = float(cmd["rate"])  # this process's share, messages/s
            senders = [c for c in live if c.partner_conn.open]
            i = 0
            count = 0
            while senders:
                now = time.time()
                if now >= end:
                    break
                due = int((now - start) * rate) - count
                for _ in range(due):
                    senders[i].send_msg()
                    i = (i + 1) % len(senders)
                count += max(due, 0)
                await asyncio.sleep(0.002)
        else:  # idle
            await asyncio.sleep(max(0.0, end - time.time()))
        # drain: wait for what is still in flight
        deadline = time.monotonic() + float(cmd.get("drain", 5))
        while self.delivered < self.sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # answers (acks) may trail deliveries by a little
        if self.proto == "signaling":
            deadline2 = min(deadline, time.monotonic() + 2)
            while (self.acks + sum(self.errors.values()) < self.sent
                   and time.monotonic() < deadline2):
                await asyncio.sleep(0.05)
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "delivered_win": self.delivered_win,
            "acks": self.acks,
            "errors": dict(self.errors),
            "out_of_order": self.out_of_order,
            "lat_us": self.lat_us.tobytes(),
            "sent_ms": self.sent_ms.tobytes(),
            "open": sum(1 for c in self.conns if c.open),
            "dropped": self.dropped,
            "diag": self._diag(),
        }

    def _diag(self) -> dict[str, int]:
        """Where undelivered messages are: senders with messages missing at their partner,
        by the instance of the sender (even/odd index), and those whose partner received
        nothing at all (their very first message was lost)."""
        out: Counter[str] = Counter()
        for c in self.conns:
            missing = c.seq - max(c.partner_conn.last_seq, 0)
            if missing > 0:
                out["senders_missing_" + ("even" if c.idx % 2 == 0 else "odd")] += 1
                if c.partner_conn.last_seq < 1:
                    out["senders_nothing_delivered"] += 1
        return dict(out)

    async def op_presence(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Ask, from one open connection, whether a sample of our users is online."""
        live = [c for c in self.conns if c.open]
        if not live or self.proto != "signaling":
            return {"checked": 0, "online": 0}
        sample = random.sample(live, min(int(cmd.get("sample", 50)), len(live)))
        users = [c.user for c in sample]
        online = 0
        asker = random.choice(live)
        for k in range(0, len(users), 100):
            chunk = users[k : k + 100]
            res = await asker.presence(chunk)
            online += sum(1 for u in chunk if res.get(u, {}).get("online"))
        return {"checked": len(users), "online": online}

    async def op_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "open": sum(1 for c in self.conns if c.open),
            "dropped": self.dropped,
            "close_codes": dict(self.close_codes),
            "pid": os.getpid(),
        }

    async def op_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.close_all()
        return {"closed": True}

    async def close_all(self) -> None:
        self.closing = True
        for t in self._bg:
            t.cancel()
        for c in self.conns:
            if c.transport is not None and c.open:
                c.closing = True
                with contextlib.suppress(Exception):
                    c.transport.send_close(1000)
        await asyncio.sleep(0.5)
        for c in self.conns:
            if c.transport is not None:
                with contextlib.suppress(Exception):
                    c.transport.disconnect()


def _factory(c: Any) -> Callable[[], Any]:
    return lambda: c


def _err_name(exc: BaseException) -> str:
    text = str(exc)
    for code in ("401", "403", "429", "503", "502", "500"):
        if code in text[:200]:
            return f"http_{code}"
    return type(exc).__name__


def _make_base(picows: Any) -> type:
    WSListener = picows.WSListener
    TEXT = picows.WSMsgType.TEXT
    CLOSE = picows.WSMsgType.CLOSE
    time_ns = time.time_ns

    class Base(WSListener):  # type: ignore[misc, valid-type]
        def __init__(self, w: Worker, idx: int, user: str, partner: int, host: str,
                     port: int, src: str) -> None:
            super().__init__()
            self.w = w
            self.idx = idx
            self.user = user
            self.partner = partner
            self.partner_conn: Any = None
            self.host = host
            self.port = port
            self.src = src
            self.transport: Any = None
            self.open = False
            self.closing = False
            self.abandoned = False
            self.ready: asyncio.Future[None] | None = None
            self.seq = 0
            self.last_seq = -1

        def prepare(self) -> None:
            pass

        def url(self) -> str:
            raise NotImplementedError

        def heartbeat(self) -> None:
            pass

        def on_ws_connected(self, transport: Any) -> None:
            self.transport = transport

        def _set_ready(self) -> None:
            if self.abandoned:
                self.closing = True
                with contextlib.suppress(Exception):
                    self.transport.disconnect()
                return
            self.open = True
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)

        def on_ws_disconnected(self, transport: Any) -> None:
            if self.open and not self.closing and not self.w.closing:
                self.w.dropped += 1
            self.open = False
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(ConnectionError("closed before ready"))

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            t = frame.msg_type
            if t == TEXT:
                self.on_text(frame.get_payload_as_bytes())
            elif t == CLOSE:
                code = frame.get_close_code()
                self.w.close_codes[str(int(code))] += 1
                if self.open and not self.closing and not self.w.closing:
                    self.w.dropped += 1
                self.open = False
                with contextlib.suppress(Exception):
                    transport.send_close(code)
                transport.disconnect()

        def on_text(self, data: bytes) -> None:
            raise NotImplementedError

        def send_text(self, data: bytes) -> None:
            self.transport.send(TEXT, data)

        def send_msg(self) -> None:
            self.seq += 1
            self.w.sent += 1
            self.send_text(self.frame(time_ns(), self.seq))

        def frame(self, t: int, s: int) -> bytes:
            raise NotImplementedError

        def delivered(self, t: int, s: int) -> None:
            """A message from our partner arrived at this connection."""
            now = time_ns()
            w = self.w
            w.delivered += 1
            if s <= self.last_seq:
                w.out_of_order += 1
            else:
                self.last_seq = s
            if w.win_start <= now < w.win_end:
                w.delivered_win += 1
                w.lat_us.append((now - t) // 1000)
                w.sent_ms.append((t - w.win_start) // 1_000_000)
            if w.closed_loop and w.sending:
                p = self.partner_conn
                if p.open:
                    p.send_msg()

    return Base


def _signaling_cls(picows: Any) -> type:
    import msgspec

    from service.auth import mint

    decode = msgspec.json.decode
    Base = _make_base(picows)

    class Signaling(Base):  # type: ignore[misc, valid-type]
        def prepare(self) -> None:
            self.prefix = (
                b'{"type":"candidate","to":"' + self.partner_conn.user.encode()
                + b'","payload":{"t":'
            )
            self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
            if self.w.proto == "signaling-noack":  # no id: no ack (decided once, not per frame)
                self.frame = self.frame_without_id

        def url(self) -> str:
            tok = mint(self.w.spec["secret"], self.user, "d", ttl=int(self.w.spec["ttl"]))
            return f"ws://{self.host}:{self.port}/ws?token={tok}"

        def frame(self, t: int, s: int) -> bytes:  # type: ignore[no-redef]
            return self.prefix + b'%d,"s":%d},"id":"%d"}' % (t, s, s)

        def frame_without_id(self, t: int, s: int) -> bytes:
            return self.prefix + b'%d,"s":%d}}' % (t, s)

        def on_text(self, data: bytes) -> None:
            msg = decode(data)
            kind = msg.get("type")
            if kind == "candidate":
                p = msg["payload"]
                self.delivered(p["t"], p["s"])
            elif kind == "ack":
                self.w.acks += 1
            elif kind == "welcome":
                self._set_ready()
            elif kind == "error":
                self.w.errors[str(msg.get("code"))] += 1
            elif kind == "presence":
                fut = self.pending.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg.get("users") or {})

        async def presence(self, users: list[str]) -> dict[str, Any]:
            qid = f"p{random.getrandbits(40)}"
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.pending[qid] = fut
            self.send_text(msgspec.json.encode({"type": "presence", "users": users, "id": qid}))
            return await asyncio.wait_for(fut, 30)

    return Signaling


def _peerjs_cls(picows: Any) -> type:
    import msgspec

    decode = msgspec.json.decode
    Base = _make_base(picows)

    class PeerJS(Base):  # type: ignore[misc, valid-type]
        def prepare(self) -> None:
            self.prefix = (
                b'{"type":"CANDIDATE","dst":"' + self.partner_conn.user.encode()
                + b'","payload":{"t":'
            )

        def url(self) -> str:
            return (f"ws://{self.host}:{self.port}/peerjs?key=peerjs&id={self.user}"
                    f"&token=t{self.idx}")

        def frame(self, t: int, s: int) -> bytes:
            return self.prefix + b'%d,"s":%d}}' % (t, s)

        def heartbeat(self) -> None:
            self.send_text(b'{"type":"HEARTBEAT"}')

        def on_text(self, data: bytes) -> None:
            msg = decode(data)
            kind = msg.get("type")
            if kind == "CANDIDATE":
                p = msg["payload"]
                self.delivered(p["t"], p["s"])
            elif kind == "OPEN":
                self._set_ready()
            elif kind in ("ERROR", "ID-TAKEN", "EXPIRE", "LEAVE"):
                self.w.errors[str(kind)] += 1

    return PeerJS


def _socketio_cls(picows: Any) -> type:
    import msgspec

    decode = msgspec.json.decode
    Base = _make_base(picows)

    class SocketIO(Base):  # type: ignore[misc, valid-type]
        def prepare(self) -> None:
            self.prefix = b'42["c",{"to":"' + self.partner_conn.user.encode() + b'","p":{"t":'

        def url(self) -> str:
            return (f"ws://{self.host}:{self.port}/socket.io/?EIO=4&transport=websocket"
                    f"&id={self.user}")

        def frame(self, t: int, s: int) -> bytes:
            return self.prefix + b'%d,"s":%d}}]' % (t, s)

        def on_text(self, data: bytes) -> None:
            head = data[:2]
            if head == b"42":
                ev = decode(data[2:])
                p = ev[1]["p"]
                self.delivered(p["t"], p["s"])
            elif head[:1] == b"2":  # engine.io ping
                self.send_text(b"3" + data[1:])
            elif head[:1] == b"0":  # engine.io open: connect the default namespace
                self.send_text(b"40")
            elif head == b"40":
                self._set_ready()
            elif head in (b"41", b"44"):
                self.w.errors["socketio_" + head.decode()] += 1
            elif head[:1] == b"1":  # engine.io close
                self.w.errors["engineio_close"] += 1

    return SocketIO


def worker_main(pipe: Connection, spec: dict[str, Any]) -> None:
    if spec.get("cpus"):
        os.sched_setaffinity(0, set(spec["cpus"]))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(Worker(pipe, spec).main())


# --------------------------------------------------------------------------------------
# parent side


@dataclass
class RunStats:
    """What one run phase measured, summed over the generator processes."""

    sent: int = 0
    delivered: int = 0
    delivered_win: int = 0
    acks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    out_of_order: int = 0
    open: int = 0
    dropped: int = 0
    lat_us: list[int] = field(default_factory=list)
    # (sent ms into the window, latency us) of every sample, in no particular order
    samples: list[tuple[int, int]] = field(default_factory=list)
    diag: Counter[str] = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    def timeline(self, bucket_ms: int = 250) -> list[list[float]]:
        """Latency over the window: per ``bucket_ms`` of send time, [start ms, samples,
        p50 ms, p99 ms, max ms].  Shows whether a high p99 is a few stalls or a steady
        queue."""
        buckets: dict[int, list[int]] = {}
        for t, lat in self.samples:
            buckets.setdefault(t // bucket_ms, []).append(lat)
        rows: list[list[float]] = []
        for b in sorted(buckets):
            v = sorted(buckets[b])
            rows.append([b * bucket_ms, len(v), v[len(v) // 2] / 1000,
                         v[_rank(len(v), 99)] / 1000, v[-1] / 1000])
        return rows

    def percentile_ms(self, q: float) -> float | None:
        if not self.lat_us:
            return None
        return self.lat_us[_rank(len(self.lat_us), q)] / 1000.0


def _rank(n: int, q: float) -> int:
    """The index of the ``q``-th percentile in ``n`` sorted samples (nearest rank)."""
    return min(n - 1, max(0, math.ceil(q / 100.0 * n) - 1))


class LoadGen:
    """The generator processes for one scenario run.

    ``targets``: the (host, port) of each server instance; connection *i* goes to
    ``targets[i % len(targets)]``, so with two targets every pair spans both instances.
    """

    def __init__(
        self,
        proto: str,
        targets: list[tuple[str, int]],
        conns: int,
        *,
        procs: int | None = None,
        cpus: set[int] | None = None,
        secret: str = "",
        src_addrs: int | None = None,
        prefix: str | None = None,
        ttl: int = 3000,
    ) -> None:
        if proto not in PROTOCOLS:
            raise ValueError(proto)
        conns += conns % 2
        self.proto = proto
        self.n = conns
        pairs = conns // 2
        self.nprocs = max(1, min(procs or max(2, math.ceil(conns / 5000)), pairs))
        naddr = src_addrs or max(2, math.ceil(conns / 12000))
        prefix = prefix or f"b{random.getrandbits(24):06x}-"
        self.users = [f"{prefix}{i}" for i in range(conns)]
        specs: list[dict[str, Any]] = []
        for w in range(self.nprocs):
            lo = pairs * w // self.nprocs * 2
            hi = pairs * (w + 1) // self.nprocs * 2
            rows = []
            for i in range(lo, hi):
                host, port = targets[i % len(targets)]
                src = f"127.0.0.{2 + i % naddr}"
                rows.append((i, self.users[i], i ^ 1, host, port, src))
            specs.append({"proto": proto, "conns": rows, "secret": secret, "ttl": ttl,
                          "cpus": sorted(cpus) if cpus else None})
        self.specs = specs
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []

    def start(self) -> None:
        ctx = mp.get_context("fork")  # the parent is single-threaded and has no loop
        for spec in self.specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.pipes.append(parent)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs if p.pid]

    def call(self, cmd: dict[str, Any], timeout: float = 600) -> list[dict[str, Any]]:
        for pipe in self.pipes:
            pipe.send(cmd)
        return self.collect(timeout)

    def collect(self, timeout: float = 600) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("generator process did not answer")
            res = pipe.recv()
            if "error" in res:
                raise RuntimeError(f"generator process failed: {res['error']}")
            out.append(res)
        return out

    def connect(self, concurrency: int = 64, deadline: float | None = None) -> dict[str, Any]:
        """Open every connection; with ``deadline`` (seconds) give up on those not open by
        then (they count as failed)."""
        res = self.call({"op": "connect", "concurrency": concurrency, "deadline": deadline},
                        timeout=(deadline or 3000) + 120)
        errors: Counter[str] = Counter()
        for r in res:
            errors.update(r["connect_errors"])
        return {
            "connected": sum(r["connected"] for r in res),
            "failed": sum(r["failed"] for r in res),
            "seconds": max(r["seconds"] for r in res),
            "connect_errors": dict(errors),
        }

    def run(
        self,
        mode: str,
        *,
        warmup: float,
        duration: float,
        window: int = 1,
        rate: float = 0.0,
        drain: float = 5.0,
        on_window: Callable[[str], None] | None = None,
    ) -> RunStats:
        """One phase: every process starts at the same wall time; ``on_window("start")`` and
        ``on_window("end")`` are called at the edges of the measured window (for /proc
        samples)."""
        start = time.time() + 0.3
        shares = [len(s["conns"]) / self.n for s in self.specs]
        for pipe, share in zip(self.pipes, shares, strict=True):
            pipe.send({"op": "run", "mode": mode, "start": start, "warmup": warmup,
                       "duration": duration, "window": window, "rate": rate * share,
                       "drain": drain})
        time.sleep(max(0.0, start + warmup - time.time()))
        if on_window:
            on_window("start")
        time.sleep(max(0.0, start + warmup + duration - time.time()))
        if on_window:
            on_window("end")
        res = self.collect(timeout=warmup + duration + drain + 120)
        st = RunStats()
        lat = array.array("q")
        for r in res:
            st.sent += r["sent"]
            st.delivered += r["delivered"]
            st.delivered_win += r["delivered_win"]
            st.acks += r["acks"]
            st.errors.update(r["errors"])
            st.out_of_order += r["out_of_order"]
            st.open += r["open"]
            st.dropped += r["dropped"]
            lat.frombytes(r["lat_us"])
            sent_ms = array.array("i")
            sent_ms.frombytes(r["sent_ms"])
            st.samples.extend(zip(sent_ms, lat[len(lat) - len(sent_ms):], strict=True))
            st.diag.update(r.get("diag", {}))
        st.lat_us = sorted(lat)
        return st

    def presence(self, sample: int) -> dict[str, int]:
        per = max(1, math.ceil(sample / self.nprocs))
        res = self.call({"op": "presence", "sample": per}, timeout=120)
        return {"checked": sum(r["checked"] for r in res),
                "online": sum(r["online"] for r in res)}

    def status(self) -> dict[str, Any]:
        res = self.call({"op": "status"}, timeout=60)
        codes: Counter[str] = Counter()
        for r in res:
            codes.update(r["close_codes"])
        return {"open": sum(r["open"] for r in res), "dropped": sum(r["dropped"] for r in res),
                "close_codes": dict(codes)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call({"op": "close"}, timeout=60)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.procs.clear()
        self.pipes.clear()

    def __enter__(self) -> LoadGen:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
