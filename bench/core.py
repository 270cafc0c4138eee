"""The routing path without sockets: what a message costs in this process's Python alone.

    .venv/bin/python -m bench.core                     # two workers on a private Redis
    .venv/bin/python -m bench.core --memory            # one worker, in-process backplane
    .venv/bin/python -m bench.core --noack --pairs 100 --seconds 5 --json /tmp/core.json

Two ``Runtime``s (two workers' wiring: router, hub, presence, limiter, backplane) run in this
one process on a private redis-server; ``--pairs`` users on one talk to as many on the other,
closed loop, one message in flight per user.  A message goes through everything a worker does
with it (parse, the cluster-wide limiter, the lookup, the stream write, the other worker's
read and delivery, the ack) except the websocket: no frames, no client sockets, no system
calls but Redis's.  So the figure isolates the interpreter's share of a message, which the
socket-level suite (``bench.run``) cannot separate from the kernel's.

This process is pinned to core 1 and redis-server to core 0 (with 2+ cores); the cyclic GC
is set as the server's workers set it.  Output: one JSON object per ``--repeat``, then their
median, with ``python_us_per_msg`` (this process's CPU per delivered message) and
``redis_us_per_msg``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/core.py
    sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_count, cpu_seconds, pinned  # noqa: E402
from service.app import GC_THRESHOLDS  # noqa: E402
from service.auth import Identity  # noqa: E402
from service.config import Settings  # noqa: E402
from service.core.contracts import Location  # noqa: E402
from service.core.session import Session  # noqa: E402
from service.runtime import Runtime  # noqa: E402
from tests.support import start_redis  # noqa: E402


def _runtime(redis_url: str | None) -> Runtime:
    env = {"JWT_SECRET": "b" * 40, "RATE_LIMIT": "1000000/second"}
    if redis_url:
        env["REDIS_URL"] = redis_url
    return Runtime.build(Settings.from_env(env))


class Loop:
    """Users in pairs across the runtimes; each sends when its partner's message arrived."""

    def __init__(self, runtimes: list[Runtime], pairs: int, noack: bool) -> None:
        self.runtimes = runtimes
        self.pairs = pairs
        self.noack = noack
        self.delivered = 0
        self.acks = 0
        self.running = True
        self._arrived: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def _on_ready(self, session: Session) -> None:
        # called before the frame is queued: read the outbox after it (as the edge does)
        asyncio.get_running_loop().call_soon(self._drain, session)

    def _drain(self, session: Session) -> None:
        for frame in session.take():
            if frame.startswith(b'{"type":"candidate"'):
                self.delivered += 1
                self._arrived[session.user_id].set()
            elif frame.startswith(b'{"type":"ack"'):
                self.acks += 1

    async def start(self) -> None:
        a, b = self.runtimes[0], self.runtimes[-1]
        for i in range(self.pairs):
            for rt, user, peer in ((a, f"a{i}", f"b{i}"), (b, f"b{i}", f"a{i}")):
                session = Session(
                    Identity(user, "d", 2_000_000_000),
                    Location(rt.node_id, f"{rt.node_id}.{user}"),
                    lambda code, reason: None,
                )
                session.on_ready = self._on_ready
                self._arrived[user] = asyncio.Event()
                await rt.hub.connect(session)
                session.take()
                self._tasks.append(asyncio.ensure_future(self._send(rt, session, peer)))

    async def _send(self, rt: Runtime, session: Session, peer: str) -> None:
        arrived = self._arrived[session.user_id]
        head = b'{"type":"candidate","to":"' + peer.encode() + b'","payload":{"s":'
        n = 0
        while self.running:
            n += 1
            frame = head + (b"%d}}" % n if self.noack else b'%d},"id":"%d"}' % (n, n))
            admission = rt.limiter.admit(session.user_id)
            await rt.router.handle(session, frame, admission, counted=True)
            await arrived.wait()
            arrived.clear()

    async def stop(self) -> None:
        self.running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _measure(args: argparse.Namespace, redis_url: str | None, redis_pid: int | None
                   ) -> list[dict[str, Any]]:
    runtimes = [_runtime(redis_url)] if redis_url is None else [
        _runtime(redis_url), _runtime(redis_url)]
    for rt in runtimes:
        await rt.start()
    loop = Loop(runtimes, args.pairs, args.noack)
    out: list[dict[str, Any]] = []
    thresholds = gc.get_threshold()
    try:
        await loop.start()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        await asyncio.sleep(args.warmup)
        for _ in range(args.repeat):
            d0, a0, c0, t0 = loop.delivered, loop.acks, time.process_time(), time.monotonic()
            r0 = cpu_seconds(redis_pid) if redis_pid else 0.0
            await asyncio.sleep(args.seconds)
            n = loop.delivered - d0
            wall = time.monotonic() - t0
            redis_s = (cpu_seconds(redis_pid) - r0) if redis_pid else 0.0
            out.append({
                "delivered": n,
                "acks": loop.acks - a0,
                "msgs_per_s": round(n / wall, 1),
                "python_us_per_msg": round(1e6 * (time.process_time() - c0) / max(1, n), 2),
                "redis_us_per_msg": round(1e6 * redis_s / max(1, n), 2),
            })
            print(json.dumps(out[-1]), flush=True)
    finally:
        gc.unfreeze()  # as it was: main() may run inside another program (the tests)
        gc.set_threshold(*thresholds)
        await loop.stop()
        for rt in runtimes:
            await rt.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", action="store_true", help="one runtime, in-process backplane")
    ap.add_argument("--noack", action="store_true", help="messages without id (no ack)")
    ap.add_argument("--pairs", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    args = ap.parse_args(argv)
    pin = not args.no_pin and cpu_count() >= 2
    redis = None
    if not args.memory:
        with pinned({0} if pin else None):
            redis = start_redis()
    mask = os.sched_getaffinity(0)
    try:
        if pin:
            os.sched_setaffinity(0, {1})
        import uvloop

        runs = uvloop.run(_measure(args, redis.url if redis else None,
                                   redis.proc.pid if redis else None))
    finally:
        os.sched_setaffinity(0, mask)
        if redis is not None:
            redis.stop()
    summary = {
        "backplane": "memory" if args.memory else "redis",
        "acks": not args.noack, "pairs": args.pairs, "pinned": pin, "runs": runs,
        "median_python_us_per_msg": statistics.median(r["python_us_per_msg"] for r in runs),
        "median_redis_us_per_msg": statistics.median(r["redis_us_per_msg"] for r in runs),
        "median_msgs_per_s": statistics.median(r["msgs_per_s"] for r in runs),
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
