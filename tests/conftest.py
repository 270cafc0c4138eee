from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port for the whole session (flushed per test by
    ``redis_url``)."""
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.cli("FLUSHALL")
    return redis_server.url


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own configuration; the developer's shell does not leak in."""
    for name in list(os.environ):
        if name in ("REDIS_URL", "REDIS_ADDR", "JWT_SECRET", "JWT_PUBLIC_KEY", "RATE_LIMIT"):
            monkeypatch.delenv(name, raising=False)
