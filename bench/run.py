"""The benchmark suite: our server against PeerJS and socket.io, same harness, same run.

    .venv/bin/python -m bench.run              # the full suite (~15 min)
    .venv/bin/python -m bench.run --quick      # a short run (~3 min)
    .venv/bin/python -m bench.run --100k       # scenario 5 only: hold 100,000 connections
    .venv/bin/python -m bench.run --only relay --servers signaling-memory --conns 100
    .venv/bin/python -m bench.run --only cross --conns 2000 --repeat 5   # medians of 5

Scenarios (bench/README.md has the details):

1. ``relay`` — relay throughput through one instance (one worker): ours on the in-process
   backplane and on Redis, PeerJS; closed loop.
2. ``cross`` — the same across two instances on one Redis: ours (two server processes) and
   socket.io with ``@socket.io/redis-streams-adapter``; each pair spans both instances.
3. ``latency`` — fixed offered rates across two instances: one-way p50/p99/p99.9 and loss.
4. ``idle`` — idle memory per connection (and idle CPU) at 10,000 connections, taken from the
   10,000-connection runs of 1 and 2 before any message is sent.
5. ``100k`` — hold 100,000 connections (our server, several workers, Redis).

Results go to ``bench/results/<timestamp>/`` (``results.json``, ``results.md``,
``throughput.png``, ``latency.png``); the Markdown is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/run.py
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.loadgen import LoadGen  # noqa: E402
from bench.procstat import Group, core_speed_ns, cpu_count, open_fds  # noqa: E402
from bench.servers import (  # noqa: E402
    Servers,
    commands_delta,
    npm_install,
    secret,
    start_floor,
    start_peerjs,
    start_signaling,
    start_socketio,
)

RESULTS = ROOT / "bench" / "results"
SERVER_CPUS = {0}  # servers and redis-server ("servers pinned to one core")
GEN_CPUS = {1}  # the generator processes

# label -> (protocol, starter(cpus) -> Servers)
Starter = Callable[[set[int] | None], Servers]
SINGLE: dict[str, tuple[str, Starter]] = {
    "signaling-memory": ("signaling", lambda c: start_signaling(redis=False, cpus=c)),
    "signaling-redis": ("signaling", lambda c: start_signaling(redis=True, cpus=c)),
    "peerjs": ("peerjs", lambda c: start_peerjs(cpus=c)),
}
CROSS: dict[str, tuple[str, Starter]] = {
    "signaling-redis-x2": (
        "signaling", lambda c: start_signaling(redis=True, instances=2, cpus=c)),
    "socketio-redis-x2": ("socketio", lambda c: start_socketio(instances=2, cpus=c)),
}
ALT_PYTHON: list[str] = []  # --alt-python


def _start_alt(cpus: set[int] | None) -> Servers:
    if not ALT_PYTHON:
        raise RuntimeError("signaling-memory-alt needs --alt-python PATH")
    return start_signaling(redis=False, cpus=cpus, python=ALT_PYTHON[0])


# Run only when named in --servers: our server with messages that carry no ``id``, so no
# ack is sent (PROTOCOL.md §3), which is what the peers do for every message.  Not what the
# targets are measured on (acks on); it shows what the acks cost.
NOACK_SINGLE: dict[str, tuple[str, Starter]] = {
    "signaling-memory-noack": ("signaling-noack", SINGLE["signaling-memory"][1]),
    # bench/floor.py: the least a Python relay on uvloop does per message (PeerJS wire)
    "python-floor": ("peerjs", lambda c: start_floor(cpus=c)),
    # signaling-memory on another interpreter (--alt-python), e.g. one built with PGO and
    # LTO as the image's is, beside the same code on this one (acks on, as measured)
    "signaling-memory-alt": ("signaling", _start_alt),
}
NOACK_CROSS: dict[str, tuple[str, Starter]] = {
    "signaling-redis-x2-noack": ("signaling-noack", CROSS["signaling-redis-x2"][1]),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                                  cwd=ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    import resource

    try:
        import picows

        picows_v = getattr(picows, "__version__", "?")
    except ImportError:
        picows_v = None
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "python": platform.python_version(),
        "picows": picows_v,
        "node": out(["node", "--version"]),
        "redis": out(["redis-server", "--version"]),
        "git_commit": out(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(out(["git", "status", "--porcelain", "--", "service"])),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pin = not args.no_pin and cpu_count() >= 2
        self.server_cpus = SERVER_CPUS if self.pin else None
        self.gen_cpus = GEN_CPUS if self.pin else None
        self.rows: list[dict[str, Any]] = []

    # -- one run

    def one(
        self,
        scenario: str,
        label: str,
        proto: str,
        starter: Starter,
        conns: int,
        *,
        mode: str = "closed",
        rate: float = 0.0,
        idle_s: float = 0.0,
        procs: int | None = None,
        repeat: int = 0,
    ) -> dict[str, Any]:
        a = self.args
        window = a.window or (4 if conns <= 100 else 2 if conns <= 1000 else 1)
        row: dict[str, Any] = {
            "scenario": scenario, "server": label, "protocol": proto, "connections": conns,
            "mode": mode, "window": window if mode == "closed" else None,
            "offered_rate": rate if mode == "rate" else None,
            "duration_s": a.duration, "warmup_s": a.warmup, "pinned": self.pin,
            "repeat": repeat,
        }
        log(f"{scenario}: {label}, {conns} connections, {mode}"
            + (f" {rate:g} msg/s" if mode == "rate" else f" window {window}")
            + (f", run {repeat + 1}/{a.repeat}" if a.repeat > 1 else ""))
        srv = starter(self.server_cpus)
        gen: LoadGen | None = None
        try:
            row["instances"] = len(srv.targets)
            server = Group(srv.server_pids)
            redis = Group(srv.redis_pids)
            both = Group(srv.server_pids + srv.redis_pids)
            time.sleep(1.0)
            rss0 = server.rss_kb()
            row["rss_before_kb"] = rss0
            row["redis_rss_before_kb"] = redis.rss_kb()
            gen = LoadGen(proto, srv.targets, conns, procs=procs, cpus=self.gen_cpus,
                          secret=secret())
            gen.start()
            c = gen.connect()
            row.update(connected=c["connected"], connect_failed=c["failed"],
                       connect_s=round(c["seconds"], 2), connect_errors=c["connect_errors"])
            if c["failed"]:
                log(f"  {c['failed']} connections failed: {c['connect_errors']}")
            time.sleep(2.0)
            rss1 = server.rss_kb()
            row["rss_idle_kb"] = rss1
            row["redis_rss_idle_kb"] = redis.rss_kb()
            row["rss_per_conn_kb"] = round((rss1 - rss0) / max(1, c["connected"]), 2)
            if idle_s:
                b = both.cpu()
                time.sleep(idle_s)
                row["idle_cpu_pct"] = round(100 * Group.cpu_delta(b, both.cpu()) / idle_s, 1)
            genp = Group(gen.pids)
            marks: dict[str, Any] = {}

            def on_window(edge: str) -> None:
                marks[edge] = (server.cpu(), redis.cpu(), genp.cpu(), time.monotonic(),
                               server.io())
                # after the CPU marks: the INFO round trip is not the window's CPU
                marks[edge + "_redis"] = srv.redis_commands()

            # the servers' core, idle, just before and just after the run: how fast the
            # machine's tenants let it run (``core_speed_ns``; lower is faster)
            speed0 = core_speed_ns(self.server_cpus)
            st = gen.run(mode, warmup=a.warmup, duration=a.duration, window=window, rate=rate,
                         drain=a.drain, on_window=on_window)
            row["core_ns_per_step"] = [speed0, core_speed_ns(self.server_cpus)]
            (s0, r0, g0, t0, io0), (s1, r1, g1, t1, io1) = marks["start"], marks["end"]
            wall = t1 - t0
            cpu_server = Group.cpu_delta(s0, s1)
            cpu_redis = Group.cpu_delta(r0, r1)
            msgs = st.delivered_win
            row.update(
                sent=st.sent, delivered=st.delivered, lost=st.lost,
                loss_pct=round(100 * st.lost / st.sent, 4) if st.sent else 0.0,
                acks=st.acks if proto.startswith("signaling") else None,
                errors=dict(st.errors), out_of_order=st.out_of_order, undelivered=dict(st.diag),
                msgs_per_s=round(msgs / a.duration, 1),
                server_cpu_s=round(cpu_server, 2), redis_cpu_s=round(cpu_redis, 2),
                server_cpu_pct=round(100 * cpu_server / wall, 1),
                redis_cpu_pct=round(100 * cpu_redis / wall, 1),
                gen_cpu_pct=round(100 * Group.cpu_delta(g0, g1) / wall, 1),
                cpu_s_per_1k=round(1000 * (cpu_server + cpu_redis) / msgs, 4) if msgs else None,
                # the server processes' read/write system calls per delivered message
                server_syscalls_per_msg=[round(n / msgs, 2) for n in Group.io_delta(io0, io1)]
                if msgs else None,
                p50_ms=st.percentile_ms(50), p99_ms=st.percentile_ms(99),
                p999_ms=st.percentile_ms(99.9),
                max_ms=st.lat_us[-1] / 1000 if st.lat_us else None,
                latency_samples=len(st.lat_us),
            )
            if mode == "rate":
                row["latency_timeline"] = st.timeline()
            c0, c1 = marks["start_redis"], marks["end_redis"]
            if c0 is not None and c1 is not None:
                # what Redis ran in the window (ours or socket.io's adapter): script calls,
                # stream reads and writes, the limiter's steps, per message and in all
                commands = commands_delta(c0, c1)
                commands.pop("info", None)  # the start mark's own INFO
                row["redis_commands"] = commands
                row["redis_calls_per_msg"] = (
                    round(sum(c["calls"] for c in commands.values()) / msgs, 3)
                    if msgs else None)
            status = gen.status()
            row.update(open_at_end=status["open"], dropped=status["dropped"],
                       close_codes=status["close_codes"])
            row["rss_after_kb"] = server.rss_kb()
            if self.pin and row["gen_cpu_pct"] > 90:
                row["note"] = "generator core near saturation"
            log(f"  {row['msgs_per_s']:.0f} msg/s, cpu/1k {row['cpu_s_per_1k']}, "
                f"p50 {row['p50_ms']} p99 {row['p99_ms']} ms, lost {st.lost}/{st.sent}, "
                f"errors {dict(st.errors)}, dropped {status['dropped']}, "
                f"rss/conn {row['rss_per_conn_kb']} KB, gen cpu {row['gen_cpu_pct']}%, "
                f"core ns/step {row['core_ns_per_step']}")
        except Exception as exc:
            row["failure"] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED: {row['failure']}\n{traceback.format_exc()}\n{srv.log_tail(2000)}")
        finally:
            if gen is not None:
                gen.close()
            err_lines = _server_errors(srv)
            if err_lines:
                row["server_log_errors"] = err_lines
                log(f"  server log: {len(err_lines)} error/warning lines, first: {err_lines[0]}")
            srv.stop()
        self.rows.append(row)
        return row

    # -- scenarios

    def _closed_loop(
        self,
        scenario: str,
        servers: dict[str, tuple[str, Starter]],
        on_request: dict[str, tuple[str, Starter]],
    ) -> None:
        servers = {**servers, **{k: v for k, v in on_request.items()
                                 if k in (self.args.servers or ())}}
        labels = [label for label in self.args.servers or servers if label in servers]
        for n in self.args.conns:
            for r, label in self._interleaved(labels):
                proto, starter = servers[label]
                self.one(scenario, label, proto, starter, n,
                         idle_s=self.args.idle if n >= 10000 else 0.0, repeat=r)

    def _interleaved(self, labels: list[str]) -> list[tuple[int, str]]:
        """(repeat, label) for one connection count or rate: the compared servers run back
        to back, alternating on each repeat, so a slow spell of the machine hits all of
        them alike instead of the one that happened to run in it."""
        return [(r, label) for r in range(self.args.repeat) for label in labels]

    def relay(self) -> None:
        self._closed_loop("relay", SINGLE, NOACK_SINGLE)

    def cross(self) -> None:
        self._closed_loop("cross", CROSS, NOACK_CROSS)

    def latency(self) -> None:
        servers = {**CROSS, **NOACK_CROSS}
        labels = [label for label in self.args.servers or CROSS if label in servers]
        for rate in self.args.rates:
            for r, label in self._interleaved(labels):
                proto, starter = servers[label]
                self.one("latency", label, proto, starter, self.args.latency_conns,
                         mode="rate", rate=rate, repeat=r)

    def hold_100k(self) -> None:
        """Scenario 5: our server, several workers on Redis, holds N connections."""
        a = self.args
        n = a.hold_conns
        workers = a.hold_workers
        log(f"100k: {n} connections, {workers} workers, {a.hold_procs} generator processes")
        row: dict[str, Any] = {"scenario": "100k", "server": f"signaling-redis-w{workers}",
                               "protocol": "signaling", "connections": n, "workers": workers,
                               "pinned": False}
        srv = start_signaling(redis=True, workers=workers)
        gen: LoadGen | None = None
        try:
            server = Group(srv.server_pids)
            both = Group(srv.server_pids + srv.redis_pids)
            time.sleep(2)
            rss0 = server.rss_kb()
            row["rss_before_kb"] = rss0
            gen = LoadGen("signaling", srv.targets, n, procs=a.hold_procs,
                          src_addrs=a.hold_addrs, secret=secret())
            gen.start()
            c = gen.connect(concurrency=32, deadline=a.hold_connect_s)
            row.update(connected=c["connected"], connect_failed=c["failed"],
                       connect_s=round(c["seconds"], 1), connect_errors=c["connect_errors"])
            log(f"  connected {c['connected']} in {c['seconds']:.0f} s, failed {c['failed']} "
                f"{c['connect_errors']}")
            time.sleep(5)
            rss1 = server.rss_kb()
            row["rss_idle_kb"] = rss1
            row["redis_rss_kb"] = Group(srv.redis_pids).rss_kb()
            row["rss_per_conn_kb"] = round((rss1 - rss0) / max(1, c["connected"]), 2)
            row["fds_per_worker"] = sorted(open_fds(p) for p in server.pids())
            b = both.cpu()
            t0 = time.monotonic()
            time.sleep(a.hold_idle)
            wall = time.monotonic() - t0
            row["idle_s"] = round(wall, 1)
            row["idle_cpu_pct"] = round(100 * Group.cpu_delta(b, both.cpu()) / wall, 1)
            p = gen.presence(a.presence_sample)
            row.update(presence_checked=p["checked"], presence_online=p["online"])
            status = gen.status()
            row.update(held=status["open"], dropped=status["dropped"],
                       close_codes=status["close_codes"])
            log(f"  held {status['open']}, dropped {status['dropped']}, idle cpu "
                f"{row['idle_cpu_pct']}%, rss/conn {row['rss_per_conn_kb']} KB, presence "
                f"{p['online']}/{p['checked']} online")
        except Exception as exc:
            row["failure"] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED: {row['failure']}\n{traceback.format_exc()}")
        finally:
            if gen is not None:
                gen.close()
            err_lines = _server_errors(srv)
            if err_lines:
                row["server_log_errors"] = err_lines
            srv.stop()
        self.rows.append(row)


def _server_errors(srv: Servers, limit: int = 20) -> list[str]:
    """Error and warning lines of the servers' logs (our server's; node's stderr)."""
    out: list[str] = []
    for p in srv.logs:
        with contextlib.suppress(OSError):
            for line in p.read_text(errors="replace").splitlines():
                low = line.lower()
                if ("error" in low or "warning" in low or "traceback" in low) and \
                        "client connected" not in low:
                    out.append(line[:300])
    return out[:limit]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (~3 min)")
    ap.add_argument("--100k", dest="hold", action="store_true",
                    help="scenario 5 only: hold --hold-conns connections")
    ap.add_argument("--only", nargs="+", choices=["relay", "cross", "latency"],
                    help="scenarios to run (default: all but 100k)")
    ap.add_argument("--servers", nargs="+",
                    choices=[*SINGLE, *CROSS, *NOACK_SINGLE, *NOACK_CROSS])
    ap.add_argument("--conns", type=int, nargs="+", help="connection counts (1, 2)")
    ap.add_argument("--rates", type=float, nargs="+", help="offered msg/s (3)")
    ap.add_argument("--latency-conns", type=int, default=1000)
    ap.add_argument("--duration", type=float, help="measured seconds per run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each server at each connection count or rate (1, 2, 3); "
                         "the servers alternate run by run, and the report's side-by-side "
                         "ratios use the medians")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--drain", type=float, default=20.0,
                    help="longest wait for in-flight messages after sending stops")
    ap.add_argument("--window", type=int, default=0,
                    help="messages in flight per connection (0: 4 up to 100 connections, "
                         "2 up to 1000, else 1)")
    ap.add_argument("--idle", type=float, default=5.0,
                    help="seconds of idle CPU measurement at >= 10,000 connections")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin servers to core 0 and the generator to core 1")
    ap.add_argument("--hold-conns", type=int, default=100_000)
    ap.add_argument("--hold-workers", type=int, default=8)
    ap.add_argument("--hold-procs", type=int, default=8)
    ap.add_argument("--hold-addrs", type=int, default=8)
    ap.add_argument("--hold-idle", type=float, default=30.0)
    ap.add_argument("--hold-connect-s", type=float, default=600.0,
                    help="scenario 5: stop connecting after this long and hold what is open")
    ap.add_argument("--presence-sample", type=int, default=200)
    ap.add_argument("--alt-python", metavar="PATH",
                    help="the interpreter of --servers signaling-memory-alt (its environment "
                    "must have this package installed: pip install -e .)")
    ap.add_argument("--out", help="results directory (default bench/results/<timestamp>)")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    if a.conns is None:
        a.conns = [100, 2000] if a.quick else [100, 2000, 10000]
    if a.rates is None:
        a.rates = [1000, 5000] if a.quick else [1000, 5000, 10000]
    if a.duration is None:
        a.duration = 4.0 if a.quick else 10.0
    if a.quick:
        a.drain = min(a.drain, 10.0)
        a.latency_conns = min(a.latency_conns, 400)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    ALT_PYTHON[:] = [a.alt_python] if a.alt_python else []
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else RESULTS / (stamp + ("-100k" if a.hold else
                                                       "-quick" if a.quick else ""))
    bench = Bench(a)
    t0 = time.monotonic()
    if a.hold:
        bench.hold_100k()
    else:
        only = a.only or ["relay", "cross", "latency"]
        wants_node = any(s in ("peerjs", "socketio-redis-x2") for s in (a.servers or
                                                                        ["peerjs"]))
        if wants_node:
            npm_install()
        if "relay" in only:
            bench.relay()
        if "cross" in only:
            bench.cross()
        if "latency" in only:
            bench.latency()
    result = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {k: v for k, v in vars(a).items()},
        "machine": machine_info(),
        "wall_s": round(time.monotonic() - t0, 1),
        "rows": bench.rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = report.markdown(result)
    (out / "results.md").write_text(md)
    report.plots(result, out)
    print(md)
    log(f"results in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    bad = [r for r in bench.rows if r.get("failure")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
