"""A reconnection storm at the rate limiter: how long it holds Redis for everyone else.

    .venv/bin/python -m bench.storm                     # 5,000 users, five storms
    .venv/bin/python -m bench.storm --users 20000 --repeat 3 --json /tmp/storm.json

A private redis-server (pinned to core 0 with 2+ cores, this process to core 1).  Each
storm is ``--users`` users, none of whom holds a lease, each sending its first message in
the same loop tick (what a deploy's reconnections look like to a worker): the limiter
counts them all in one round trip.  Redis runs a script alone, so the longest script
call is how long every other client of the cluster waited behind the storm; Redis's slow
log (every command logged during the storm) gives each call's duration.  Another client,
a process on Redis's core, sends PINGs one after another throughout: its longest wait is
what a route call of the cluster would have waited.  Also reported: the storm's round trip
as this process saw it, and the script calls it took.

Redis times its commands by the wall clock: compare within one machine and hour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/storm.py
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from bench.procstat import cpu_count, pinned  # noqa: E402
from service.backends.redis_limits import redis_rate_limiter  # noqa: E402
from service.core.ratelimit import resolve  # noqa: E402
from tests.support import start_redis  # noqa: E402


def _pinger(url: str, stop: Any, out: Any) -> None:
    """PING after PING until ``stop`` is set; sends back each one's wait in ms."""
    r = redis.Redis.from_url(url)
    waits: list[float] = []
    out.send("ready")
    while not stop.is_set():
        t0 = time.perf_counter()
        r.ping()
        waits.append((time.perf_counter() - t0) * 1000)
    out.send(waits)
    r.close()


async def _storm(url: str, users: int, k: int, ping_cpus: set[int] | None
                 ) -> dict[str, Any]:
    r = aioredis.Redis.from_url(url)
    w = redis_rate_limiter(url, r, "1000000/second")
    try:
        await w.hit("warm")  # the script loaded, the lane's connection open
        await r.config_set("slowlog-log-slower-than", 0)
        await r.config_set("slowlog-max-len", 100_000)
        await r.slowlog_reset()
        ctx = mp.get_context("fork")
        stop, (here, there) = ctx.Event(), ctx.Pipe()
        with pinned(ping_cpus):
            pinger = ctx.Process(target=_pinger, args=(url, stop, there))
            pinger.start()
        here.recv()
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(resolve(w.admit(f"s{k}-{i}")) for i in range(users)))
        wall_ms = (time.perf_counter() - t0) * 1000
        stop.set()
        waits: list[float] = here.recv()
        pinger.join()
        await r.config_set("slowlog-log-slower-than", 10_000)
        log = await r.slowlog_get(100_000)
        if results != [None] * users:
            raise RuntimeError("a first message was refused under a limit of a million")
        calls = [e["duration"] for e in log if e["command"].split(b" ")[0].upper() == b"EVALSHA"]
        return {
            "users": users,
            "round_trip_ms": round(wall_ms, 2),
            "script_calls": len(calls),
            "longest_call_ms": round(max(calls) / 1000, 3),
            "script_ms_total": round(sum(calls) / 1000, 3),
            "pings": len(waits),
            "longest_ping_ms": round(max(waits), 3),
        }
    finally:
        await w.close()
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    args = ap.parse_args(argv)
    pin = not args.no_pin and cpu_count() >= 2
    with pinned({0} if pin else None):
        server = start_redis()
    try:
        with pinned({1} if pin else None):
            runs = [asyncio.run(_storm(server.url, args.users, k, {0} if pin else None))
                    for k in range(args.repeat)]
    finally:
        server.stop()
    for run in runs:
        print(json.dumps(run), flush=True)
    summary = {
        "users": args.users, "pinned": pin, "runs": runs,
        "median_longest_call_ms": statistics.median(r["longest_call_ms"] for r in runs),
        "median_longest_ping_ms": statistics.median(r["longest_ping_ms"] for r in runs),
        "median_round_trip_ms": statistics.median(r["round_trip_ms"] for r in runs),
        "median_script_ms_total": statistics.median(r["script_ms_total"] for r in runs),
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
