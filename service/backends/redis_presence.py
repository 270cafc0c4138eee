"""Presence in Redis: one hash per user (device -> "node|conn") with a TTL, plus one
liveness key per worker.  A device counts as online only while its worker's liveness key
exists, so devices of a worker that died vanish within PRESENCE_TTL even when other
workers keep the user's hash alive; the scripts below drop such fields as they meet them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio import Redis

from ..core.contracts import Claim, Location
from . import keys

# Shared prologue: walk one user's hash, keep fields whose node is alive, delete the rest.
_LIVE = """
local function live(key, prefix)
  local h = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #h, 2 do
    local node = string.match(h[i + 1], '^[^|]*')
    if redis.call('EXISTS', prefix .. node) == 1 then
      out[#out + 1] = h[i]
      out[#out + 1] = h[i + 1]
    else
      redis.call('HDEL', key, h[i])
    end
  end
  return out
end
"""

# KEYS[1] user hash; ARGV: node prefix, device, "node|conn", max devices, ttl
_CLAIM = _LIVE + """
local devs = live(KEYS[1], ARGV[1])
local prev = ''
local others = 0
for i = 1, #devs, 2 do
  if devs[i] == ARGV[2] then prev = devs[i + 1] else others = others + 1 end
end
if others >= tonumber(ARGV[4]) then return {0, prev} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, prev}
"""

# KEYS[1] user hash; ARGV: device, "node|conn"
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: user hashes; ARGV[1]: node prefix
_LOCATE = _LIVE + """
local res = {}
for i, key in ipairs(KEYS) do res[i] = live(key, ARGV[1]) end
return res
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisPresence:
    def __init__(self, redis: Redis, ttl: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._locate = redis.register_script(_LOCATE)
        self._closed = False

    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        ok, prev = await self._claim(
            keys=[keys.devices(user)],
            args=[keys.node_alive_prefix(), device, loc.encode(), max_devices, self._ttl],
        )
        return Claim(bool(ok), Location.decode(_s(prev)) if prev else None)

    async def release(self, user: str, device: str, loc: Location) -> None:
        await self._release(keys=[keys.devices(user)], args=[device, loc.encode()])

    async def locate(self, users: Sequence[str]) -> dict[str, dict[str, Location]]:
        if not users:
            return {}
        rows = await self._locate(
            keys=[keys.devices(u) for u in users], args=[keys.node_alive_prefix()]
        )
        return {
            user: {_s(row[i]): Location.decode(_s(row[i + 1])) for i in range(0, len(row), 2)}
            for user, row in zip(users, rows, strict=True)
        }

    async def heartbeat(self, node: str, devices: Iterable[tuple[str, str, Location]]) -> None:
        """Liveness first, then each local device re-asserted with HSETNX (which restores
        what a Redis restart lost, and never overwrites a newer connection's claim)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(keys.node_alive(node), b"1", ex=self._ttl)
        seen: set[str] = set()
        for user, device, loc in devices:
            key = keys.devices(user)
            pipe.hsetnx(key, device, loc.encode())
            if user not in seen:
                seen.add(user)
                pipe.expire(key, self._ttl)
        await pipe.execute()

    async def mark_dead(self, node: str) -> None:
        """Drop this worker's liveness at once (clean shutdown)."""
        await self._redis.delete(keys.node_alive(node))

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        self._closed = True  # the client is shared; its owner closes it
