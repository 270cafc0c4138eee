"""The live cluster of the deployment tests: a private redis-server and two signaling
instances on it (as in docker-compose.yml), with traffic that makes every metric family of
the service appear in /metrics — messages of several types across instances, an error
frame, a refused upgrade, rate-limit hits, a closed connection, and a short Redis outage
for the backplane errors — and two clients left connected."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.support import (
    RedisServer,
    ServerProcess,
    server_env,
    start_redis,
    start_server,
    token,
)


@dataclass
class LiveCluster:
    redis: RedisServer
    servers: list[ServerProcess]
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def metrics(self, server: ServerProcess) -> str:
        status, body = server.get("/metrics")
        assert status == 200, body
        return body


def connect_ws(stack: contextlib.ExitStack, url: str, user: str, device: str,
               ) -> tuple[Any, dict[str, Any]]:
    """A synchronous websockets client (its own thread answers pings), closed by ``stack``,
    and its welcome frame."""
    from websockets.sync.client import connect

    ws = stack.enter_context(connect(f"{url}?token={token(user, device)}", open_timeout=10))
    welcome = json.loads(ws.recv(timeout=5))
    assert welcome["type"] == "welcome", welcome
    return ws, dict(welcome)


def open_client(stack: contextlib.ExitStack, url: str, user: str, device: str) -> Any:
    return connect_ws(stack, url, user, device)[0]


def recv_until(
    ws: Any, pred: Callable[[dict[str, Any]], bool], timeout: float = 5
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if pred(msg):
            return dict(msg)


def send(ws: Any, **msg: Any) -> None:
    ws.send(json.dumps(msg))


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if pred():
                return True
        time.sleep(0.1)
    return False


def _generate_traffic(cluster: LiveCluster) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    a, b = cluster.servers
    alice = open_client(cluster.stack, a.ws_url, "deploy-alice", "phone")
    bob = open_client(cluster.stack, b.ws_url, "deploy-bob", "laptop")

    # an offer and an answer across the two instances (through the Redis backplane)
    send(alice, type="offer", to="deploy-bob", payload={"sdp": "o"}, id="o1")
    assert recv_until(alice, lambda m: m.get("id") == "o1")["type"] == "ack"
    assert recv_until(bob, lambda m: m.get("type") == "offer")["from"] == "deploy-alice"
    send(bob, type="answer", to="deploy-alice", payload={"sdp": "a"}, id="a1")
    assert recv_until(alice, lambda m: m.get("type") == "answer")["from"] == "deploy-bob"
    send(alice, type="presence", users=["deploy-bob"])
    recv_until(alice, lambda m: m.get("type") == "presence")

    # an error frame, and a refused upgrade
    alice.send("not json")
    assert recv_until(alice, lambda m: m.get("type") == "error")["code"] == "bad_json"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{a.ws_url}?token=not-a-jwt", open_timeout=10)
    assert refused.value.response.status_code == 401

    # rate-limit hits (RATE_LIMIT=5/second), then a closed connection (duration histogram)
    with contextlib.ExitStack() as own:
        carol = open_client(own, b.ws_url, "deploy-carol", "tab")
        for i in range(12):
            send(carol, type="ping", id=f"p{i}")
        recv_until(carol, lambda m: m.get("code") == "rate_limited")

    # a short Redis outage: backplane errors on the instances, then recovery
    port = cluster.redis.port
    cluster.redis.stop()
    send(alice, type="offer", to="deploy-bob", payload={"sdp": "lost"}, id="o2")

    def errors_counted() -> bool:
        return any("signaling_backplane_errors_total{" in cluster.metrics(s)
                   for s in cluster.servers)

    assert _wait(errors_counted, 15), "no backplane error counted during the Redis outage"
    cluster.redis = start_redis(port=port)
    for s in cluster.servers:
        assert _wait(lambda s=s: s.get("/ready")[0] == 200, 20), f"not ready again:\n{s.log()}"

    def active_both() -> bool:
        return all("signaling_active_connections 1.0" in cluster.metrics(s)
                   for s in cluster.servers)

    assert _wait(active_both, 10), [cluster.metrics(s) for s in cluster.servers]


@pytest.fixture(scope="package")
def live_cluster() -> Iterator[LiveCluster]:
    redis = start_redis()
    cluster = LiveCluster(redis, [])
    env = server_env(redis.url, PRESENCE_TTL="3", REDIS_TIMEOUT="0.5", RATE_LIMIT="5/second")
    try:
        cluster.servers = [start_server(env), start_server(env)]
        _generate_traffic(cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.stack.close()
        for s in cluster.servers:
            s.stop()
        cluster.redis.stop()
