"""Presence, rooms and watches in Redis.

- one hash per user, device -> "node|conn" (``sig:dev:<user>``);
- one hash per room, "user/device" -> "node|conn" (``sig:room:<room>``);
- one set per watched user of the nodes watching it (``sig:watch:<user>``);
- one liveness key per worker (``sig:node:<node>``), refreshed by its heartbeat.

Every key has a TTL refreshed by the heartbeats of the workers that hold its entries.  An
entry counts only while its worker's liveness key exists, so entries of a worker that died
stop counting within PRESENCE_TTL even where other workers keep the key alive.  Reads filter
such entries out; only ``sweep`` deletes them, atomically, so each departure is reported by
exactly one worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio import Redis

from ..core.contracts import Claim, Location, Member
from . import keys

_ALIVE = """
local function alive(prefix, value)
  return redis.call('EXISTS', prefix .. string.match(value, '^[^|]*')) == 1
end
local function live(key, prefix)
  local h = redis.call('HGETALL', key)
  local out = {}
  for i = 1, #h, 2 do
    if alive(prefix, h[i + 1]) then
      out[#out + 1] = h[i]
      out[#out + 1] = h[i + 1]
    end
  end
  return out
end
local function drop_dead(key, prefix)
  local h = redis.call('HGETALL', key)
  local gone = {}
  for i = 1, #h, 2 do
    if not alive(prefix, h[i + 1]) then
      redis.call('HDEL', key, h[i])
      gone[#gone + 1] = h[i]
    end
  end
  return gone
end
"""

# KEYS[1] user hash; ARGV: node prefix, device, "node|conn", max devices, ttl
# A worker that claims is alive: its liveness key is (re)made here too, so a device that
# connects right after Redis lost everything is reachable before the next heartbeat.
_CLAIM = _ALIVE + """
redis.call('SET', ARGV[1] .. string.match(ARGV[3], '^[^|]*'), '1', 'EX', ARGV[5], 'NX')
drop_dead(KEYS[1], ARGV[1])
local prev = redis.call('HGET', KEYS[1], ARGV[2]) or ''
local others = redis.call('HLEN', KEYS[1])
if prev ~= '' then others = others - 1 end
if others >= tonumber(ARGV[4]) then return {0, prev} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, prev}
"""

# KEYS[1] hash; ARGV: field, value.  Delete the field only if it still holds the value.
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: hashes; ARGV[1]: node prefix
_LIVE = _ALIVE + """
local res = {}
for i, key in ipairs(KEYS) do res[i] = live(key, ARGV[1]) end
return res
"""

# KEYS[1] room hash; ARGV: node prefix, member, value, max members, ttl
_JOIN = _ALIVE + """
local members = live(KEYS[1], ARGV[1])
local others = {}
local present = false
for i = 1, #members, 2 do
  if members[i] == ARGV[2] then present = true else
    others[#others + 1] = members[i]
    others[#others + 1] = members[i + 1]
  end
end
if not present and #others / 2 >= tonumber(ARGV[4]) then return false end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return others
"""

# KEYS: hashes; ARGV[1]: node prefix.  Fields removed per hash.
_SWEEP = _ALIVE + """
local res = {}
for i, key in ipairs(KEYS) do res[i] = drop_dead(key, ARGV[1]) end
return res
"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _member(field: bytes | str) -> Member:
    user, _, device = _s(field).partition("/")
    return user, device


def _member_field(member: Member) -> str:
    return f"{member[0]}/{member[1]}"  # identifiers never contain "/"


def _pairs(row: list[bytes]) -> Iterable[tuple[str, Location]]:
    for i in range(0, len(row), 2):
        yield _s(row[i]), Location.decode(_s(row[i + 1]))


class RedisPresence:
    def __init__(self, redis: Redis, ttl: int) -> None:
        self._redis = redis
        self._ttl = ttl
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._live = redis.register_script(_LIVE)
        self._join = redis.register_script(_JOIN)
        self._sweep = redis.register_script(_SWEEP)
        self._prefix = keys.node_alive_prefix()

    # ------------------------------------------------------------------ devices

    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        ok, prev = await self._claim(
            keys=[keys.devices(user)],
            args=[self._prefix, device, loc.encode(), max_devices, self._ttl],
        )
        return Claim(bool(ok), Location.decode(_s(prev)) if prev else None)

    async def release(self, user: str, device: str, loc: Location) -> None:
        await self._release(keys=[keys.devices(user)], args=[device, loc.encode()])

    async def locate(self, users: Sequence[str]) -> dict[str, dict[str, Location]]:
        if not users:
            return {}
        rows = await self._live(keys=[keys.devices(u) for u in users], args=[self._prefix])
        return {u: dict(_pairs(row)) for u, row in zip(users, rows, strict=True)}

    # ------------------------------------------------------------------ rooms

    async def join(
        self, room: str, member: Member, loc: Location, max_members: int
    ) -> dict[Member, Location] | None:
        others = await self._join(
            keys=[keys.room(room)],
            args=[self._prefix, _member_field(member), loc.encode(), max_members, self._ttl * 2],
        )
        if others is None:
            return None
        return {_member(f): v for f, v in _pairs(others)}

    async def leave(self, room: str, member: Member, loc: Location) -> bool:
        return bool(
            await self._release(keys=[keys.room(room)], args=[_member_field(member), loc.encode()])
        )

    async def members(self, room: str) -> dict[Member, Location]:
        [row] = await self._live(keys=[keys.room(room)], args=[self._prefix])
        return {_member(f): v for f, v in _pairs(row)}

    # ------------------------------------------------------------------ watches

    async def watch(self, node: str, users: Sequence[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for u in users:
            pipe.sadd(keys.watchers(u), node)
            pipe.expire(keys.watchers(u), self._ttl * 2)
        await pipe.execute()

    async def unwatch(self, node: str, users: Sequence[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for u in users:
            pipe.srem(keys.watchers(u), node)
        await pipe.execute()

    async def watchers(self, user: str) -> set[str]:
        return {_s(n) for n in await self._redis.smembers(keys.watchers(user))}

    # ------------------------------------------------------------------ liveness

    async def heartbeat(
        self,
        node: str,
        devices: Iterable[tuple[str, str, Location]],
        rooms: Iterable[tuple[str, Member, Location]] = (),
        watched: Iterable[str] = (),
    ) -> None:
        """Liveness first, then everything this worker holds re-asserted with HSETNX/SADD
        (restoring what a Redis restart lost, never overwriting a newer claim) and the TTLs
        of the keys involved refreshed."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(keys.node_alive(node), b"1", ex=self._ttl)
        seen: set[str] = set()
        for user, device, loc in devices:
            key = keys.devices(user)
            pipe.hsetnx(key, device, loc.encode())
            if key not in seen:
                seen.add(key)
                pipe.expire(key, self._ttl)
        for room, member, loc in rooms:
            key = keys.room(room)
            pipe.hsetnx(key, _member_field(member), loc.encode())
            if key not in seen:
                seen.add(key)
                pipe.expire(key, self._ttl * 2)
        for user in watched:
            key = keys.watchers(user)
            pipe.sadd(key, node)
            pipe.expire(key, self._ttl * 2)
        await pipe.execute()

    async def sweep(
        self, users: Sequence[str], rooms: Sequence[str]
    ) -> tuple[list[str], dict[str, list[Member]]]:
        if not users and not rooms:
            return [], {}
        hashes = [keys.devices(u) for u in users] + [keys.room(r) for r in rooms]
        rows = await self._sweep(keys=hashes, args=[self._prefix])
        changed = [u for u, row in zip(users, rows[: len(users)], strict=True) if row]
        left = {
            r: [_member(f) for f in row]
            for r, row in zip(rooms, rows[len(users) :], strict=True)
            if row
        }
        return changed, left

    async def mark_dead(self, node: str) -> None:
        """Drop this worker's liveness at once (clean shutdown)."""
        await self._redis.delete(keys.node_alive(node))

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        pass  # the client is shared; its owner closes it
