"""One instance's inline path without sockets: what the read callback spends per message.

    .venv/bin/python -m bench.inline                          # 2,000 connections
    .venv/bin/python -m bench.inline --conns 10000 --per-tick 500 --json /tmp/inline.json
    PYTHONPATH=/path/to/other/checkout .venv/bin/python -m bench.inline   # an A/B

A single-worker ``Runtime`` on the in-process backplane (router, hub, presence, the
in-memory limiter: what ``make run`` wires up), ``--conns`` connections in pairs, each with
the edge's own websocket object (``LeanWebsocket``) on a fake transport that only counts
bytes.  Every connection's read loop waits on an empty inbox, as on a live server between
messages, so each frame takes the inline path: ``data_received`` parses and unmasks it,
``Router.handle_now`` counts it, looks the peer up, queues the delivery and the ack, and the
tick's ``Flusher`` frames and "writes" them.  Per tick ``--per-tick`` connections, in a
shuffled order (eight fixed permutations), each receive one whole masked text frame
``{"type":"candidate","to":PEER,"payload":{..},"id":..}``, as the load generator sends.

So the figure is the interpreter's share of a message on the hot path at a realistic
spread over connections (what a message touches is what it costs: at 2,000 connections
the per-connection objects no longer stay in the CPU caches), without the system calls the
socket-level suite (``bench.run``) adds.  Output: one JSON object per ``--repeat``, then a
summary with their median ``ns_per_msg`` (this process's CPU per message).  Pinned to core 1
(``--no-pin`` leaves affinity alone); the cyclic GC is set as the workers set it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/inline.py
    sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_count  # noqa: E402
from service import transport  # noqa: E402
from service.app import GC_THRESHOLDS  # noqa: E402
from service.auth import Identity  # noqa: E402
from service.config import Settings  # noqa: E402
from service.core.contracts import Location  # noqa: E402
from service.core.session import Session  # noqa: E402
from service.runtime import Runtime  # noqa: E402


class CountingTransport:
    """What the edge writes to, minus the socket: bytes are counted, never buffered."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += len(part)

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:  # a frame the inline path did not take was queued
        raise RuntimeError("a frame left the inline path")


def masked_text_frame(payload: bytes, key: bytes) -> bytes:
    """One client frame (FIN, text, masked with ``key``), as RFC 6455 §5.2 lays it out."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _connect(rt: Runtime, settings: Settings, user: str) -> transport.LeanWebsocket:
    loop = asyncio.get_running_loop()
    ws = transport.LeanWebsocket(transport.SignalingServerProtocol(), ping_interval=None)
    ws.transport = CountingTransport()
    ws.loop = loop
    session = Session(
        Identity(user, "d", 2_000_000_000),
        Location(rt.node_id, f"{rt.node_id}.{user}"),
        transport._closed_by_flush,
        settings.outbox_max_messages,
        settings.outbox_max_bytes,
    )
    session.edge = ws
    session.on_ready = transport._ON_READY
    await rt.hub.connect(session, lambda resumed, missed: b"{}")
    # what ``_read_loop`` sets up: the inline router, and a read loop waiting for frames
    ws.fast = (rt.router, session)
    ws._waiter = loop.create_future()
    return ws


async def measure(conns: int, per_tick: int, seconds: float, repeat: int,
                  warmup: float) -> list[dict[str, Any]]:
    settings = Settings.from_env({"JWT_SECRET": "b" * 40, "RATE_LIMIT": "1000000/second"})
    rt = Runtime.build(settings)
    await rt.start()
    sockets = [await _connect(rt, settings, f"u{i}") for i in range(conns)]
    await asyncio.sleep(0.05)  # the welcomes out
    rng = random.Random(1)
    frames = [
        masked_text_frame(
            b'{"type":"candidate","to":"u%d","payload":{"t":1764300000000000000,"s":%d},'
            b'"id":"%d"}' % (i ^ 1, i, i), rng.randbytes(4))
        for i in range(conns)
    ]
    rounds: list[list[list[tuple[Callable[[bytes], None], bytes]]]] = []
    for _ in range(8):
        order = list(range(conns))
        rng.shuffle(order)
        calls: list[tuple[Callable[[bytes], None], bytes]] = [
            (sockets[k].data_received, frames[k]) for k in order]
        rounds.append([calls[j : j + per_tick] for j in range(0, conns, per_tick)])

    async def run_for(duration: float) -> int:
        n, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            for ticks in rounds:
                for tick in ticks:
                    for receive, frame in tick:
                        receive(frame)
                    n += len(tick)
                    await asyncio.sleep(0)  # the loop's turn: the flusher writes the tick
        return n

    def written() -> int:
        return sum(ws.transport.written for ws in sockets)

    out: list[dict[str, Any]] = []
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        await run_for(warmup)
        for _ in range(repeat):
            b0, c0 = written(), time.process_time()
            n = await run_for(seconds)
            cpu = time.process_time() - c0
            out.append({"conns": conns, "per_tick": per_tick, "messages": n,
                        "ns_per_msg": round(1e9 * cpu / n),
                        "bytes_out_per_msg": round((written() - b0) / n, 1),
                        # frames that left the inline path for a read loop (none expected)
                        "queued": sum(len(ws.inbox) for ws in sockets)})
            print(json.dumps(out[-1]), flush=True)
    finally:
        gc.unfreeze()  # as it was: main() may run inside another program (the tests)
        gc.set_threshold(*thresholds)
        await rt.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=2000, help="connections (pairs: even)")
    ap.add_argument("--per-tick", type=int, default=200, help="frames per loop tick")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    args = ap.parse_args(argv)
    if args.conns < 2 or args.conns % 2:
        ap.error("--conns must be even (connections talk in pairs)")
    mask = os.sched_getaffinity(0)
    try:
        if not args.no_pin and cpu_count() >= 2:
            os.sched_setaffinity(0, {1})
        import uvloop

        runs = uvloop.run(measure(args.conns, args.per_tick, args.seconds, args.repeat,
                                  args.warmup))
    finally:
        os.sched_setaffinity(0, mask)
    summary = {"conns": args.conns, "per_tick": args.per_tick, "runs": runs,
               "median_ns_per_msg": statistics.median(r["ns_per_msg"] for r in runs)}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
