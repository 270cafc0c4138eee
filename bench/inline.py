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
summary with their median ``ns_per_msg`` (this process's CPU per message).  ``--costs``
instead alternates, in the same process, rounds of the whole path with rounds of the path
without one part (``PARTS``), and reports each part's cost per message.  Pinned to core 1
(``--no-pin`` leaves affinity alone); the cyclic GC is set as the workers set it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
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
from service.core.contracts import Location, NullStats  # noqa: E402
from service.core.session import Session  # noqa: E402
from service.runtime import Runtime  # noqa: E402


class CountingTransport:
    """What the edge writes to, minus the socket: bytes are counted, never buffered."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0

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


class InlinePath:
    """``conns`` connections of one runtime, every read loop waiting, and the frames to
    hand them: ``rounds[with_id]`` is eight shuffled passes over every connection, cut into
    ticks of ``per_tick`` (``data_received``, frame) calls."""

    def __init__(self, rt: Runtime, sockets: list[transport.LeanWebsocket],
                 per_tick: int) -> None:
        self.rt, self.sockets = rt, sockets
        rng = random.Random(1)
        conns = len(sockets)
        tails = [(b',"id":"%d"}' % i, b"}") for i in range(conns)]
        self.rounds: dict[bool, list[list[list[tuple[Callable[[bytes], None], bytes]]]]] = {}
        keys = [rng.randbytes(4) for _ in range(conns)]
        orders = []
        for _ in range(8):
            order = list(range(conns))
            rng.shuffle(order)
            orders.append(order)
        for with_id in (True, False):
            frames = [
                masked_text_frame(
                    b'{"type":"candidate","to":"u%d","payload":{"t":1764300000000000000,'
                    b'"s":%d}' % (i ^ 1, i) + tails[i][0 if with_id else 1], keys[i])
                for i in range(conns)
            ]
            passes: list[list[list[tuple[Callable[[bytes], None], bytes]]]] = []
            for order in orders:
                calls: list[tuple[Callable[[bytes], None], bytes]] = [
                    (sockets[k].data_received, frames[k]) for k in order]
                passes.append([calls[j : j + per_tick] for j in range(0, conns, per_tick)])
            self.rounds[with_id] = passes

    async def run_for(self, duration: float, with_id: bool = True) -> int:
        """Hand frames over, tick by tick, for ``duration`` seconds; returns how many."""
        n, end = 0, time.perf_counter() + duration
        while time.perf_counter() < end:
            n += await self.run_passes(len(self.rounds[with_id]), with_id)
        return n

    async def run_passes(self, passes: int, with_id: bool = True) -> int:
        """Hand over exactly ``passes`` passes (each a frame from every connection)."""
        n, rounds = 0, self.rounds[with_id]
        for i in range(passes):
            for tick in rounds[i % len(rounds)]:
                for receive, frame in tick:
                    receive(frame)
                n += len(tick)
                await asyncio.sleep(0)  # the loop's turn: the flusher writes the tick
        return n

    def written(self) -> int:
        return sum(ws.transport.written for ws in self.sockets)

    def queued(self) -> int:
        """Frames that left the inline path for a read loop (none expected)."""
        return sum(len(ws.inbox) for ws in self.sockets)


@contextlib.asynccontextmanager
async def _path(conns: int, per_tick: int) -> AsyncIterator[InlinePath]:
    """A runtime with ``conns`` connections, the workers' GC settings while it runs."""
    settings = Settings.from_env({"JWT_SECRET": "b" * 40, "RATE_LIMIT": "1000000/second"})
    rt = Runtime.build(settings)
    await rt.start()
    thresholds = gc.get_threshold()
    try:
        sockets = [await _connect(rt, settings, f"u{i}") for i in range(conns)]
        await asyncio.sleep(0.05)  # the welcomes out
        path = InlinePath(rt, sockets, per_tick)
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        yield path
    finally:
        gc.unfreeze()  # as it was: main() may run inside another program (the tests)
        gc.set_threshold(*thresholds)
        await rt.close()


async def measure(conns: int, per_tick: int, seconds: float, repeat: int,
                  warmup: float) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with _path(conns, per_tick) as path:
        await path.run_for(warmup)
        for _ in range(repeat):
            b0, c0 = path.written(), time.process_time()
            n = await path.run_for(seconds)
            cpu = time.process_time() - c0
            out.append({"conns": conns, "per_tick": per_tick, "messages": n,
                        "ns_per_msg": round(1e9 * cpu / n),
                        "bytes_out_per_msg": round((path.written() - b0) / n, 1),
                        "queued": path.queued()})
            print(json.dumps(out[-1]), flush=True)
    return out


def _admit_all(user: str) -> None:
    return None


# ``--costs``: the parts of the path left out one at a time.  Each returns whether the
# frames carry an ``id`` (an ack is written) and an undo.
def _part_none(path: InlinePath) -> tuple[bool, Callable[[], None]]:
    return True, lambda: None


def _part_limiter(path: InlinePath) -> tuple[bool, Callable[[], None]]:
    """The limiter admits without counting (an instance attribute shadows ``admit``)."""
    limiter = path.rt.router.limiter
    limiter.admit = _admit_all  # type: ignore[method-assign]
    return True, lambda: delattr(limiter, "admit")


def _part_ack(path: InlinePath) -> tuple[bool, Callable[[], None]]:
    """Messages without an ``id``: no ack encoded, queued or written (PROTOCOL.md §3)."""
    return False, lambda: None


def _part_stats(path: InlinePath) -> tuple[bool, Callable[[], None]]:
    """The router's counters (Prometheus) replaced by ones that count nothing."""
    router = path.rt.router
    stats, router.stats = router.stats, NullStats()
    return True, lambda: setattr(router, "stats", stats)


def _part_liveness(path: InlinePath) -> tuple[bool, Callable[[], None]]:
    """The recipient's devices read from the presence table without the check that each
    one's worker is alive (every device is, here)."""
    presence = path.rt.hub.presence
    devices = presence.cluster.devices  # type: ignore[attr-defined]  # the memory twin's
    none: dict[str, Location] = {}

    def locate_now(user: str) -> dict[str, Location]:
        return devices.get(user, none)

    presence.locate_now = locate_now  # type: ignore[method-assign]
    return True, lambda: delattr(presence, "locate_now")


PARTS: dict[str, Callable[[InlinePath], tuple[bool, Callable[[], None]]]] = {
    "full": _part_none, "limiter": _part_limiter, "ack": _part_ack, "stats": _part_stats,
    "liveness": _part_liveness,
}


@contextlib.contextmanager
def _without(path: InlinePath, part: str) -> Iterator[bool]:
    """``part`` left out of the path (``full``: nothing) while the block runs; yields
    whether the frames carry an ``id``."""
    with_id, undo = PARTS[part](path)
    try:
        yield with_id
    finally:
        undo()


async def measure_costs(conns: int, per_tick: int, seconds: float, repeat: int,
                        warmup: float) -> dict[str, Any]:
    """What each part costs per message: rounds alternate between the whole path and the
    path without one part (the order reversed every other round), in one process, so the
    differences are taken on the same heap in the same minute (the machine's drift, tens
    of percent between runs of the suite, is common to all of them).  A part's cost is the
    median of the whole path's rounds minus the median of the rounds without it."""
    ns: dict[str, list[float]] = {name: [] for name in PARTS}
    async with _path(conns, per_tick) as path:
        for name in PARTS:  # warm every variant's code
            with _without(path, name) as with_id:
                await path.run_for(warmup / len(PARTS), with_id)
        for r in range(repeat):
            names = list(PARTS) if r % 2 == 0 else list(reversed(PARTS))
            for name in names:
                with _without(path, name) as with_id:
                    c0 = time.process_time()
                    n = await path.run_for(seconds, with_id)
                    ns[name].append(1e9 * (time.process_time() - c0) / n)
        queued = path.queued()
    medians = {name: round(statistics.median(v)) for name, v in ns.items()}
    out = {"conns": conns, "per_tick": per_tick, "rounds": repeat,
           "ns_per_msg": medians,
           "cost_ns": {name: medians["full"] - medians[name] for name in PARTS
                       if name != "full"},
           "runs": {name: [round(x) for x in v] for name, v in ns.items()},
           "queued": queued}
    return out


# ``--counts``: the same path, counted by valgrind's cachegrind instead of timed.
VIRTUAL_STEP = 20e-6  # the limiter's clock advances this much per message (50,000 msg/s)
WARM_PASSES = 2
# cache geometry for the count (this machine's cores: 32 KiB L1d, 512 KiB L2), fixed so
# that counts from any host compare; the "L2" misses are what goes to the shared L3
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64")


async def run_fixed(conns: int, per_tick: int, passes: int, part: str) -> int:
    """``--fixed``: two warm passes, then ``part``'s path for exactly ``passes`` passes, on
    a virtual clock for the limiter (under valgrind the real one runs ~50x slow, and the
    limiter's work per message depends on how many messages share a millisecond)."""
    async with _path(conns, per_tick) as path:
        clock = itertools.count(0.0, VIRTUAL_STEP).__next__
        path.rt.router.limiter._clock = clock  # type: ignore[attr-defined]  # the memory twin's
        # connecting thousands under valgrind can outlast the worker's liveness: renewed
        # here, as the heartbeat does, or every recipient would look dead (not inline)
        await path.rt.hub.beat()
        await path.run_passes(WARM_PASSES)
        with _without(path, part) as with_id:
            n = await path.run_passes(passes, with_id)
        if path.queued():
            raise SystemExit("a frame left the inline path")
    return n


def _cachegrind(conns: int, per_tick: int, passes: int, part: str,
                out: Path) -> subprocess.Popen[bytes]:
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", *CACHES,
           f"--cachegrind-out-file={out}", sys.executable, str(Path(__file__).resolve()),
           "--no-pin", "--conns", str(conns), "--per-tick", str(per_tick),
           "--fixed", str(passes), "--part", part]
    # one hash seed: dict and set layouts, and so the counts, repeat run to run
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _summary(out: Path) -> dict[str, int]:
    """Cachegrind's totals: ``events:`` names them, ``summary:`` holds them."""
    names: list[str] = []
    values: list[int] = []
    for line in out.read_text().splitlines():
        if line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("summary:"):
            values = [int(v) for v in line.split()[1:]]
    totals = dict(zip(names, values, strict=True))
    return {"instructions": totals["Ir"],
            "d1_misses": totals["D1mr"] + totals["D1mw"],
            "l2_misses": totals["DLmr"] + totals["DLmw"]}


def measure_counts(conns: int, per_tick: int, passes: int, parts: list[str],
                   workdir: Path, jobs: int = 2) -> dict[str, Any]:
    """Per message, for each part's path (``full``: the whole one): instructions, L1d
    misses and L2 misses (cachegrind's model, ``CACHES``), as the difference between a run
    of ``passes`` passes and one of none (the setup and the warm passes cancel).  The same
    code gives the same instructions within 0.1 % run to run, where timings on this
    machine drift by tens of percent: the instrument for changes of a few percent.  The
    L2 count moves by ~5 % with any change of allocation order: read only more than that."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--counts needs valgrind (apt-get install valgrind)")
    todo = [("base", 0, "full")] + [(part, passes, part) for part in parts]
    done: dict[str, dict[str, int]] = {}
    while todo:
        batch, todo = todo[:jobs], todo[jobs:]
        # ``<name>.out`` and ``<name>.log``: each run its own pair
        procs = [(name, workdir / f"{name}.out",
                  _cachegrind(conns, per_tick, n, part, workdir / f"{name}.out"))
                 for name, n, part in batch]
        for name, out, proc in procs:
            if proc.wait() != 0:
                tail = out.with_suffix(".log").read_text(errors="replace")[-1500:]
                raise SystemExit(f"valgrind run {name!r} failed (exit {proc.returncode}):\n"
                                 f"{tail}")
            done[name] = _summary(out)
    messages = passes * conns
    per_msg = {part: {k: round((done[part][k] - done["base"][k]) / messages, 1)
                      for k in done["base"]} for part in parts}
    result: dict[str, Any] = {"conns": conns, "per_tick": per_tick, "messages": messages,
                              "caches": list(CACHES), "per_msg": per_msg}
    if "full" in per_msg:
        result["cost"] = {part: {k: round(per_msg["full"][k] - v[k], 1) for k in v}
                          for part, v in per_msg.items() if part != "full"}
    return result


def _timed(args: argparse.Namespace) -> dict[str, Any]:
    """The timed figures (``--costs`` or plain), pinned to core 1 unless ``--no-pin``."""
    import uvloop

    mask = os.sched_getaffinity(0)
    try:
        if not args.no_pin and cpu_count() >= 2:
            os.sched_setaffinity(0, {1})
        if args.costs:
            return uvloop.run(measure_costs(args.conns, args.per_tick, args.seconds,
                                            args.repeat, args.warmup))
        runs = uvloop.run(measure(args.conns, args.per_tick, args.seconds, args.repeat,
                                  args.warmup))
        return {"conns": args.conns, "per_tick": args.per_tick, "runs": runs,
                "median_ns_per_msg": statistics.median(r["ns_per_msg"] for r in runs)}
    finally:
        os.sched_setaffinity(0, mask)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=2000, help="connections (pairs: even)")
    ap.add_argument("--per-tick", type=int, default=200, help="frames per loop tick")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    ap.add_argument("--costs", action="store_true",
                    help="what the limiter, the ack, the counters and the liveness check each "
                    "cost per message: "
                    "rounds of --seconds alternate between the whole path and the path "
                    "without one of them, --repeat rounds of each")
    ap.add_argument("--counts", action="store_true",
                    help="count instructions and cache misses per message under valgrind "
                    "(cachegrind) instead of timing: the whole path and, with --costs, the "
                    "path without each part")
    ap.add_argument("--passes", type=int, default=10,
                    help="--counts: passes over every connection counted")
    ap.add_argument("--fixed", type=int, metavar="PASSES", help=argparse.SUPPRESS)
    ap.add_argument("--part", default="full", choices=list(PARTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.conns < 2 or args.conns % 2:
        ap.error("--conns must be even (connections talk in pairs)")
    import uvloop

    if args.fixed is not None:  # one of --counts' runs, under valgrind
        uvloop.run(run_fixed(args.conns, args.per_tick, args.fixed, args.part))
        return 0
    if args.counts:
        parts = list(PARTS) if args.costs else ["full"]
        with tempfile.TemporaryDirectory() as tmp:
            summary = measure_counts(args.conns, args.per_tick, args.passes, parts, Path(tmp))
    else:
        summary = _timed(args)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
