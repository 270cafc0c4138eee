"""Smoke test of the benchmark load generator (bench/loadgen.py): ~20 picows connections
against one real server process on the in-process backplane for ~2 s; every message sent
must arrive.  No npm, no peers."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

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
