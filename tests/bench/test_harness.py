"""Smoke test of the benchmark load generator (bench/loadgen.py): ~20 picows connections
against one real server process on the in-process backplane for ~2 s; every message sent
must arrive.  No npm, no peers.  At the end, fast unit tests of bench/run.py's run order and
bench/report.py's medians and side-by-side ratios, on synthetic rows."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("picows")

from bench.loadgen import LoadGen  # noqa: E402
from bench.procstat import Group  # noqa: E402
from tests.support import SECRET, running, server_env  # noqa: E402

pytestmark = pytest.mark.e2e


def test_loadgen_relays_without_loss() -> None:
    env = server_env(None, RATE_LIMIT="1000000/second")
    with running(env, extra_args=["--no-access-logs"]) as server:
        gen = LoadGen("signaling", [("127.0.0.1", server.port)], 20, procs=2, secret=SECRET)
        with gen:
            c = gen.connect()
            assert c["connected"] == 20, c
            st = gen.run("closed", warmup=0.3, duration=2.0, window=2, drain=5.0)
            status = gen.status()
    assert st.delivered > 0
    assert st.lost == 0, (st.sent, st.delivered, st.errors)
    assert st.acks == st.sent
    assert not st.errors
    assert st.out_of_order == 0
    assert st.percentile_ms(50) is not None
    assert status["dropped"] == 0
    # every latency sample is placed in the window by its send time
    timeline = st.timeline(500)
    assert sum(row[1] for row in timeline) == len(st.lat_us)
    assert all(-500 <= row[0] < 2000 for row in timeline), timeline


def test_the_latency_timeline_shows_where_in_the_run_the_slow_messages_were() -> None:
    from bench.loadgen import RunStats

    st = RunStats()
    # a steady 1 ms for two seconds, one stall of 80 ms in the second quarter-second
    st.samples = [(t, 80_000 if 250 <= t < 260 else 1_000) for t in range(0, 2000)]
    rows = st.timeline(250)
    assert [r[0] for r in rows] == list(range(0, 2000, 250))
    assert all(r[1] == 250 for r in rows)
    assert rows[1][3:] == [80.0, 80.0]  # p99 and max of the bucket with the stall
    assert rows[0][2:] == [1.0, 1.0, 1.0] and rows[2][2:] == [1.0, 1.0, 1.0]


def test_loadgen_without_ids_gets_no_acks_and_loses_nothing() -> None:
    """The ``signaling-noack`` variant: messages without ``id`` are relayed, never acked."""
    env = server_env(None, RATE_LIMIT="1000000/second")
    with running(env, extra_args=["--no-access-logs"]) as server:
        gen = LoadGen("signaling-noack", [("127.0.0.1", server.port)], 10, procs=1,
                      secret=SECRET)
        with gen:
            assert gen.connect()["connected"] == 10
            st = gen.run("closed", warmup=0.3, duration=1.0, window=2, drain=5.0)
    assert st.delivered > 0
    assert st.lost == 0, (st.sent, st.delivered, st.errors)
    assert st.acks == 0
    assert not st.errors


def test_io_calls_count_a_process_system_calls(tmp_path: Path) -> None:
    me = Group([os.getpid()])
    before = me.io()
    target = tmp_path / "x"
    for _ in range(50):
        target.write_bytes(b"x")
        target.read_bytes()
    reads, writes = Group.io_delta(before, me.io())
    assert reads >= 50 and writes >= 50, (reads, writes)


@pytest.mark.parametrize("backplane", ["memory", "redis"])
def test_core_bench_counts_every_message_it_measures(backplane: str, tmp_path: Path) -> None:
    """bench/core.py: the socket-free routing loop delivers and acks what it sends, and
    reports a cost per message."""
    from bench import core

    out = tmp_path / "core.json"
    argv = ["--pairs", "20", "--seconds", "0.5", "--repeat", "1", "--warmup", "0.2",
            "--no-pin", "--json", str(out)]
    thresholds = gc.get_threshold()
    assert core.main(argv + (["--memory"] if backplane == "memory" else [])) == 0
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0  # left as found
    summary = json.loads(out.read_text())
    (run,) = summary["runs"]
    assert summary["backplane"] == backplane
    assert run["delivered"] > 0
    # each of the 40 users has one message in flight: at each edge of the window its
    # delivery and its ack may fall on either side
    assert abs(run["acks"] - run["delivered"]) <= 2 * 40, run
    assert run["acks"] > run["delivered"] / 2
    assert run["python_us_per_msg"] > 0
    assert (run["redis_us_per_msg"] > 0) == (backplane == "redis")


def test_lua_bench_measures_the_route_script_and_a_variant(tmp_path: Path) -> None:
    """bench/lua.py: every message of every batch is queued for its one device (it raises
    otherwise), and each script's cost per message is reported."""
    from bench import lua

    variant = tmp_path / "v.lua"
    variant.write_text(lua._ROUTE)
    out = tmp_path / "lua.json"
    assert lua.main(["--batch", "5", "--calls", "4", "--users", "7", "--repeat", "1",
                     "--no-pin", "--script", str(variant), "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert set(run) == {"route", "lookup_only", "nothing", "variant"}
    assert all(us > 0 for us in run.values()), run


def test_storm_bench_counts_every_first_message_in_calls_within_the_budget(
    tmp_path: Path,
) -> None:
    """bench/storm.py: every user's first message is admitted (it raises otherwise), in as
    many script calls as the limiter's budget makes, and another client's PINGs went on
    meanwhile."""
    from bench import storm
    from service.backends import redis_limits as rl

    out = tmp_path / "storm.json"
    assert storm.main(["--users", "700", "--repeat", "1", "--no-pin", "--json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    per_call = rl.CALL_BUDGET // (1 + rl.USER_COST)
    assert run["script_calls"] == -(-700 // per_call), run
    assert 0 < run["longest_call_ms"] <= run["script_ms_total"], run
    assert run["pings"] > 0 and run["longest_ping_ms"] > 0, run


def test_churn_bench_reports_memory_per_round_and_the_workers_gc(tmp_path: Path) -> None:
    """bench/churn.py: every connection of every round opens (it raises otherwise), the
    RSS is taken per round, and the probe reaches the worker with its connections open."""
    from bench import churn

    out = tmp_path / "churn.json"
    assert churn.main(["--conns", "50", "--rounds", "2", "--settle", "0.3", "--no-pin",
                       "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    first, last = summary["rounds"]
    assert all(r["rss_open_kb"] > 0 and r["rss_closed_kb"] > 0 for r in (first, last))
    assert "gc_open" not in first
    # the worker tracks at least what 50 connections are made of (~60 objects each)
    assert last["gc_open"]["tracked"] > 50 * 30, last
    assert last["gc_open"]["collect_ms"] > 0, last
    assert summary["growth_kb_per_closed_conn"] is not None


def test_inline_bench_keeps_every_frame_on_the_inline_path(tmp_path: Path) -> None:
    """bench/inline.py: each frame is delivered and acked from the read callback (a
    delivery and an ack written per message, nothing queued for a read loop)."""
    from bench import inline

    out = tmp_path / "inline.json"
    thresholds = gc.get_threshold()
    assert inline.main(["--conns", "20", "--per-tick", "5", "--seconds", "0.3", "--repeat",
                        "1", "--warmup", "0.1", "--no-pin", "--json", str(out)]) == 0
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0  # left as found
    (run,) = json.loads(out.read_text())["runs"]
    assert run["messages"] > 0 and run["ns_per_msg"] > 0
    assert run["queued"] == 0
    # {"type":"candidate","from":"uN","from_device":"d","payload":{..},"ts":..,"id":".."}
    # (~125 bytes with its header) and {"type":"ack","id":"..","devices":1} (~40)
    assert 140 < run["bytes_out_per_msg"] < 200, run


def test_inline_costs_leave_each_part_out_in_turn(tmp_path: Path) -> None:
    """bench/inline.py --costs: every part is measured against the whole path in the same
    process, and each stub is undone (the whole path's rounds still count and ack)."""
    from bench import inline

    out = tmp_path / "costs.json"
    thresholds = gc.get_threshold()
    assert inline.main(["--costs", "--conns", "20", "--per-tick", "5", "--seconds", "0.1",
                        "--repeat", "2", "--warmup", "0.1", "--no-pin", "--json",
                        str(out)]) == 0
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0  # left as found
    summary = json.loads(out.read_text())
    assert set(summary["ns_per_msg"]) == set(inline.PARTS)
    assert set(summary["cost_ns"]) == set(inline.PARTS) - {"full"}
    assert all(len(runs) == 2 and min(runs) > 0 for runs in summary["runs"].values())
    for part, cost in summary["cost_ns"].items():
        assert cost == summary["ns_per_msg"]["full"] - summary["ns_per_msg"][part]
    assert summary["queued"] == 0

    async def stubs_left() -> list[str]:
        async with inline._path(4, 2) as path:
            router, presence = path.rt.router, path.rt.hub.presence

            def state() -> dict[str, Any]:
                return {"limiter": dict(vars(router.limiter)), "stats": router.stats,
                        "presence": dict(vars(presence))}

            before = state()
            for part in inline.PARTS.values():
                part(path)[1]()  # applied, then undone
            after = state()
            return [name for name in before if before[name] != after[name]]

    assert asyncio.run(stubs_left()) == []


def test_inline_fixed_passes_hand_over_exactly_that_many_frames() -> None:
    """bench/inline.py --fixed (one of --counts' runs): warm passes, then exactly
    ``passes`` frames per connection, the limiter on a virtual clock."""
    from bench import inline

    async def frames(passes: int, part: str) -> int:
        return await inline.run_fixed(20, 5, passes, part)

    assert asyncio.run(frames(3, "full")) == 60
    assert asyncio.run(frames(0, "ack")) == 0


def test_cachegrind_totals_are_read_from_its_summary_line(tmp_path: Path) -> None:
    from bench import inline

    out = tmp_path / "cachegrind.out"
    out.write_text("desc: I1 cache: ...\ncmd: python x\n"
                   "events: Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw\nfl=x.c\n"
                   "summary: 1000 1 1 300 20 5 100 7 2\n")
    assert inline._summary(out) == {"instructions": 1000, "d1_misses": 27, "l2_misses": 7}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_inline_counts_under_cachegrind(tmp_path: Path) -> None:
    """bench/inline.py --counts: per message, the counted run minus the empty one."""
    from bench import inline

    out = tmp_path / "counts.json"
    assert inline.main(["--counts", "--conns", "20", "--per-tick", "5", "--passes", "4",
                        "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["messages"] == 80 and set(summary["per_msg"]) == {"full"}
    full = summary["per_msg"]["full"]
    # a message is thousands of instructions (parse, route, encode, write), never zero:
    # the counted run did hand over its frames, and the empty one cancelled the setup
    assert 5_000 < full["instructions"] < 500_000, full
    # misses are counted too; over 80 messages their difference is within the runs'
    # teardown noise (a collection in one run and not the other), so no sign is implied
    assert all(isinstance(full[k], float) for k in ("d1_misses", "l2_misses")), full


def test_the_python_floor_relays_the_peerjs_wire_without_loss() -> None:
    """``bench/floor.py``, the bare relay the suite can run beside the servers."""
    from bench.servers import start_floor

    servers = start_floor()
    try:
        gen = LoadGen("peerjs", servers.targets, 10, procs=1, secret=SECRET)
        with gen:
            assert gen.connect()["connected"] == 10
            st = gen.run("closed", warmup=0.3, duration=1.0, window=2, drain=5.0)
    finally:
        servers.stop()
    assert st.delivered > 0
    assert st.lost == 0, (st.sent, st.delivered, st.errors)
    assert st.out_of_order == 0


# -- bench/run.py's run order and bench/report.py's medians (synthetic rows, no servers)


def _row(scen: str, server: str, repeat: int, msgs: float, cpu: float, p99: float,
         conns: int = 100, rate: float | None = None) -> dict[str, Any]:
    return {"scenario": scen, "server": server, "connections": conns, "offered_rate": rate,
            "repeat": repeat, "msgs_per_s": msgs, "cpu_s_per_1k": cpu, "p99_ms": p99,
            "p50_ms": p99 / 2, "p999_ms": p99 * 2, "lost": repeat, "sent": 1000}


def _repeated() -> list[dict[str, Any]]:
    """Three interleaved runs of ours and the peer in relay and latency; each series has
    one outlier, so its mean and its median differ."""
    rows = []
    for r, (ours, peer) in enumerate([(1000.0, 800.0), (1300.0, 1000.0), (4000.0, 1100.0)]):
        rows += [_row("relay", "signaling-memory", r, ours, [0.5, 0.4, 0.1][r], 9.0),
                 _row("relay", "peerjs", r, peer, [0.8, 0.8, 2.0][r], 9.0)]
    for r, (ours, peer) in enumerate([(2.0, 4.0), (3.0, 5.0), (30.0, 6.0)]):
        rows += [_row("latency", server, r, 1000.0, 0.3, p99, conns=400, rate=1000.0)
                 for server, p99 in (("signaling-redis-x2", ours),
                                     ("socketio-redis-x2", peer))]
    return rows


def test_summary_takes_medians_of_the_runs() -> None:
    from bench import report

    groups = {(s["scenario"], s["server"]): s for s in report.summary(_repeated())}
    ours = groups[("relay", "signaling-memory")]
    assert ours["n"] == 3
    assert ours["msgs_per_s_median"] == 1300.0  # the mean would be 2100
    assert (ours["msgs_per_s_min"], ours["msgs_per_s_max"]) == (1000.0, 4000.0)
    assert ours["cpu_s_per_1k_median"] == 0.4
    assert ours["lost"] == 0 + 1 + 2
    assert groups[("latency", "signaling-redis-x2")]["p99_ms_median"] == 3.0


def test_summary_leaves_out_failed_runs() -> None:
    from bench import report

    rows = [*_repeated(), {"scenario": "relay", "server": "peerjs", "connections": 100,
                           "offered_rate": None, "repeat": 3, "failure": "RuntimeError: x"}]
    peer = next(s for s in report.summary(rows) if s["server"] == "peerjs")
    assert peer["n"] == 3


def test_ratios_of_medians_and_per_run_range_by_repeat() -> None:
    from bench import report

    relay, latency = report.ratios(_repeated())
    assert (relay["scenario"], relay["ours"], relay["peer"]) == (
        "relay", "signaling-memory", "peerjs")
    assert relay["runs"] == 3 and relay["connections"] == 100
    assert relay["ratio"] == pytest.approx(1300 / 1000)  # means: 2100 / 966.7
    assert relay["cpu_ratio"] == pytest.approx(0.4 / 0.8)
    # same repeat paired: 1000/800, 1300/1000, 4000/1100 (not e.g. 1000/1100)
    assert relay["range"] == pytest.approx((1.25, 4000 / 1100))
    assert latency["metric"] == "p99_ms" and latency["offered_rate"] == 1000.0
    assert latency["ratio"] == pytest.approx(3 / 5)
    assert latency["range"] == pytest.approx((2 / 4, 30 / 6))


def test_ratios_with_one_run_each_have_no_range() -> None:
    from bench import report

    (relay, _) = report.ratios([r for r in _repeated() if r["repeat"] == 0])
    assert relay["runs"] == 1 and relay["range"] is None
    assert relay["ratio"] == pytest.approx(1000 / 800)
    assert report.ratios([r for r in _repeated() if r["server"] != "peerjs"
                          and r["scenario"] == "relay"]) == []


def test_markdown_with_one_run_each_keeps_the_tables() -> None:
    from bench import report

    md = report.markdown({"rows": [r for r in _repeated() if r["repeat"] == 0]})
    assert "| server | connections | msg/s |" in md
    assert "| server | connections | offered msg/s |" in md
    assert "| run |" not in md
    assert "## Side by side (one run each)" in md
    assert md.index("## Side by side") < md.index("## 1. Relay throughput")
    assert "| relay | signaling-memory vs peerjs | 100 | 1 | ×1.25 | – | ×0.62 |" in md


def test_markdown_with_repeats_has_a_run_column_and_the_medians() -> None:
    from bench import report

    md = report.markdown({"rows": _repeated()})
    assert "| server | run | connections | msg/s |" in md
    assert "| server | run | connections | offered msg/s |" in md
    assert "| peerjs | 3 | 100 | 1,100 |" in md
    assert "## Side by side (medians of 3 interleaved runs)" in md
    assert "| relay | signaling-memory vs peerjs | 100 | 3 | ×1.30 | 1.25–3.64 | ×0.50 |" in md
    assert ("| latency | signaling-redis-x2 vs socketio-redis-x2 | 400 / 1,000 | 3 "
            "| p99 ×0.60 | 0.50–5.00 | ×1.00 |") in md


def test_core_speed_is_a_figure_per_step_on_the_given_core() -> None:
    from bench.procstat import core_speed_ns

    cpu = min(os.sched_getaffinity(0))
    mask = os.sched_getaffinity(0)
    short = core_speed_ns({cpu}, steps=50_000, rounds=3)
    long = core_speed_ns({cpu}, steps=200_000, rounds=3)
    assert 0 < short < 10_000 and 0 < long < 10_000
    assert 1 / 3 < long / short < 3  # per step, not per round (that would be x4)
    assert os.sched_getaffinity(0) == mask  # the affinity is given back


def test_latency_table_shows_the_core_speed_when_the_run_has_it() -> None:
    from bench import report

    rows = [r for r in _repeated() if r["repeat"] == 0 and r["scenario"] == "latency"]
    rows[0]["core_ns_per_step"] = [80.4, 121.0]
    md = report.markdown({"rows": rows})
    assert "core ns/step before/after |" in md
    assert "| 80 / 121 |" in md and md.count("| – |") >= 1  # the other run has none


def test_markdown_without_pairs_has_no_side_by_side() -> None:
    from bench import report

    md = report.markdown({"rows": [r for r in _repeated() if r["server"] == "peerjs"]})
    assert "Side by side" not in md


def test_compare_takes_repeated_rows() -> None:
    from bench import report

    before = {"rows": [r for r in _repeated() if r["repeat"] == 0]}
    after = {"rows": _repeated()}
    text = report.compare(before, after)
    assert "| relay | peerjs | 100 | – | 3 | 800 → 1,100 (×1.38) |" in text  # first run of A
    again = report.compare(after, after)
    assert "| relay | peerjs | 100 | – | 3 | 1,100 → 1,100 (×1.00) |" in again  # same run


def test_plots_take_repeated_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # a benchmark dependency (make bench-deps)
    from bench import report

    report.plots({"rows": _repeated()}, tmp_path)
    assert (tmp_path / "throughput.png").exists() and (tmp_path / "latency.png").exists()


def test_bench_interleaves_the_servers_run_by_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count-major: at each connection count (or rate) the compared servers run back to
    back, alternating on each repeat."""
    from bench import run

    calls: list[tuple[str, str, float, int]] = []

    def one(self: run.Bench, scenario: str, label: str, proto: str, starter: Any,
            conns: int, **kw: Any) -> dict[str, Any]:
        calls.append((scenario, label, kw.get("rate") or conns, kw["repeat"]))
        return {}

    monkeypatch.setattr(run.Bench, "one", one)
    bench = run.Bench(run.parse(["--conns", "100", "2000", "--rates", "1000", "5000",
                                 "--repeat", "2"]))
    bench.cross()
    bench.latency()
    ours, peer = "signaling-redis-x2", "socketio-redis-x2"
    assert calls == [
        (scen, label, n, r)
        for scen, counts in (("cross", (100, 2000)), ("latency", (1000.0, 5000.0)))
        for n in counts for r in (0, 1) for label in (ours, peer)
    ]
    assert calls[:4] == [("cross", ours, 100, 0), ("cross", peer, 100, 0),
                         ("cross", ours, 100, 1), ("cross", peer, 100, 1)]


def test_repeat_defaults_to_one_run_and_must_be_positive() -> None:
    from bench import run

    assert run.parse([]).repeat == 1
    with pytest.raises(SystemExit):
        run.parse(["--repeat", "0"])


def test_bench_runs_count_major_also_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import run

    calls: list[tuple[str, int, int]] = []

    def one(self: run.Bench, scenario: str, label: str, proto: str, starter: Any,
            conns: int, **kw: Any) -> dict[str, Any]:
        calls.append((label, conns, kw["repeat"]))
        return {}

    monkeypatch.setattr(run.Bench, "one", one)
    run.Bench(run.parse(["--conns", "100", "2000"])).relay()
    assert calls == [(label, n, 0) for n in (100, 2000)
                     for label in ("signaling-memory", "signaling-redis", "peerjs")]


def test_the_alt_interpreter_runs_only_when_named_and_needs_its_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``signaling-memory-alt`` (``make bench-alt``): on request only, beside the others
    run by run, and without ``--alt-python`` it stops with what to pass, before any
    server starts."""
    from bench import run

    calls: list[tuple[str, int]] = []

    def one(self: run.Bench, scenario: str, label: str, proto: str, starter: Any,
            conns: int, **kw: Any) -> dict[str, Any]:
        calls.append((label, kw["repeat"]))
        return {}

    monkeypatch.setattr(run.Bench, "one", one)
    servers = ["signaling-memory", "signaling-memory-alt", "peerjs"]
    run.Bench(run.parse(["--conns", "100", "--repeat", "2", "--servers", *servers])).relay()
    assert calls == [(label, r) for r in (0, 1) for label in servers]
    monkeypatch.setattr(run, "ALT_PYTHON", [])
    with pytest.raises(RuntimeError, match="--alt-python"):
        run.NOACK_SINGLE["signaling-memory-alt"][1](None)


def test_small_ratios_keep_two_significant_digits() -> None:
    from bench import report

    rows = [_row("latency", "signaling-redis-x2", 0, 1000.0, 0.3, 3.5, conns=400, rate=1e4),
            _row("latency", "socketio-redis-x2", 0, 1000.0, 0.3, 712.0, conns=400, rate=1e4)]
    md = report.markdown({"rows": rows})
    assert "| p99 ×0.0049 | – | ×1.00 |" in md  # not ×0.00


def test_redis_command_counts_are_taken_over_a_window() -> None:
    """``Servers.redis_commands`` at two moments: the delta holds what Redis ran between
    them, per command, and nothing it ran before."""
    from bench.servers import Servers, commands_delta
    from tests.support import start_redis

    redis = start_redis()
    try:
        srv = Servers("probe", [], [], redis=redis)
        redis.cli("SET", "before", "1")
        first = srv.redis_commands()
        for i in range(3):
            redis.cli("SET", f"k{i}", "v")
        redis.cli("GET", "k1")
        second = srv.redis_commands()
        assert first is not None and second is not None
        delta = commands_delta(first, second)
        assert delta["set"]["calls"] == 3  # not the SET before the window
        assert delta["get"]["calls"] == 1
        assert delta["get"]["usec"] >= 0
        assert "del" not in delta  # commands it never ran are left out
    finally:
        redis.stop()
        shutil.rmtree(redis.dir, ignore_errors=True)
    assert Servers("peerjs", [], []).redis_commands() is None
