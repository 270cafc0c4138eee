from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from service.auth import Identity
from service.core.contracts import Location
from service.core.hub import Hub
from service.core.memory import MemoryBackplane, MemoryCluster, MemoryPresence, memory_rate_limiter
from service.core.router import Router
from service.core.session import Session


class TSession(Session):
    """A Session that also records the close requests it made (no __slots__)."""

    closes: list[tuple[int, str]]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Node:
    """One simulated worker: a hub and a router on the shared in-memory cluster."""

    def __init__(
        self, name: str, cluster: MemoryCluster, rate: str, inline: bool = False, **hub_kw: Any
    ) -> None:
        self.hub = Hub(name, MemoryPresence(cluster), MemoryBackplane(cluster), **hub_kw)
        self.router = Router(self.hub, memory_rate_limiter(rate))
        self.inline = inline  # frames go as the edge sends them: ``handle_now`` first
        self._n = 0

    def session(self, user: str, device: str, **kw: Any) -> TSession:
        """A new, not yet connected session on this node."""
        self._n += 1
        closes: list[tuple[int, str]] = []
        session = TSession(
            Identity(user, device, 2_000_000_000),
            Location(self.hub.node_id, f"{self.hub.node_id}.{self._n}"),
            lambda code, reason: closes.append((code, reason)),
            **kw,
        )
        session.closes = closes
        return session

    async def connect(self, user: str, device: str, **kw: Any) -> Session:
        session = self.session(user, device, **kw)
        await self.hub.connect(session)
        return session

    async def send(self, session: Session, **msg: Any) -> None:
        await self.handle(session, json.dumps(msg))
        await settle()

    async def handle(self, session: Session, frame: str) -> None:
        """One frame, the way the edge hands it over (``inline``: the read callback tries
        ``handle_now`` and passes what it refused to ``handle``)."""
        if self.inline and self.router.handle_now(session, frame.encode()):
            return
        await self.router.handle(session, frame)


async def settle() -> None:
    """Let call_soon deliveries of the memory backplane run (no timers involved)."""
    for _ in range(3):
        await asyncio.sleep(0)


def frames(session: Session) -> list[dict[str, Any]]:
    return [json.loads(f) for f in session.take()]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cluster(clock: FakeClock) -> MemoryCluster:
    return MemoryCluster(ttl=15, clock=clock, resume_window=10)


@pytest.fixture(params=[False, True], ids=["handle", "inline"])
def inline(request: pytest.FixtureRequest) -> bool:
    """Every core test runs twice: frames through ``Router.handle`` only, and the way the
    edge hands them over (``handle_now`` first)."""
    return bool(request.param)


@pytest.fixture
def make_node(cluster: MemoryCluster, inline: bool) -> Callable[..., Any]:
    async def make(name: str, rate: str = "1000/second", **kw: Any) -> Node:
        node = Node(name, cluster, rate, inline, **kw)
        await node.hub.start()
        return node

    return make
