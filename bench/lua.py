"""The route script alone: what ``_ROUTE`` costs Redis per message.

    .venv/bin/python -m bench.lua                        # batches of 100, five repeats
    .venv/bin/python -m bench.lua --script OTHER.lua --json /tmp/lua.json   # an A/B

A private redis-server (pinned to core 0 with 2+ cores, this process to core 1) holds
``--users`` users with one device each on another live worker.  Batches of ``--batch``
messages, each to one of them, go through the script as ``RedisBackplane._take_routes``
builds them (a recipient key, then five arguments per message); every message must come
back queued for one device.  Redis's own count of microseconds spent in EVALSHA (``INFO
commandstats``) over the messages is ``redis_us_per_msg``.  Each repeat also runs a script
that only reads each recipient's hash (``HGETALL``) and one that does nothing per message,
so the share of the script beyond the lookup and the call itself shows.

Redis times its commands by the wall clock: on a busy core the figures include time the
server was not running.  Compare within one invocation, variants interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/lua.py
    sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import redis  # noqa: E402

from bench.procstat import cpu_count, pinned  # noqa: E402
from service.backends import keys  # noqa: E402
from service.backends.redis_backplane import (  # noqa: E402
    _ROUTE,
    _ROW_HEAD,
    ENTRY_BYTES,
    ENTRY_ENVELOPES,
)
from tests.support import start_redis  # noqa: E402

_LOOKUP_ONLY = """
local out = {}
for i = 1, #KEYS do
  redis.call('HGETALL', KEYS[i])
  out[i] = 1
end
return out
"""
_NOTHING = """
local out = {}
for i = 1, #KEYS do out[i] = 1 end
return out
"""
# a frame as the load generator's messages become (~150 bytes)
_FRAME = (b'{"type":"candidate","from":"u%d","from_device":"d","payload":{"t":1700000000000000000,'
          b'"s":%d,"pad":"' + b"x" * 40 + b'"},"ts":1700000000000,"id":"%d"}')
_encoder = msgspec.msgpack.Encoder()


def _run(r: redis.Redis, script: str, batch: int, calls: int, users: int) -> float:
    """Microseconds of EVALSHA per message over ``calls`` batches of ``batch``."""
    sha = r.script_load(script)
    r.config_resetstat()
    for k in range(calls):
        targets = [f"u{(k * batch + i) % users}" for i in range(batch)]
        args: list[Any] = [keys.node_alive_prefix(), "A", keys.inbox(""), 10_000,
                           ENTRY_ENVELOPES, ENTRY_BYTES]
        for i, user in enumerate(targets):
            args += (i, "", "", _ROW_HEAD + _encoder.encode(("d", user))[1:],
                     _encoder.encode((_FRAME % (i, k, i), "", 1700000000000))[1:])
        out = r.evalsha(sha, batch, *[keys.devices(u) for u in targets], *args)
        if out != [1] * batch:
            raise RuntimeError(f"not every message was queued for one device: {out[:5]}")
    r.xtrim(keys.inbox("B"), maxlen=0)
    stats = r.info("commandstats")["cmdstat_evalsha"]
    return float(stats["usec"]) / (calls * batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100, help="messages per script run")
    ap.add_argument("--calls", type=int, default=600, help="script runs per measurement")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--script", help="a variant of _ROUTE (a file) measured beside it")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    args = ap.parse_args(argv)
    pin = not args.no_pin and cpu_count() >= 2
    variants = {"route": _ROUTE, "lookup_only": _LOOKUP_ONLY, "nothing": _NOTHING}
    if args.script:
        variants["variant"] = Path(args.script).read_text()
    with pinned({0} if pin else None):
        server = start_redis()
    mask = os.sched_getaffinity(0)
    runs: list[dict[str, float]] = []
    try:
        if pin:
            os.sched_setaffinity(0, {1})
        r = redis.Redis(port=server.port)
        for node in ("A", "B"):
            r.set(keys.node_alive(node), 1)
        r.xgroup_create(keys.inbox("B"), "g", mkstream=True)
        for i in range(args.users):
            r.hset(keys.devices(f"u{i}"), "d", f"B|c{i}")
        for _ in range(args.repeat):  # variants interleaved
            runs.append({name: round(_run(r, text, args.batch, args.calls, args.users), 3)
                         for name, text in variants.items()})
        r.close()
    finally:
        os.sched_setaffinity(0, mask)
        server.stop()
    summary = {
        "batch": args.batch, "users": args.users, "pinned": pin, "runs": runs,
        "median_redis_us_per_msg": {
            name: statistics.median(run[name] for run in runs) for name in variants},
    }
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
