"""One way to build a redis-py asyncio client for this service."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def make_client(
    url: str, *, timeout: float, max_connections: int = 64, socket_timeout: float | None = None
) -> Redis:
    """A client with a pool that waits (instead of failing) when all connections are busy,
    and no automatic retries: a retried XADD could deliver a message twice, and a failure
    must reach the sender as ``internal``, not hide behind 59 s of retries."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=socket_timeout if socket_timeout is not None else timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)
