"""One worker's wiring: the only place concrete backends are chosen and joined together.

``Runtime.build(settings)`` picks Redis or the in-process twins; ``start()`` and ``close()``
run once per worker process from the Sanic listeners (``close()`` is safe twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .auth import Verifier
from .config import Settings
from .core.contracts import Backplane, Presence, RateLimiter
from .core.hub import Hub, new_node_id
from .core.memory import MemoryBackplane, MemoryCluster, MemoryPresence, memory_rate_limiter
from .core.router import Router
from .ice import ice_fields
from .metrics import PromStats

log = logging.getLogger("signaling")


class Runtime:
    def __init__(
        self,
        settings: Settings,
        presence: Presence,
        backplane: Backplane,
        limiter: RateLimiter,
        clients: list[Any],
    ) -> None:
        self.settings = settings
        self.node_id = new_node_id()
        self.verifier = Verifier(settings)
        self.stats = PromStats()
        self.hub = Hub(
            self.node_id,
            presence,
            backplane,
            max_devices_per_user=settings.max_devices_per_user,
            heartbeat_interval=settings.heartbeat_interval,
            token_expiring_notice=settings.token_expiring_notice,
            resume_window=settings.resume_window,
            resume_max_messages=settings.resume_max_messages,
            takeover_probe=settings.takeover_probe,
            stats=self.stats,
        )
        self.router = Router(
            self.hub,
            limiter,
            verify=self.verifier.verify,
            extras=lambda identity: ice_fields(settings, identity.user_id),
            max_rooms_per_connection=settings.max_rooms_per_connection,
            max_room_members=settings.max_room_members,
        )
        self.limiter = limiter
        # one flag for every worker of this instance (a multiprocessing value the app hands
        # over; None in a lone process): the first worker to drain turns the others' /ready
        # and upgrades away too, so a balancer never sees a mix of 200 and 503 while the
        # workers' stop listeners start a few milliseconds apart
        self.instance_drain: Any = None
        self._draining = False
        self._clients = clients
        self._closed = False

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        if settings.redis_url is None:
            cluster = MemoryCluster(
                ttl=settings.presence_ttl,
                resume_window=settings.resume_window,
                resume_max_messages=settings.resume_max_messages,
            )
            return cls(
                settings,
                MemoryPresence(cluster),
                MemoryBackplane(cluster),
                memory_rate_limiter(settings.rate_limit),
                [],
            )
        from .backends.lane import Lane
        from .backends.redis_backplane import RedisBackplane
        from .backends.redis_client import make_client
        from .backends.redis_limits import redis_rate_limiter
        from .backends.redis_presence import RedisPresence

        url, timeout = settings.redis_url, settings.redis_timeout
        redis = make_client(url, timeout=timeout)
        reader = make_client(
            url, timeout=timeout, max_connections=2,
            socket_timeout=settings.inbox_block_ms / 1000 + timeout + 5,
        )
        stats = PromStats()
        # one connection for the hot path's batches: limiter, lookups and writes of a tick
        # travel together
        hot = Lane(redis)
        backplane = RedisBackplane(
            redis,
            reader,
            ttl=settings.keep_ttl,
            maxlen=settings.inbox_maxlen,
            keep_max=settings.resume_max_messages,
            keep_ttl=settings.presence_ttl + settings.resume_window,
            read_count=settings.inbox_read_count,
            block_ms=settings.inbox_block_ms,
            stats=stats,
            lane=hot,
        )
        return cls(
            settings,
            RedisPresence(
                redis, settings.presence_ttl, settings.resume_window, settings.keep_ttl, hot
            ),
            backplane,
            redis_rate_limiter(url, redis, settings.rate_limit, hot),
            [redis, reader],
        )

    @property
    def draining(self) -> bool:
        """True once this worker, or any worker of this instance, started to drain."""
        shared = self.instance_drain
        return self._draining or (shared is not None and bool(shared.value))

    def start_draining(self) -> None:
        """Refuse readiness and new upgrades from now on, here and in the sibling workers."""
        self._draining = True
        if self.instance_drain is not None:
            self.instance_drain.value = 1

    def serving(self) -> None:
        """A worker that starts serves: Sanic's manager starts none while the instance stops,
        so a flag left by a worker that was restarted on its own is cleared here."""
        self._draining = False
        if self.instance_drain is not None:
            self.instance_drain.value = 0

    @property
    def clustered(self) -> bool:
        return self.settings.redis_url is not None

    async def start(self) -> None:
        await self.hub.start()

    async def ready(self) -> bool:
        """Answerable now: not draining, and the backplane store replies within its timeout."""
        if self.draining:
            return False
        try:
            return await asyncio.wait_for(
                self.hub.presence.ping(), timeout=self.settings.redis_timeout
            )
        except Exception:
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._draining = True  # this worker only: a lone worker's stop is not the instance's
        mark_dead = getattr(self.hub.presence, "mark_dead", None)
        await self.hub.close()
        if mark_dead is not None:
            with contextlib.suppress(Exception):
                await mark_dead(self.node_id)
        with contextlib.suppress(Exception):
            await self.limiter.close()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
