"""Markdown tables and PNG plots from a ``results.json`` of :mod:`bench.run`, and a
before/after comparison of two of them.

    .venv/bin/python -m bench.report bench/results/<run>/results.json      # print the tables
    .venv/bin/python -m bench.report --compare BEFORE.json AFTER.json      # ratios
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TITLES = {
    "relay": "1. Relay throughput, one instance (closed loop)",
    "cross": "2. Relay throughput across two instances on one Redis (closed loop)",
    "latency": "3. One-way latency at fixed offered rates, across two instances",
    "idle": "4. Idle memory per connection (10,000 connections, before any message)",
    "100k": "5. Holding 100,000 connections",
}


def _f(v: Any, nd: int = 1) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _lat(r: dict[str, Any]) -> str:
    return " / ".join(_f(r.get(k), 1) for k in ("p50_ms", "p99_ms", "p999_ms"))


def _loss(r: dict[str, Any]) -> str:
    if r.get("failure"):
        return "FAILED"
    if "sent" not in r:
        return "–"
    text = f"{r['lost']:,}/{r['sent']:,}"
    if r.get("errors"):
        text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) + ")"
    return text


def _calls(r: dict[str, Any]) -> str:
    calls = r.get("server_syscalls_per_msg")
    return f"{calls[0]:.2f} / {calls[1]:.2f}" if calls else "–"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = result["rows"]
    m = result.get("machine", {})
    out = [
        "# Benchmark results",
        "",
        f"{result.get('created', '')} — commit `{str(m.get('git_commit', ''))[:12]}`"
        + (" (service/ modified)" if m.get("git_dirty") else "")
        + f"; {m.get('cpus_usable')} CPUs ({m.get('cpu_model', '')}), {m.get('mem_gib')} GiB; "
        f"Python {m.get('python')}, node {m.get('node')}, {m.get('redis', '').split(' sha')[0]}."
        + (" Servers and redis-server pinned to core 0, the generator to core 1."
           if any(r.get("pinned") for r in rows) else ""),
        "",
        "CPU-s per 1k msgs = (server processes + redis-server) CPU seconds over the measured "
        "window / delivered messages × 1000.  Loss = sent − delivered after the drain "
        "(error frames in parentheses).  Latency is one-way, sender to receiver.",
    ]
    base = ["server", "connections", "msg/s", "CPU-s per 1k msgs", "p50/p99/p99.9 ms", "loss",
            "RSS/conn KB"]
    for scen in ("relay", "cross"):
        sel = [r for r in rows if r["scenario"] == scen]
        if not sel:
            continue
        out += ["", f"## {TITLES[scen]}", "", _table(
            [*base, "server CPU %", "gen CPU %", "server syscalls/msg (read/write)"],
            ([r["server"], _f(r["connections"]), _f(r.get("msgs_per_s")),
              _f(r.get("cpu_s_per_1k"), 3), _lat(r), _loss(r), _f(r.get("rss_per_conn_kb")),
              _f((r.get("server_cpu_pct") or 0) + (r.get("redis_cpu_pct") or 0))
              if "server_cpu_pct" in r else "–", _f(r.get("gen_cpu_pct")), _calls(r)]
             for r in sel),
        )]
    sel = [r for r in rows if r["scenario"] == "latency"]
    if sel:
        out += ["", f"## {TITLES['latency']}", "", _table(
            ["server", "connections", "offered msg/s", "msg/s", "CPU-s per 1k msgs",
             "p50/p99/p99.9 ms", "loss", "RSS/conn KB"],
            ([r["server"], _f(r["connections"]), _f(r.get("offered_rate")),
              _f(r.get("msgs_per_s")), _f(r.get("cpu_s_per_1k"), 3), _lat(r), _loss(r),
              _f(r.get("rss_per_conn_kb"))] for r in sel),
        )]
    sel = [r for r in rows if r["scenario"] in ("relay", "cross") and r["connections"] >= 10000
           and "rss_idle_kb" in r]
    if sel:
        out += ["", f"## {TITLES['idle']}", "", _table(
            ["server", "instances", "connections", "RSS before MB", "RSS idle MB",
             "RSS/conn KB", "idle CPU % (server+redis)"],
            ([r["server"], _f(r.get("instances")), _f(r.get("connected")),
              _f(r["rss_before_kb"] / 1024), _f(r["rss_idle_kb"] / 1024),
              _f(r.get("rss_per_conn_kb")), _f(r.get("idle_cpu_pct"))] for r in sel),
        )]
    sel = [r for r in rows if r["scenario"] == "100k"]
    if sel:
        out += ["", f"## {TITLES['100k']}", "", _table(
            ["server", "workers", "connections", "held", "dropped", "connect s",
             "idle CPU % (server+redis)", "RSS/conn KB", "presence online", "max fds/process"],
            ([r["server"], _f(r.get("workers")), _f(r["connections"]), _f(r.get("held")),
              _f(r.get("dropped")) if "failure" not in r else "FAILED", _f(r.get("connect_s")),
              _f(r.get("idle_cpu_pct")), _f(r.get("rss_per_conn_kb")),
              f"{r.get('presence_online', '–')}/{r.get('presence_checked', '–')}",
              _f(max(r.get("fds_per_worker") or [0]))] for r in sel),
        )]
    notes = []
    for r in rows:
        what = f"{r['scenario']} {r['server']} {r['connections']}"
        if r.get("failure"):
            notes.append(f"- {what}: **failed** — {r['failure']}")
        if r.get("connect_failed"):
            notes.append(f"- {what}: {r['connect_failed']} connections failed "
                         f"{r.get('connect_errors')}")
        if r.get("dropped"):
            notes.append(f"- {what}: {r['dropped']} connections dropped by the server "
                         f"(close codes {r.get('close_codes')})")
        if r.get("out_of_order"):
            notes.append(f"- {what}: {r['out_of_order']} messages out of order")
        if r.get("note"):
            notes.append(f"- {what}: {r['note']}")
        if r.get("server_log_errors"):
            notes.append(f"- {what}: server log: `{r['server_log_errors'][0][:160]}` "
                         f"({len(r['server_log_errors'])} lines)")
    if notes:
        out += ["", "## Notes", "", *notes]
    return "\n".join(out) + "\n"


def plots(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r.get("failure")]
    tp = [r for r in rows if r["scenario"] in ("relay", "cross") and r.get("msgs_per_s")]
    if tp:
        labels = sorted({f"{r['server']}" for r in tp}, key=lambda s: (
            s.endswith("x2"), s))
        counts = sorted({r["connections"] for r in tp})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(1, len(labels))
        for k, lab in enumerate(labels):
            xs, ys, cs = [], [], []
            for i, n in enumerate(counts):
                r = next((r for r in tp if r["server"] == lab and r["connections"] == n), None)
                if r:
                    xs.append(i + k * width)
                    ys.append(r["msgs_per_s"])
                    cs.append(r.get("cpu_s_per_1k") or 0)
            axes[0].bar(xs, ys, width, label=lab)
            axes[1].bar(xs, cs, width, label=lab)
        for ax, title in ((axes[0], "delivered msg/s (closed loop)"),
                          (axes[1], "server+redis CPU-s per 1,000 messages")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(counts))])
            ax.set_xticklabels([f"{n:,} conns" for n in counts])
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
    lat = [r for r in rows if r["scenario"] == "latency" and r.get("p50_ms") is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, lab in enumerate(sorted({r["server"] for r in lat})):
            sel = sorted((r for r in lat if r["server"] == lab), key=lambda r: r["offered_rate"])
            xs = [r["offered_rate"] for r in sel]
            for key, style in (("p50_ms", "-o"), ("p99_ms", "--s"), ("p999_ms", ":^")):
                ax.plot(xs, [r[key] for r in sel], style, color=f"C{i}",
                        label=f"{lab} {key[:-3]}")
        ax.set_xlabel("offered msg/s (total)")
        ax.set_ylabel("one-way latency, ms")
        ax.set_yscale("log")
        ax.set_title("latency across two instances")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["scenario"], r["server"], r["connections"], r.get("offered_rate"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Rows of A and B matched by (scenario, server, connections, rate): B/A ratios."""
    before = {_key(r): r for r in a["rows"]}
    metrics = [("msgs_per_s", "msg/s"), ("cpu_s_per_1k", "CPU/1k"), ("p50_ms", "p50"),
               ("p99_ms", "p99"), ("rss_per_conn_kb", "RSS/conn"), ("lost", "lost")]
    rows = []
    for r in b["rows"]:
        o = before.get(_key(r))
        if o is None:
            continue
        cells = [r["scenario"], r["server"], _f(r["connections"]),
                 _f(r.get("offered_rate"))]
        for k, _ in metrics:
            x, y = o.get(k), r.get(k)
            if x is None or y is None:
                cells.append("–")
            elif k == "lost":
                cells.append(f"{x} → {y}")
            else:
                ratio = f" (×{y / x:.2f})" if x else ""
                cells.append(f"{_f(x, 2)} → {_f(y, 2)}{ratio}")
        rows.append(cells)
    ca = str(a.get("machine", {}).get("git_commit", ""))[:10]
    cb = str(b.get("machine", {}).get("git_commit", ""))[:10]
    head = f"Before `{ca}` → after `{cb}` (ratio after/before)\n\n"
    return head + _table(["scenario", "server", "conns", "rate", *[m[1] for m in metrics]],
                         rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("files", nargs="+", help="results.json (two with --compare)")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--plots", help="also write the PNGs into this directory")
    a = ap.parse_args(argv)
    data = [json.loads(Path(f).read_text()) for f in a.files]
    if a.compare:
        if len(data) != 2:
            ap.error("--compare needs two files")
        print(compare(data[0], data[1]))
        return 0
    for d in data:
        print(markdown(d))
        if a.plots:
            plots(d, Path(a.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
