"""A closed connection is freed when its socket is, by reference counting alone.

Connections are long-lived, so their objects sit in the oldest GC generation; whatever of a
closed one is kept by a reference cycle waits there for a full collection, which scans
every live connection too.  Under churn the worker grew by ~6 KB per closed connection and
the collection that finally came took 0.6 s at 10,000 open connections (optimisations.md,
twenty-second round).  The server runs here with the cyclic GC off (``gc_probe``), so
anything of a connection that only a collection would free is still there to count."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from bench.procstat import tree
from tests.support import ServerProcess, connect, running, server_env, uid

PROBE = Path(__file__).parent / "gc_probe"
# what one connection is made of; none may be left unreachable
CONNECTION_TYPES = (
    "service.transport.LeanWebsocket",
    "service.transport.SignalingServerProtocol",
    "service.core.session.Session",
    "sanic.server.protocols.websocket_protocol.WebSocketProtocol",
    "sanic.http.http1.Http",
    "sanic.request.types.Request",
)


def _probe(server: ServerProcess, out: Path) -> dict[str, dict[str, int]]:
    """Signal the server's processes; their reports summed."""
    pids = tree([server.proc.pid])  # the main process and its workers
    for f in out.glob("*.json"):
        f.unlink()
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while len(list(out.glob("*.json"))) < len(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    total: dict[str, dict[str, int]] = {"garbage": {}, "live": {}}
    for f in out.glob("*.json"):
        report = json.loads(f.read_text())
        for part in ("garbage", "live"):
            for name, n in report[part].items():
                total[part][name] = total[part].get(name, 0) + n
    assert total["garbage"].get("sitecustomize.Marker") == len(pids), total  # probe works
    return total


async def _clean_close(server: ServerProcess) -> None:
    client = await connect(server.ws_url, uid("clean"), "d")
    await client.close()


async def _drop(server: ServerProcess) -> None:
    """No close frame: the device is parked for the resume window, then released."""
    client = await connect(server.ws_url, uid("drop"), "d")
    client.ws.transport.abort()


async def _too_big(server: ServerProcess) -> None:
    client = await connect(server.ws_url, uid("big"), "d")
    await client.send_raw("x" * 2048)  # over MAX_MESSAGE_BYTES: closed 1009 by the server
    await asyncio.wait_for(client.ws.wait_closed(), 10)
    assert client.ws.close_code == 1009


async def _replaced(server: ServerProcess) -> None:
    user = uid("again")
    first = await connect(server.ws_url, user, "d")
    second = await connect(server.ws_url, user, "d")  # the same device: the first goes
    await asyncio.wait_for(first.ws.wait_closed(), 10)
    assert first.ws.close_code == 4009
    await second.close()


async def _abuse(server: ServerProcess) -> None:
    """Far over the rate limit: closed 1008 without a close handshake."""
    client = await connect(server.ws_url, uid("abuse"), "d")
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(200):
            await client.send(type="candidate", to=uid("nobody"), payload={"c": 1})
    await asyncio.wait_for(client.ws.wait_closed(), 10)
    # the close frame, unless the reset overtook it
    assert client.ws.close_code in (1008, 1006), client.ws.close_code


async def _rejected(server: ServerProcess) -> None:
    """Answered 429 at the upgrade (the user's one device is connected)."""
    user = uid("many")
    first = await connect(server.ws_url, user, "d1")
    with pytest.raises(websockets.InvalidStatus):
        await connect(server.ws_url, user, "d2")
    await first.close()


async def test_closed_connections_leave_nothing_for_the_cyclic_gc(tmp_path: Path) -> None:
    env = server_env(
        None, PYTHONPATH=str(PROBE), GC_PROBE_DIR=str(tmp_path), GC_PROBE_OFF="1",
        RESUME_WINDOW="1",
        MAX_DEVICES_PER_USER="1", MAX_MESSAGE_BYTES="1024", RATE_LIMIT="2/second",
    )
    with running(env) as server:
        for way in (_clean_close, _drop, _too_big, _replaced, _abuse, _rejected):
            for _ in range(5):
                await way(server)
        # every connection (and parked device) gone from the worker, then nothing of them
        # may be left unreachable
        deadline = time.monotonic() + 20
        report: dict[str, Any] = _probe(server, tmp_path)
        while report["live"].get("service.transport.LeanWebsocket", 0) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            report = _probe(server, tmp_path)
        assert not report["live"].get("service.transport.LeanWebsocket"), report
        assert not report["live"].get("service.core.session.Session"), report
        left = {t: report["garbage"][t] for t in CONNECTION_TYPES if t in report["garbage"]}
        assert left == {}, report
