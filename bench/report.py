"""Markdown tables and PNG plots from a ``results.json`` of :mod:`bench.run`, and a
before/after comparison of two of them.

    .venv/bin/python -m bench.report bench/results/<run>/results.json      # print the tables
    .venv/bin/python -m bench.report --compare BEFORE.json AFTER.json      # ratios

With ``bench.run --repeat N`` each server runs N times per connection count or rate,
interleaved with the servers it is compared to; :func:`summary` and :func:`ratios` reduce
those runs to medians, and the Markdown opens with our server's ratios to its peers.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

# scenario -> (ours, peer) pairs of the side-by-side ratios
PAIRS: dict[str, list[tuple[str, str]]] = {
    "relay": [("signaling-memory", "peerjs"), ("signaling-redis", "peerjs"),
              # run only on request (--alt-python): the same code on another interpreter
              ("signaling-memory-alt", "peerjs"), ("signaling-memory-alt", "signaling-memory")],
    "cross": [("signaling-redis-x2", "socketio-redis-x2")],
    "latency": [("signaling-redis-x2", "socketio-redis-x2")],
}
# the figure compared per scenario: throughput in the closed loop; at a fixed offered
# rate both deliver the same, so the tail latency is what differs
RATIO_METRIC = {"relay": "msgs_per_s", "cross": "msgs_per_s", "latency": "p99_ms"}

Key = tuple[Any, ...]


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


def _speed(r: dict[str, Any]) -> str:
    """``core_ns_per_step`` (older results have none)."""
    speed = r.get("core_ns_per_step")
    return f"{speed[0]:.0f} / {speed[1]:.0f}" if speed else "–"


def _calls(r: dict[str, Any]) -> str:
    calls = r.get("server_syscalls_per_msg")
    return f"{calls[0]:.2f} / {calls[1]:.2f}" if calls else "–"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _key(r: dict[str, Any]) -> Key:
    return (r["scenario"], r["server"], r["connections"], r.get("offered_rate"))


def _groups(rows: Iterable[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """Rows without a failure by (scenario, server, connections, rate), in run order."""
    out: dict[Key, list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("failure"):
            out.setdefault(_key(r), []).append(r)
    return out


def _median(rows: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(values) if values else None


def summary(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (scenario, server, connections, offered_rate): the number of runs,
    median/min/max msg/s, median CPU-s per 1k and p99, and the messages lost in all."""
    out = []
    for (scenario, server, conns, rate), group in _groups(rows).items():
        tp = [r["msgs_per_s"] for r in group if r.get("msgs_per_s") is not None]
        out.append({
            "scenario": scenario, "server": server, "connections": conns,
            "offered_rate": rate, "n": len(group),
            "msgs_per_s_median": _median(group, "msgs_per_s"),
            "msgs_per_s_min": min(tp, default=None), "msgs_per_s_max": max(tp, default=None),
            "cpu_s_per_1k_median": _median(group, "cpu_s_per_1k"),
            "p99_ms_median": _median(group, "p99_ms"),
            "lost": sum(r.get("lost") or 0 for r in group),
        })
    return out


def _div(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _per_run(ours: list[dict[str, Any]], peer: list[dict[str, Any]],
             metric: str) -> tuple[float, float] | None:
    """Min and max of the ratios of runs with the same repeat number — the servers ran
    back to back there, so each ratio saw the same state of the machine."""
    by_repeat = {r["repeat"]: r for r in peer if r.get("repeat") is not None}
    runs = [_div(r.get(metric), by_repeat[r["repeat"]].get(metric)) for r in ours
            if r.get("repeat") in by_repeat]
    values = [v for v in runs if v is not None]
    return (min(values), max(values)) if len(values) >= 2 else None


def ratios(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / peer for each pair of PAIRS at each connection count (or rate) both ran at:
    the ratio of the medians (msg/s; p99 for latency), of CPU-s per 1k, and the range of
    the per-run ratios when there are two interleaved runs or more."""
    rows = list(rows)
    groups = _groups(rows)
    medians = {_key(s): s for s in summary(rows)}
    out = []
    for scen, pairs in PAIRS.items():
        metric = RATIO_METRIC[scen]
        for ours, peer in pairs:
            points = sorted({k[2:] for k in groups if k[:2] == (scen, ours)}
                            & {k[2:] for k in groups if k[:2] == (scen, peer)},
                            key=lambda p: (p[0], p[1] or 0.0))
            for conns, rate in points:
                a, b = (medians[(scen, s, conns, rate)] for s in (ours, peer))
                out.append({
                    "scenario": scen, "ours": ours, "peer": peer, "connections": conns,
                    "offered_rate": rate, "runs": min(a["n"], b["n"]), "metric": metric,
                    "ratio": _div(a[f"{metric}_median"], b[f"{metric}_median"]),
                    "cpu_ratio": _div(a["cpu_s_per_1k_median"], b["cpu_s_per_1k_median"]),
                    "range": _per_run(groups[(scen, ours, conns, rate)],
                                      groups[(scen, peer, conns, rate)], metric),
                })
    return out


def _r(v: float) -> str:
    """A ratio: two decimals, or two significant digits below 0.1 (a p99 ratio can be
    0.005, which two decimals would show as 0.00)."""
    return f"{v:.2f}" if v >= 0.1 else f"{v:.2g}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"×{_r(v)}"


def _side_by_side(rows: list[dict[str, Any]]) -> list[str]:
    """The section of our server's ratios to its peers (empty when no pair ran)."""
    pairs = ratios(rows)
    if not pairs:
        return []
    runs = sorted({p["runs"] for p in pairs})  # more than one value when runs failed
    n = str(runs[0]) if len(runs) == 1 else f"{runs[0]}–{runs[-1]}"
    title = "one run each" if runs == [1] else f"medians of {n} interleaved runs"
    lines = []
    for p in pairs:
        ratio = _times(p["ratio"])
        where = _f(p["connections"])
        if p["metric"] == "p99_ms":
            ratio = "p99 " + ratio
            where += " / " + _f(p["offered_rate"])
        lo_hi = p["range"]
        lines.append([p["scenario"], f"{p['ours']} vs {p['peer']}", where, str(p["runs"]),
                      ratio, f"{_r(lo_hi[0])}–{_r(lo_hi[1])}" if lo_hi else "–",
                      _times(p["cpu_ratio"])])
    return ["", f"## Side by side ({title})", "",
            "Ours / peer, from the medians of each server's runs: msg/s in the closed loop "
            "(above 1: ours relays more), p99 at a fixed offered rate (below 1: ours is "
            "faster), CPU-s per 1k messages (below 1: ours spends less).  Per-run range: "
            "the lowest and highest ratio of runs made back to back.", "",
            _table(["scenario", "ours vs peer", "connections / offered msg/s", "runs",
                    "throughput ratio", "per-run range", "CPU-s per 1k ratio"], lines)]


def _has_repeats(rows: list[dict[str, Any]]) -> bool:
    """True when some server ran more than once at one connection count or rate."""
    keys = [_key(r) for r in rows]
    return len(set(keys)) < len(keys)


def _who(r: dict[str, Any], repeats: bool) -> list[str]:
    """The server cell, and the run number when there are repeats."""
    return [r["server"], str(r.get("repeat", 0) + 1)] if repeats else [r["server"]]


def _header(result: dict[str, Any]) -> list[str]:
    rows: list[dict[str, Any]] = result["rows"]
    m = result.get("machine", {})
    return [
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
        "(error frames in parentheses).  Latency is one-way, sender to receiver.  Core "
        "ns/step: a fixed interpreter loop on the servers' core, idle, just before and "
        "after the run (lower is faster; the machine's other tenants swing it).",
    ]


def _run_tables(rows: list[dict[str, Any]], repeats: bool) -> list[str]:
    """Scenarios 1-3, one line per run."""
    who = ["server", "run"] if repeats else ["server"]
    out: list[str] = []
    for scen in ("relay", "cross"):
        sel = [r for r in rows if r["scenario"] == scen]
        if not sel:
            continue
        out += ["", f"## {TITLES[scen]}", "", _table(
            [*who, "connections", "msg/s", "CPU-s per 1k msgs", "p50/p99/p99.9 ms", "loss",
             "RSS/conn KB", "server CPU %", "gen CPU %", "server syscalls/msg (read/write)"],
            ([*_who(r, repeats), _f(r["connections"]), _f(r.get("msgs_per_s")),
              _f(r.get("cpu_s_per_1k"), 3), _lat(r), _loss(r), _f(r.get("rss_per_conn_kb")),
              _f((r.get("server_cpu_pct") or 0) + (r.get("redis_cpu_pct") or 0))
              if "server_cpu_pct" in r else "–", _f(r.get("gen_cpu_pct")), _calls(r)]
             for r in sel),
        )]
    sel = [r for r in rows if r["scenario"] == "latency"]
    if sel:
        out += ["", f"## {TITLES['latency']}", "", _table(
            [*who, "connections", "offered msg/s", "msg/s", "CPU-s per 1k msgs",
             "p50/p99/p99.9 ms", "loss", "RSS/conn KB", "core ns/step before/after"],
            ([*_who(r, repeats), _f(r["connections"]), _f(r.get("offered_rate")),
              _f(r.get("msgs_per_s")), _f(r.get("cpu_s_per_1k"), 3), _lat(r), _loss(r),
              _f(r.get("rss_per_conn_kb")), _speed(r)] for r in sel),
        )]
    return out


def _idle_table(rows: list[dict[str, Any]], repeats: bool) -> list[str]:
    sel = [r for r in rows if r["scenario"] in ("relay", "cross") and r["connections"] >= 10000
           and "rss_idle_kb" in r]
    if not sel:
        return []
    return ["", f"## {TITLES['idle']}", "", _table(
        [*(["server", "run"] if repeats else ["server"]), "instances", "connections",
         "RSS before MB", "RSS idle MB", "RSS/conn KB", "idle CPU % (server+redis)"],
        ([*_who(r, repeats), _f(r.get("instances")), _f(r.get("connected")),
          _f(r["rss_before_kb"] / 1024), _f(r["rss_idle_kb"] / 1024),
          _f(r.get("rss_per_conn_kb")), _f(r.get("idle_cpu_pct"))] for r in sel),
    )]


def _hold_table(rows: list[dict[str, Any]]) -> list[str]:
    sel = [r for r in rows if r["scenario"] == "100k"]
    if not sel:
        return []
    return ["", f"## {TITLES['100k']}", "", _table(
        ["server", "workers", "connections", "held", "dropped", "connect s",
         "idle CPU % (server+redis)", "RSS/conn KB", "presence online", "max fds/process"],
        ([r["server"], _f(r.get("workers")), _f(r["connections"]), _f(r.get("held")),
          _f(r.get("dropped")) if "failure" not in r else "FAILED", _f(r.get("connect_s")),
          _f(r.get("idle_cpu_pct")), _f(r.get("rss_per_conn_kb")),
          f"{r.get('presence_online', '–')}/{r.get('presence_checked', '–')}",
          _f(max(r.get("fds_per_worker") or [0]))] for r in sel),
    )]


def _notes(rows: list[dict[str, Any]], repeats: bool) -> list[str]:
    notes = []
    for r in rows:
        what = f"{r['scenario']} {r['server']} {r['connections']}"
        if repeats and "repeat" in r:
            what += f" run {r['repeat'] + 1}"
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
    return ["", "## Notes", "", *notes] if notes else []


def markdown(result: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = result["rows"]
    repeats = _has_repeats(rows)
    out = [*_header(result), *_side_by_side(rows), *_run_tables(rows, repeats),
           *_idle_table(rows, repeats), *_hold_table(rows), *_notes(rows, repeats)]
    return "\n".join(out) + "\n"


PLOTTED = ("msgs_per_s", "cpu_s_per_1k", "p50_ms", "p99_ms", "p999_ms")


def _median_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, server, connections, rate) with the median of each plotted
    figure, so repeated runs give one bar or point each."""
    out = []
    for group in _groups(rows).values():
        row = {k: group[0][k] for k in ("scenario", "server", "connections")}
        row["offered_rate"] = group[0].get("offered_rate")
        row.update({k: _median(group, k) for k in PLOTTED})
        out.append(row)
    return out


def plots(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    rows = _median_rows(result["rows"])
    _plot_throughput(rows, out)
    _plot_latency(rows, out)


def _plot_throughput(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

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


def _plot_latency(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

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


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Rows of A and B matched by (scenario, server, connections, rate) and the run number
    where both have it (else B's runs against A's first): B/A ratios."""
    first: dict[Key, dict[str, Any]] = {}
    same_run: dict[Key, dict[str, Any]] = {}
    for r in a["rows"]:
        first.setdefault(_key(r), r)
        same_run.setdefault((*_key(r), r.get("repeat")), r)
    repeats = _has_repeats(b["rows"])
    metrics = [("msgs_per_s", "msg/s"), ("cpu_s_per_1k", "CPU/1k"), ("p50_ms", "p50"),
               ("p99_ms", "p99"), ("rss_per_conn_kb", "RSS/conn"), ("lost", "lost")]
    rows = []
    for r in b["rows"]:
        o = same_run.get((*_key(r), r.get("repeat"))) or first.get(_key(r))
        if o is None:
            continue
        cells = [r["scenario"], r["server"], _f(r["connections"]),
                 _f(r.get("offered_rate")), *([str(r.get("repeat", 0) + 1)] if repeats else [])]
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
    head_cells = ["scenario", "server", "conns", "rate", *(["run"] if repeats else [])]
    return head + _table([*head_cells, *[m[1] for m in metrics]], rows) + "\n"


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
