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

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError

from ..core.contracts import Claim, Located, Location, Member
from ..core.running import LoopBound
from . import keys
from .lane import Batch, Lane, fail_all
from .scripts import ScriptCall, evalsha, execute, run_scripts, settled

_ALIVE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function conn_of(value)
  return string.match(value, '^[^|]*|([^|]*)')
end
-- A worker's state, read once per script run (a batch of lookups names the same few
-- workers over and over; no script changes a liveness key after reading one).
local node_states = {}
-- A worker's state (a node named in a device's value, not "~")
local function node_state(prefix, node)
  local st = node_states[node]
  if st == nil then
    st = 0
    if redis.call('EXISTS', prefix .. node) == 1 then
      st = 2
    elseif redis.call('EXISTS', prefix .. node .. ':seen') == 1 then
      st = 1
    end
    node_states[node] = st
  end
  return st
end
-- 2: live on a live worker; 1: resumable (parked, or its worker died less than
-- RESUME_WINDOW ago); 0: dead
local function state(prefix, value)
  local node = string.match(value, '^[^|]*')
  if node == '~' then
    local deadline = tonumber(string.match(value, '|(%d+)$') or '0')
    if deadline > now_ms() then return 1 end
    return 0
  end
  return node_state(prefix, node)
end
-- the devices of a user's hash (an HGETALL reply) that are live or resumable
local function live_of(h, prefix)
  local out = {}
  for i = 1, #h, 2 do
    local st = state(prefix, h[i + 1])
    if st == 2 then
      out[#out + 1] = h[i]
      out[#out + 1] = h[i + 1]
    elseif st == 1 then
      out[#out + 1] = h[i]
      out[#out + 1] = '~|' .. conn_of(h[i + 1])
    end
  end
  return out
end
local function live(key, prefix)
  return live_of(redis.call('HGETALL', key), prefix)
end
local function drop_dead(key, prefix)
  local h = redis.call('HGETALL', key)
  local gone = {}
  for i = 1, #h, 2 do
    if state(prefix, h[i + 1]) == 0 then
      redis.call('HDEL', key, h[i])
      gone[#gone + 1] = h[i]
    end
  end
  return gone
end
"""

# KEYS[1] user hash; ARGV: node prefix, device, "node|conn", max devices, node ttl, keep ttl
# A worker that claims is alive: its liveness key is (re)made here too, so a device that
# connects right after Redis lost everything is reachable before the next heartbeat.
_CLAIM = _ALIVE + """
redis.call('SET', ARGV[1] .. string.match(ARGV[3], '^[^|]*'), '1', 'EX', ARGV[5], 'NX')
drop_dead(KEYS[1], ARGV[1])
local prev = redis.call('HGET', KEYS[1], ARGV[2]) or ''
local resumed = 0
if prev ~= '' and state(ARGV[1], prev) == 1 then resumed = 1 end
local others = redis.call('HLEN', KEYS[1])
if prev ~= '' then others = others - 1 end
if others >= tonumber(ARGV[4]) then return {0, prev, 0} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {1, prev, resumed}
"""

# KEYS: user hash, device-rooms set, kept list; ARGV: device, "node|conn"
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('DEL', KEYS[2], KEYS[3])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: user hash, device-rooms set; ARGV: device, "node|conn", conn, window ms,
# room key prefix, keep ttl, member field
_PARK = _ALIVE + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
local parked = '~|' .. ARGV[3] .. '|' .. (now_ms() + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], ARGV[1], parked)
redis.call('EXPIRE', KEYS[1], ARGV[6], 'GT')
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local rk = ARGV[5] .. room
  if redis.call('HGET', rk, ARGV[7]) == ARGV[2] then
    redis.call('HSET', rk, ARGV[7], parked)
    redis.call('EXPIRE', rk, ARGV[6], 'GT')
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[6], 'GT')
return 1
"""

# KEYS: device-rooms set; ARGV: room key prefix, member field, old "node|conn", old conn,
# new "node|conn", keep ttl
_ADOPT = _ALIVE + """
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rk = ARGV[1] .. room
  local v = redis.call('HGET', rk, ARGV[2])
  if v and (v == ARGV[3] or conn_of(v) == ARGV[4]) then
    redis.call('HSET', rk, ARGV[2], ARGV[5])
    redis.call('EXPIRE', rk, ARGV[6])
    out[#out + 1] = room
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return out
"""

# KEYS: hashes; ARGV[1]: node prefix
_LIVE = _ALIVE + """
local res = {}
for i, key in ipairs(KEYS) do res[i] = live(key, ARGV[1]) end
return res
"""

# KEYS: room hash, device-rooms set; ARGV: node prefix, member, value, max members, ttl, room
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
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return others
"""

# KEYS: room hash, device-rooms set; ARGV: member, "node|conn", conn, room
_LEAVE = _ALIVE + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and (v == ARGV[2] or (string.sub(v, 1, 2) == '~|' and conn_of(v) == ARGV[3])) then
  redis.call('SREM', KEYS[2], ARGV[4])
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: hashes; ARGV: ttl, then field and value per key (the heartbeat's re-assertion)
_REASSERT_HASH = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('HSETNX', key, ARGV[2 * i], ARGV[2 * i + 1])
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""

# KEYS: sets; ARGV: ttl, then one member per key
_REASSERT_SET = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SADD', key, ARGV[i + 1])
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""

# KEYS: hashes; ARGV[1]: node prefix.  Fields removed per hash.
_SWEEP = _ALIVE + """
local res = {}
for i, key in ipairs(KEYS) do res[i] = drop_dead(key, ARGV[1]) end
return res
"""


# A heartbeat re-asserts everything every REASSERT_EVERY beats (beats come every
# PRESENCE_TTL/3; the shortest TTL refreshed this way is the watch sets' 2 * PRESENCE_TTL).
REASSERT_EVERY = 3
REASSERT_CHUNK = 500  # keys per script call
_Located = asyncio.Future[Located]
# users per script call of one batched lookup
LOCATE_CHUNK = 500


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _member(field: bytes | str) -> Member:
    user, _, device = _s(field).partition("/")
    return user, device


def _member_field(member: Member) -> str:
    return f"{member[0]}/{member[1]}"  # identifiers never contain "/"


# Decoded locations by their stored form: every lookup of a recipient reads the same few
# values again, and a Location is immutable.  Bounded: emptied when full.
_LOCATIONS: dict[bytes | str, Location] = {}
_LOCATIONS_MAX = 16384


def _location(raw: bytes | str) -> Location:
    loc = _LOCATIONS.get(raw)
    if loc is None:
        if len(_LOCATIONS) >= _LOCATIONS_MAX:
            _LOCATIONS.clear()
        loc = _LOCATIONS[raw] = Location.decode(_s(raw))
    return loc


def _pairs(row: list[bytes]) -> Iterable[tuple[str, Location]]:
    for i in range(0, len(row), 2):
        yield _s(row[i]), _location(row[i + 1])


def _devices(row: list[bytes]) -> dict[str, Location]:
    """A lookup's row (device, location, device, location...) as a dict of its own."""
    if len(row) == 2:  # one device: most users, most of the time
        return {_s(row[0]): _location(row[1])}
    return {_s(row[i]): _location(row[i + 1]) for i in range(0, len(row), 2)}


class RedisPresence(LoopBound):
    def __init__(
        self,
        redis: Redis,
        ttl: int,
        resume_window: int = 30,
        keep_ttl: int | None = None,
        lane: Lane | None = None,
    ) -> None:
        """``ttl``: PRESENCE_TTL (a worker's liveness); ``keep_ttl``: the TTL of entries that
        must outlive a dead worker through its resume window."""
        self._redis = redis
        self._ttl = ttl
        self._window = resume_window
        self._keep = keep_ttl or (2 * ttl + resume_window)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._park = redis.register_script(_PARK)
        self._adopt = redis.register_script(_ADOPT)
        self._live = redis.register_script(_LIVE)
        self._join = redis.register_script(_JOIN)
        self._leave = redis.register_script(_LEAVE)
        self._sweep = redis.register_script(_SWEEP)
        self._reassert_hash = redis.register_script(_REASSERT_HASH)
        self._reassert_set = redis.register_script(_REASSERT_SET)
        self._beats = 0
        self._lookup_lane = lane or Lane(redis)  # the batched lookups (the hot path's lane)
        self._lookup_lane.add_source(self._take_lookups)
        self._beat_lane = Lane(redis)  # the heartbeat's re-assertion (large batches)
        self._reassert_next = True  # the first beat re-asserts
        # the releases and leaves (as commands) made while a re-assertion is on its way
        # (None: none is), and those whose repetition failed: see ``_repeat_late``
        self._late: list[list[Any]] | None = None
        self._late_failed: list[list[Any]] = []
        self._prefix = keys.node_alive_prefix()
        self._locating: list[tuple[Sequence[str], _Located]] = []

    # ------------------------------------------------------------------ devices

    async def claim(self, user: str, device: str, loc: Location, max_devices: int) -> Claim:
        """Register the device's connection.  A connection failure is retried once, on
        fresh connections: after a Redis restart every idle pooled connection is dead and
        fails its first command (the first connects after a restart would get 1011).  A
        claim that did run finds itself the second time (same connection: no previous);
        only if Redis failed between running it and answering would a connection it
        replaced go untold (it then receives nothing and ends with its socket)."""
        claim_keys = [keys.devices(user)]
        args: list[Any] = [self._prefix, device, loc.encode(), max_devices, self._ttl, self._keep]
        try:
            reply = await self._claim(keys=claim_keys, args=args)
        except RedisConnectionError:
            await self._redis.connection_pool.disconnect(inuse_connections=False)
            reply = await self._claim(keys=claim_keys, args=args)
        ok, prev, resumed = reply
        previous = Location.decode(_s(prev)) if prev else None
        return Claim(bool(ok), previous, bool(resumed))

    async def release(self, user: str, device: str, loc: Location) -> bool:
        return bool(await self._undo(
            self._release,
            [keys.devices(user), keys.device_rooms(user, device), keys.kept(user, device)],
            [device, loc.encode()],
        ))

    def _undo(self, script: AsyncScript, keys_: list[str], args: list[Any]) -> Awaitable[Any]:
        """Run a release or a leave, noted for repetition when a re-assertion is on its way
        (``_repeat_late``).  Noted at the call, before it can reach Redis."""
        if self._late is not None:
            self._late.append(evalsha(script, keys_, args))
        return script(keys=keys_, args=args)

    async def park(self, user: str, device: str, loc: Location, window: float) -> bool:
        return bool(
            await self._park(
                keys=[keys.devices(user), keys.device_rooms(user, device)],
                args=[device, loc.encode(), loc.conn, int(window * 1000), keys.room(""),
                      self._keep, _member_field((user, device))],
            )
        )

    async def take_kept(self, user: str, device: str) -> list[bytes]:
        pipe = self._redis.pipeline(transaction=True)
        pipe.lrange(keys.kept(user, device), 0, -1)
        pipe.delete(keys.kept(user, device))
        frames, _ = await pipe.execute()
        return list(frames)

    async def rooms_of(self, member: Member) -> list[str]:
        return sorted(_s(r) for r in await self._redis.smembers(keys.device_rooms(*member)))

    async def adopt_rooms(self, member: Member, old: Location, new: Location) -> list[str]:
        rooms = await self._adopt(
            keys=[keys.device_rooms(*member)],
            args=[keys.room(""), _member_field(member), old.encode(), old.conn, new.encode(),
                  self._keep],
        )
        return sorted(_s(r) for r in rooms)

    def locate_now(self, user: str) -> None:
        return None  # the answer is in Redis: ``locate``

    def locate(self, users: Sequence[str]) -> _Located:
        """Every lookup of one loop tick shares one script call (senders look up their
        recipients on every direct message).  The lookup joins this tick's batch at the
        call; the future holds its answer."""
        fut: _Located = self.running_loop().create_future()
        if not users:
            fut.set_result({})
            return fut
        self._locating.append((users, fut))
        self._lookup_lane.wake()
        return fut

    def _take_lookups(self) -> list[Batch]:
        """The lane's source: every lookup since the last round trip, one script call per
        LOCATE_CHUNK users."""
        if not self._locating:
            return []
        batch, self._locating = self._locating, []
        wanted = list(dict.fromkeys(u for users, _ in batch for u in users))
        chunks = [wanted[i : i + LOCATE_CHUNK] for i in range(0, len(wanted), LOCATE_CHUNK)]
        commands = [
            evalsha(self._live, [keys.devices(u) for u in chunk], [self._prefix])
            for chunk in chunks
        ]
        return [(commands, settled(self._lookup_lane, commands, [self._live],
                                   lambda res: self._located(batch, chunks, res)))]

    @staticmethod
    def _located(
        batch: list[tuple[Sequence[str], _Located]], chunks: list[list[str]],
        result: list[Any] | BaseException,
    ) -> None:
        rows: dict[str, list[bytes]] = {}
        if not isinstance(result, BaseException):
            for chunk, chunk_rows in zip(chunks, result, strict=True):
                if isinstance(chunk_rows, Exception):
                    result = chunk_rows
                    break
                rows.update(zip(chunk, chunk_rows, strict=True))
        if isinstance(result, BaseException):
            fail_all((fut for _, fut in batch), result, "presence closed")
            return
        # each answer decoded on its own: callers own their dicts
        for users, fut in batch:
            if not fut.done():
                if len(users) == 1:  # a direct message's recipient: no comprehension
                    user = users[0]
                    fut.set_result({user: _devices(rows[user])})
                else:
                    fut.set_result({u: _devices(rows[u]) for u in users})

    # ------------------------------------------------------------------ rooms

    async def join(
        self, room: str, member: Member, loc: Location, max_members: int
    ) -> dict[Member, Location] | None:
        others = await self._join(
            keys=[keys.room(room), keys.device_rooms(*member)],
            args=[self._prefix, _member_field(member), loc.encode(), max_members, self._keep,
                  room],
        )
        if others is None:
            return None
        return {_member(f): v for f, v in _pairs(others)}

    async def leave(self, room: str, member: Member, loc: Location) -> bool:
        return bool(await self._undo(
            self._leave,
            [keys.room(room), keys.device_rooms(*member)],
            [_member_field(member), loc.encode(), loc.conn, room],
        ))

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
        """Liveness first; then everything this worker holds re-asserted with HSETNX/SADD
        (restoring what a Redis restart lost, never overwriting a newer claim) and the TTLs
        of the keys involved refreshed.  The re-assertion runs at once when this worker's
        liveness key was gone (Redis restarted, or the worker stalled), else every
        REASSERT_EVERY beats (the TTLs allow it), in scripts of REASSERT_CHUNK keys: with
        tens of thousands of connections per worker a command per key would cost more CPU
        than the connections themselves."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(keys.node_alive(node), b"1", ex=self._ttl, get=True)
        if self._window > 0:
            pipe.set(keys.node_seen(node), b"1", ex=self._ttl + self._window)
        try:
            was_alive = (await pipe.execute())[0] is not None
        except Exception:
            self._reassert_next = True  # whatever Redis lost meanwhile comes back first
            self._lookup_lane.reset()
            raise
        if not was_alive:  # Redis restarted (or this worker stalled): fresh connections
            self._lookup_lane.reset()
        self._beats += 1
        if was_alive and not self._reassert_next and self._beats % REASSERT_EVERY:
            return
        self._reassert_next = True  # until this re-assertion has succeeded
        # noted from here on: the hub's sessions are read below, all at once
        self._late = []
        try:
            await self._reassert(node, devices, rooms, watched)
            self._reassert_next = False
        finally:
            await self._repeat_late()

    async def _reassert(
        self,
        node: str,
        devices: Iterable[tuple[str, str, Location]],
        rooms: Iterable[tuple[str, Member, Location]],
        watched: Iterable[str],
    ) -> None:
        hashes: list[tuple[str, str, str]] = [
            (keys.devices(user), device, loc.encode()) for user, device, loc in devices
        ]
        sets: list[tuple[str, str]] = []
        for room, member, loc in rooms:
            hashes.append((keys.room(room), _member_field(member), loc.encode()))
            sets.append((keys.device_rooms(*member), room))
        watch_sets = [(keys.watchers(user), node) for user in watched]
        calls: list[ScriptCall] = []
        for rows, script, ttl in (
            (hashes, self._reassert_hash, self._keep),
            (sets, self._reassert_set, self._keep),
            (watch_sets, self._reassert_set, self._ttl * 2),
        ):
            for i in range(0, len(rows), REASSERT_CHUNK):
                chunk = rows[i : i + REASSERT_CHUNK]
                args: list[Any] = [ttl]
                for row in chunk:
                    args.extend(row[1:])
                calls.append((script, [row[0] for row in chunk], args))
        for res in await run_scripts(self._beat_lane, calls):
            if isinstance(res, Exception):
                raise res

    async def _repeat_late(self) -> None:
        """Run again every release and leave made while the re-assertion was on its way.
        It read the sessions before they ended, and its HSETNX/SADD may have landed after
        their release: the entry would be back for good (a phantom device on a live
        worker).  Repeating is harmless otherwise: both scripts touch only an entry that
        still holds the ended connection's value.  Repetitions that fail are tried again
        with the next re-assertion.  An unwatch is not repeated: a watch made meanwhile
        would be undone, and a watch set that came back costs only an envelope per change
        that the worker ignores."""
        late, self._late = (self._late or []), None
        late, self._late_failed = self._late_failed + late, []
        if not late:
            return
        try:
            results = await execute(self._beat_lane, late, (self._release, self._leave))
        except Exception:
            self._late_failed = late
            raise
        self._late_failed = [c for c, r in zip(late, results, strict=True)
                             if isinstance(r, Exception)]

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
        """Drop this worker's liveness at once (clean shutdown); its parked devices keep
        their own deadlines."""
        await self._redis.delete(keys.node_alive(node), keys.node_seen(node))

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """The client is shared (its owner closes it); lookups not answered yet fail."""
        for _, fut in self._locating:
            if not fut.done():
                fut.set_exception(ConnectionError("presence closed"))
        self._locating = []
        await self._lookup_lane.close()
        await self._beat_lane.close()
