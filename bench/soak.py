"""Soak test: N websocket clients for M minutes against a private two-instance cluster.

    python -m bench.soak --clients 200 --minutes 2 [--instances 2] [--json out.json]
    .venv/bin/python bench/soak.py --clients 20 --minutes 0.25

It starts its own ``redis-server`` (a free port, no persistence) and ``--instances`` server
processes on it (``sanic service.app``, ``--workers`` each, ``RATE_LIMIT`` out of the way),
then runs the clients on one asyncio loop.  Each client is one device of a user
(``--devices-per-user`` devices per user, default 2) and, while connected, sends offers,
answers, candidates and byes with an ``id`` at random times (``--rate`` per second) to a
random connected peer of another user: mostly to one device (``to_device``), sometimes to
the whole user (every online device).  Clients disconnect (clean close, 1000) after a random
time (mean ``--session-s``) and come back after up to ``--offline-s`` seconds to a random
instance.  Every payload carries a unique message id, the sending connection and a
per-connection sequence number, which is how deliveries are matched and ordered.

Accounting (what "lost" means)
------------------------------
* ``ack devices=k`` means k deliveries are expected; an ``error`` (``peer_offline`` is
  normal when the addressed device is just going away) means none are expected.
* A recipient must be connected when the message should arrive, so a client that leaves
  does it in this order: (1) it leaves the roster — no new message picks it, and no
  whole-user message goes to its user while it leaves; (2) it stops sending and waits for
  the answers (ack or error) to all of its own messages; (3) it waits until every message
  addressed to it — to its device, or to its whole user — is answered and, if acked, has
  arrived (at most ``--settle`` seconds); (4) it closes cleanly; its user stays out of
  whole-user messages for 1 s more, so the server has removed its presence.  Every message
  acked before then that did not arrive is lost: the server acknowledged a delivery that
  did not happen (or took longer than ``--settle``).
* At the end, sending stops, every message is given ``--settle`` seconds more, then all
  clients close.
* ``delivered`` counts distinct (message, device) arrivals of acked messages;
  ``lost = expected_deliveries - delivered``; ``duplicates`` counts a message arriving twice
  at the same device; ``unexpected`` counts arrivals of messages refused with an error, or at
  more devices than acked; ``out_of_order`` counts arrivals whose sequence number is lower
  than an earlier one from the same sending connection at the same device (§3 promises
  per-sender order); ``unanswered`` counts messages that got neither ack nor error.
* The exit status is non-zero when any of lost, duplicates, unexpected, out_of_order or
  unanswered is non-zero, or a client's connection was refused or closed by the server, or
  (with ``--max-growth-mb``) the servers' RSS grew by more than that.

RSS is the sum of ``VmRSS`` over each server process and all its descendants (Sanic's
worker processes), read from ``/proc``: ``rss_before_kb`` once the cluster is ready and
idle, ``rss_after_kb`` after every client has gone and the servers had 2 s to settle;
``rss_warm_kb`` after the first tenth of the run (warm-up) and ``rss_max_kb`` the largest
sample, to tell allocation during warm-up from growth over time; ``rss_series_kb`` every
sample (every 5 s) and ``growth_last_third_kb`` the growth over the last third of the
client phase, which is about zero once the servers have levelled off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/soak.py
    sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from tests.support import (  # noqa: E402
    RedisServer,
    ServerProcess,
    server_env,
    start_redis,
    start_server,
    token,
)

RESULTS = ROOT / "bench" / "results"
DIRECT_TYPES = ("offer", "answer", "candidate", "bye")
QUARANTINE_S = 1.0  # after a clean close, no whole-user messages to that user for this long
MAX_IN_FLIGHT = 16  # unanswered messages per client before it skips a beat


@dataclass
class SoakConfig:
    clients: int = 50
    minutes: float = 1.0
    instances: int = 2
    workers: int = 1
    rate: float = 1.0  # messages per second per connected client
    session_s: float = 10.0  # mean connected time before a clean disconnect
    offline_s: float = 2.0  # longest time offline before reconnecting
    devices_per_user: int = 2
    user_share: float = 0.25  # messages addressed to a whole user rather than one device
    payload_max: int = 2000
    settle: float = 5.0
    seed: int | None = None
    max_growth_mb: float | None = None  # fail when the servers' RSS grew by more
    json_path: str | None = None
    quiet: bool = False


@dataclass
class Msg:
    id: str
    sender: tuple[str, str]
    to_user: str
    to_device: str | None
    sent_at: float
    answer: str | None = None  # "ack" or the error code
    devices: int = 0  # acked devices
    answered_at: float | None = None
    arrived: set[str] = field(default_factory=set)  # devices it reached

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.to_user, self.to_device)

    def settled(self) -> bool:
        if self.answer is None:
            return False
        return self.answer != "ack" or len(self.arrived) >= self.devices


@dataclass
class Tally:
    sent: int = 0
    sent_acked: int = 0
    expected_deliveries: int = 0
    delivered: int = 0
    duplicates: int = 0
    unexpected: int = 0
    out_of_order: int = 0
    unanswered: int = 0
    connects: int = 0
    disconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ack_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)


class Soak:
    """The clients, the roster of connected devices and the ledger of messages."""

    def __init__(self, cfg: SoakConfig, servers: list[ServerProcess]) -> None:
        self.cfg = cfg
        self.servers = servers
        self.rng = random.Random(cfg.seed)
        self.tally = Tally()
        self.msgs: dict[str, Msg] = {}
        # unsettled messages per target: (user, device) for to_device, (user, None) for a user
        self.open: dict[tuple[str, str | None], set[str]] = defaultdict(set)
        self.roster: dict[tuple[str, str], Client] = {}  # connected and not leaving
        self.roster_list: list[tuple[str, str]] = []
        self.no_user_msgs: Counter[str] = Counter()  # users with a device leaving
        self.stopping = asyncio.Event()
        self.changed = asyncio.Event()  # something settled: leavers re-check
        self.ttl = int(min(3600, max(600, cfg.minutes * 60 + 300)))

    # -- roster

    def join(self, client: Client) -> None:
        self.roster[client.ident] = client
        self.roster_list.append(client.ident)

    def leave(self, client: Client) -> None:
        if self.roster.pop(client.ident, None) is not None:
            self.roster_list.remove(client.ident)

    def pick(self, me: Client) -> tuple[str, str | None] | None:
        for _ in range(4):
            if not self.roster_list:
                return None
            user, device = self.rng.choice(self.roster_list)
            if user == me.user:
                continue
            if self.rng.random() < self.cfg.user_share and not self.no_user_msgs[user]:
                return (user, None)
            return (user, device)
        return None

    # -- ledger

    def register(self, msg: Msg) -> None:
        self.msgs[msg.id] = msg
        self.open[msg.key].add(msg.id)
        self.tally.sent += 1

    def _maybe_settle(self, msg: Msg) -> None:
        if msg.settled():
            self.open[msg.key].discard(msg.id)
            self.changed.set()

    def answered(self, msg_id: str, answer: str, devices: int = 0) -> None:
        msg = self.msgs.get(msg_id)
        if msg is None or msg.answer is not None:
            self.tally.errors["stray_answer"] += 1
            return
        msg.answer, msg.devices = answer, devices
        msg.answered_at = time.monotonic()
        if answer == "ack":
            self.tally.ack_ms.append((msg.answered_at - msg.sent_at) * 1000)
        self._maybe_settle(msg)

    def arrived(self, msg_id: str, device: str) -> None:
        msg = self.msgs.get(msg_id)
        if msg is None:
            self.tally.errors["stray_delivery"] += 1
            return
        if device in msg.arrived:
            self.tally.duplicates += 1
            return
        msg.arrived.add(device)
        self.tally.delivery_ms.append((time.monotonic() - msg.sent_at) * 1000)
        self._maybe_settle(msg)

    def unsettled(self, user: str, device: str) -> int:
        return len(self.open[(user, device)]) + len(self.open[(user, None)])

    async def wait_settled(self, check: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.25))
        return True

    # -- results

    def account(self) -> None:
        t = self.tally
        for msg in self.msgs.values():
            if msg.answer is None:
                t.unanswered += 1
            elif msg.answer == "ack":
                t.sent_acked += 1
                t.expected_deliveries += msg.devices
                t.delivered += min(len(msg.arrived), msg.devices)
                t.unexpected += max(0, len(msg.arrived) - msg.devices)
            else:
                t.unexpected += len(msg.arrived)


class Client:
    """One device: connects, sends, reads, leaves and comes back until the soak stops."""

    def __init__(self, soak: Soak, user: str, device: str) -> None:
        self.soak = soak
        self.user = user
        self.device = device
        self.ident = (user, device)
        self.sessions = 0
        self.ws: Any = None
        self.in_flight: set[str] = set()
        self.closing = False  # this side is closing the current connection
        self.last_seq: dict[str, int] = {}  # sending connection -> last seq seen here

    async def run(self) -> None:
        soak = self.soak
        rng = soak.rng
        # spread the first connects over the first second
        await asyncio.sleep(rng.random())
        while not soak.stopping.is_set():
            server = rng.choice(soak.servers)
            if not await self._session(server):
                await asyncio.sleep(0.5)  # refused: back off a little
            if soak.stopping.is_set():
                break
            await _sleep_or_stop(soak.stopping, rng.uniform(0.1, soak.cfg.offline_s))

    async def _session(self, server: ServerProcess) -> bool:
        soak = self.soak
        self.sessions += 1
        conn = f"{self.user}.{self.device}.{self.sessions}"
        url = f"{server.ws_url}?token={token(self.user, self.device, ttl=soak.ttl)}"
        try:
            self.ws = await websockets.connect(url, open_timeout=10, max_size=2**20)
        except InvalidStatus as exc:
            soak.tally.errors[f"connect_{exc.response.status_code}"] += 1
            return False
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            soak.tally.errors[f"connect_{type(exc).__name__}"] += 1
            return False
        ws = self.ws
        self.closing = False
        soak.tally.connects += 1
        welcomed = asyncio.Event()
        reader = asyncio.create_task(self._read(ws, welcomed))
        waiter = asyncio.create_task(welcomed.wait())
        await asyncio.wait({waiter, reader}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not welcomed.is_set():
            soak.tally.errors["no_welcome"] += 1
            self.closing = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
            reader.cancel()
            return False
        soak.join(self)
        leave_at = time.monotonic() + soak.rng.expovariate(1 / soak.cfg.session_s)
        sender = asyncio.create_task(self._send(ws, conn, leave_at))
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        if reader in done:  # the server closed on us
            soak.leave(self)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            return True
        await self._leave(ws, reader)
        return True

    async def _send(self, ws: Any, conn: str, leave_at: float) -> None:
        soak, rng, cfg = self.soak, self.soak.rng, self.soak.cfg
        seq = 0
        while not soak.stopping.is_set() and time.monotonic() < leave_at:
            pause = min(rng.expovariate(cfg.rate), leave_at - time.monotonic())
            if await _sleep_or_stop(soak.stopping, max(pause, 0.0)):
                return
            if time.monotonic() >= leave_at or len(self.in_flight) >= MAX_IN_FLIGHT:
                continue
            target = soak.pick(self)
            if target is None:
                continue
            seq += 1
            msg = Msg(f"{conn}.{seq}", self.ident, target[0], target[1], time.monotonic())
            body: dict[str, Any] = {
                "type": rng.choice(DIRECT_TYPES),
                "to": target[0],
                "id": msg.id,
                "payload": {"mid": msg.id, "conn": conn, "seq": seq,
                            "pad": "p" * rng.randint(0, cfg.payload_max)},
            }
            if target[1] is not None:
                body["to_device"] = target[1]
            soak.register(msg)
            self.in_flight.add(msg.id)
            try:
                await ws.send(json.dumps(body))
            except ConnectionClosed:
                return  # the reader sees the close

    async def _read(self, ws: Any, welcomed: asyncio.Event) -> None:
        soak = self.soak
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind in DIRECT_TYPES:
                    payload = frame.get("payload")
                    if not isinstance(payload, dict) or "mid" not in payload:
                        soak.tally.errors["foreign_payload"] += 1
                        continue
                    last = self.last_seq.get(payload["conn"], 0)
                    if payload["seq"] < last:
                        soak.tally.out_of_order += 1
                    self.last_seq[payload["conn"]] = max(last, payload["seq"])
                    soak.arrived(payload["mid"], self.device)
                elif kind == "ack":
                    self.in_flight.discard(frame["id"])
                    soak.answered(frame["id"], "ack", int(frame["devices"]))
                elif kind == "error":
                    code = str(frame.get("code"))
                    soak.tally.errors[code] += 1
                    if "id" in frame:
                        self.in_flight.discard(frame["id"])
                        soak.answered(frame["id"], code)
                elif kind == "welcome":
                    welcomed.set()
                else:
                    soak.tally.errors[f"frame_{kind}"] += 1
        except ConnectionClosed:
            pass
        if not self.closing or ws.close_code not in (1000, 1001):
            soak.tally.errors[f"closed_by_server_{ws.close_code}"] += 1

    async def _leave(self, ws: Any, reader: asyncio.Task[None]) -> None:
        """The orderly goodbye of the module docstring."""
        soak = self.soak
        soak.leave(self)
        soak.no_user_msgs[self.user] += 1
        try:
            await soak.wait_settled(lambda: not self.in_flight, 10)
            await soak.wait_settled(
                lambda: not soak.unsettled(self.user, self.device), soak.cfg.settle
            )
            self.closing = True
            soak.tally.disconnects += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader, 5)
            await asyncio.sleep(QUARANTINE_S)
        finally:
            soak.no_user_msgs[self.user] -= 1


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True when ``stop`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# ---------------------------------------------------------------------- processes


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cluster_rss(servers: list[ServerProcess]) -> int:
    return sum(rss_kb(process_tree(s.proc.pid)) for s in servers)


def rss_by_process(servers: list[ServerProcess]) -> dict[str, int]:
    """``"<instance>/<pid>": VmRSS kB`` for every process of every instance (the first of
    each instance is Sanic's main process; then its helpers and workers)."""
    return {f"{n}/{pid}": rss_kb([pid])
            for n, s in enumerate(servers) for pid in process_tree(s.proc.pid)}


def start_cluster(cfg: SoakConfig) -> tuple[RedisServer, list[ServerProcess]]:
    redis = start_redis()
    env = server_env(redis.url, RATE_LIMIT="100000/second", MAX_DEVICES_PER_USER="10",
                     DRAIN_SECONDS="1")
    servers: list[ServerProcess] = []
    try:
        with ThreadPoolExecutor(cfg.instances) as pool:
            futures = [pool.submit(start_server, env, workers=cfg.workers)
                       for _ in range(cfg.instances)]
            for fut in futures:
                servers.append(fut.result())
    except BaseException:
        for s in servers:
            s.stop(signal.SIGKILL)
        redis.stop()
        raise
    return redis, servers


def stop_cluster(redis: RedisServer, servers: list[ServerProcess]) -> None:
    with ThreadPoolExecutor(max(1, len(servers))) as pool:
        list(pool.map(lambda s: s.stop(), servers))
    redis.stop()


# ---------------------------------------------------------------------- the run


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def _last_third_growth(series: list[tuple[float, int]]) -> int | None:
    if len(series) < 3:
        return None
    end_t, end_kb = series[-1]
    _, mark_kb = min(series, key=lambda p: abs(p[0] - end_t * 2 / 3))
    return end_kb - mark_kb


async def _run(cfg: SoakConfig, servers: list[ServerProcess]) -> dict[str, Any]:
    soak = Soak(cfg, servers)
    users = (cfg.clients + cfg.devices_per_user - 1) // cfg.devices_per_user
    tag = f"soak{os.getpid()}"
    clients = [
        Client(soak, f"{tag}-u{i // cfg.devices_per_user}", f"d{i % cfg.devices_per_user}")
        for i in range(cfg.clients)
    ]
    assert users >= 2, "need at least two users"
    log = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr))

    rss_before = cluster_rss(servers)
    by_process_before = rss_by_process(servers)
    rss_samples = [rss_before]
    rss_series: list[tuple[float, int]] = [(0.0, rss_before)]  # (seconds into the run, kB)
    rss_warm: int | None = None
    duration = cfg.minutes * 60
    started = time.monotonic()
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        while (elapsed := time.monotonic() - started) < duration:
            await asyncio.sleep(min(5.0, duration - elapsed))
            rss_samples.append(cluster_rss(servers))
            rss_series.append((round(time.monotonic() - started, 1), rss_samples[-1]))
            if rss_warm is None and time.monotonic() - started >= duration / 10:
                rss_warm = rss_samples[-1]
            t = soak.tally
            log(f"[soak] {time.monotonic() - started:6.1f}s connected={len(soak.roster)} "
                f"sent={t.sent} delivered={sum(len(m.arrived) for m in soak.msgs.values())} "
                f"errors={dict(t.errors)} rss={rss_samples[-1]}kB")
            for s in servers:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"a server exited with {s.proc.returncode}")
        # senders stop; every client leaves the orderly way (its messages settle first)
        soak.stopping.set()
        _, pending = await asyncio.wait(tasks, timeout=cfg.settle + 30)
        if pending:
            soak.tally.errors["shutdown_timeout"] += len(pending)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                soak.tally.errors[f"client_{type(task.exception()).__name__}"] += 1
    finally:
        for task in tasks:
            task.cancel()
    run_s = time.monotonic() - started
    await asyncio.sleep(2.0)
    rss_after = cluster_rss(servers)
    rss_samples.append(rss_after)
    by_process_after = rss_by_process(servers)

    soak.account()
    t = soak.tally
    lost = t.expected_deliveries - t.delivered
    refused = sum(n for k, n in t.errors.items()
                  if k.startswith(("connect_", "closed_by_server_", "no_welcome")))
    result: dict[str, Any] = {
        "clients": cfg.clients,
        "minutes": cfg.minutes,
        "instances": cfg.instances,
        "workers": cfg.workers,
        "rate_per_client": cfg.rate,
        "duration_s": round(run_s, 1),
        "connects": t.connects,
        "disconnects": t.disconnects,
        "sent": t.sent,
        "sent_acked": t.sent_acked,
        "expected_deliveries": t.expected_deliveries,
        "delivered": t.delivered,
        "lost": lost,
        "duplicates": t.duplicates,
        "unexpected": t.unexpected,
        "out_of_order": t.out_of_order,
        "unanswered": t.unanswered,
        "errors": dict(sorted(t.errors.items())),
        "ack_ms": {"p50": _pct(t.ack_ms, 0.5), "p99": _pct(t.ack_ms, 0.99),
                   "max": _pct(t.ack_ms, 1.0)},
        "delivery_ms": {"p50": _pct(t.delivery_ms, 0.5), "p99": _pct(t.delivery_ms, 0.99),
                        "max": _pct(t.delivery_ms, 1.0)},
        "rss_before_kb": rss_before,
        "rss_warm_kb": rss_warm if rss_warm is not None else rss_samples[-1],
        "rss_max_kb": max(rss_samples),
        "rss_after_kb": rss_after,
        "growth_kb": rss_after - rss_before,
        "growth_since_warm_kb": rss_after - (rss_warm if rss_warm is not None else rss_after),
        "rss_median_kb": int(statistics.median(rss_samples)),
        # under load: the last sample minus the one nearest 2/3 of the run; a plateau gives ~0
        "growth_last_third_kb": _last_third_growth(rss_series),
        "rss_series_kb": rss_series,
        "rss_by_process_kb": {
            key: {"before": by_process_before.get(key), "after": by_process_after.get(key)}
            for key in sorted(set(by_process_before) | set(by_process_after))
        },
    }
    too_big = cfg.max_growth_mb is not None and rss_after - rss_before > cfg.max_growth_mb * 1024
    result["passed"] = not (lost or t.duplicates or t.unexpected or t.out_of_order
                            or t.unanswered or refused or too_big)
    return result


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Start the cluster, run the soak, stop everything; the summary (also written as JSON)."""
    redis, servers = start_cluster(cfg)
    try:
        time.sleep(1.0)  # let the workers finish starting before the RSS baseline
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            result = asyncio.run(_run(cfg, servers))
        else:
            result = uvloop.run(_run(cfg, servers))
    finally:
        logs = [str(s.log_path) for s in servers]
        stop_cluster(redis, servers)
    result["server_logs"] = logs
    result["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("json_path", "quiet")}
    path = Path(cfg.json_path) if cfg.json_path else (
        RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(path)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50, help="websocket clients (devices)")
    p.add_argument("--minutes", type=float, default=1.0, help="run time (fractions allowed)")
    p.add_argument("--instances", type=int, default=2, help="server instances (default 2)")
    p.add_argument("--workers", type=int, default=1, help="Sanic workers per instance")
    p.add_argument("--rate", type=float, default=1.0, help="messages/s per connected client")
    p.add_argument("--session-s", type=float, default=10.0, help="mean connected time (s)")
    p.add_argument("--offline-s", type=float, default=2.0, help="longest offline time (s)")
    p.add_argument("--devices-per-user", type=int, default=2)
    p.add_argument("--user-share", type=float, default=0.25,
                   help="share of messages addressed to a whole user")
    p.add_argument("--payload-max", type=int, default=2000, help="largest padding (bytes)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds a leaving client waits for what was sent to it")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-growth-mb", type=float, default=None,
                   help="also fail when the servers' RSS grew by more than this (MB)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="where to write the summary (default bench/results/soak-<time>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.clients < 2 * args.devices_per_user:
        p.error("--clients must cover at least two users")
    cfg = SoakConfig(**vars(args))
    result = run_soak(cfg)
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
