"""Connection churn: does a worker give back what its closed connections held?

    .venv/bin/python -m bench.churn                        # 5,000 connections, 6 rounds
    .venv/bin/python -m bench.churn --conns 10000 --rounds 4 --json /tmp/churn.json

Our server as ``bench.run`` starts it (one worker, on Redis, pinned to core 0 with
redis-server; the generator on core 1).  Each round opens ``--conns`` connections, then
closes them all (close frames, as clients that leave).  After each round: the server's
RSS with the connections open and after they closed.  Then, with the last round's
connections still open, the worker's cyclic-GC figures (``tests/e2e/gc_probe``, loaded
into the server through PYTHONPATH; the GC itself left as the worker sets it): the objects
it tracks, those unreachable, and how long a full collection took, the pause every
connection of the worker would see when one comes.

``growth_kb_per_closed_conn``: the RSS after the last round minus after the first, per
connection closed in between (the first round also allocates what any first use does).
Compare within one machine and hour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/churn.py
    sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadGen  # noqa: E402
from bench.procstat import Group, cpu_count  # noqa: E402
from bench.servers import Servers, secret, start_signaling  # noqa: E402

PROBE = ROOT / "tests" / "e2e" / "gc_probe"


def _probe(group: Group, out: Path, timeout: float = 120) -> dict[str, Any]:
    """The GC figures of the server's largest process (the worker)."""
    rss = group.rss_by_pid()
    worker = max(rss, key=lambda pid: rss[pid])
    report = out / f"{worker}.json"
    report.unlink(missing_ok=True)
    os.kill(worker, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not report.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not answer the probe")
        time.sleep(0.1)
    got = json.loads(report.read_text())
    return {k: got[k] for k in ("tracked", "unreachable", "collect_ms")}


def _connect(srv: Servers, conns: int, cpus: set[int] | None) -> LoadGen:
    gen = LoadGen("signaling", srv.targets, conns, cpus=cpus, secret=secret())
    gen.start()
    c = gen.connect()
    if c["failed"]:
        gen.close()
        raise RuntimeError(f"{c['failed']} connections failed: {c['connect_errors']}")
    return gen


def measure(conns: int, rounds: int, pin: bool, settle: float) -> dict[str, Any]:
    server_cpus, gen_cpus = ({0}, {1}) if pin else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        srv = start_signaling(redis=True, cpus=server_cpus, extra_env={
            "PYTHONPATH": str(PROBE), "GC_PROBE_DIR": tmp})
        try:
            group = Group(srv.server_pids)
            out: dict[str, Any] = {"conns": conns, "rounds": [], "pinned": pin,
                                   "rss_start_kb": group.rss_kb()}
            for i in range(rounds):
                gen = _connect(srv, conns, gen_cpus)
                time.sleep(settle)
                row: dict[str, Any] = {"rss_open_kb": group.rss_kb()}
                if i == rounds - 1:
                    row["gc_open"] = _probe(group, Path(tmp))
                gen.close()  # close frames, then the generator processes end
                time.sleep(settle)
                row["rss_closed_kb"] = group.rss_kb()
                out["rounds"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            srv.stop()
    first, last = out["rounds"][0], out["rounds"][-1]
    closed_between = conns * (rounds - 1)
    out["growth_kb_per_closed_conn"] = (
        round((last["rss_closed_kb"] - first["rss_closed_kb"]) / closed_between, 2)
        if closed_between else None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds after the connections open or close before measuring")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--no-pin", action="store_true", help="leave CPU affinity alone")
    args = ap.parse_args(argv)
    summary = measure(args.conns, max(1, args.rounds), not args.no_pin and cpu_count() >= 2,
                      args.settle)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
