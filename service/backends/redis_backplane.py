"""Cross-worker delivery through Redis Streams consumer groups (no pub/sub).

Each worker owns one inbox stream ``sig:inbox:<node>`` with consumer group ``sig``.  Senders
``XADD … NOMKSTREAM MAXLEN ~ N`` to the inbox of the worker that holds the recipient.  Every
``send`` of one event-loop tick goes out in one round trip, from a single writer task, and
the envelopes of one tick bound for the same inbox travel as one stream entry (a msgpack
array, at most ENTRY_ENVELOPES of them, ENTRY_BYTES of frames): one XADD, one entry id, one
acknowledgement for the lot, and one sender's messages keep their order.  One read is out
at a time: while the writer's lane is busy it rides that lane's round trips (no ``BLOCK``),
else it ``XREADGROUP … BLOCK``s on the reader's own connection (socket timeout above the
block time).  The reader hands envelopes to the hub; it ``XACK``s them with its next read
(the same round trip) and trims the stream below them (``XTRIM MINID ~``: whole stream nodes
only, much cheaper for Redis than ``XDEL``), so payloads stay in Redis while in transit and
at most one stream node (~100 entries) longer.

NOMKSTREAM is what makes a send to a dead worker fail loudly: its inbox expired (the TTL is
refreshed by its heartbeat), the XADD returns nil and the sender gets ``peer_offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..core.contracts import (
    Envelope,
    EnvelopeSink,
    Location,
    NullStats,
    RouteOutcome,
    Stats,
    envelope_of,
)
from ..core.running import LoopBound, settle
from . import keys
from .lane import Batch, Lane, Packed, bulk, pack, resp_args
from .redis_presence import _ALIVE, _devices, _s
from .scripts import evalsha, settled

log = logging.getLogger("signaling.backplane")

# (stream or kept-list key, the envelope or None for a kept frame, frame, future)
_Pending = tuple[str, "Envelope | None", bytes, "asyncio.Future[bool]"]
# (user, only, skip, frame, ts, sender, then): a ``route_then`` call
_Route = tuple[str, str, str, bytes, int, int, "Callable[[RouteOutcome], None]"]
_KIND = {
    "deliver": b"d", "members": b"m", "kick": b"k", "kicked": b"K", "presence": b"p",
    "parked": b"P",
}
_KIND_BACK = {v: k for k, v in _KIND.items()}
_KIND_S = {k: v.decode() for k, v in _KIND.items()}
_KIND_S_BACK = {v: k for k, v in _KIND_S.items()}
# Bounds of one stream entry (so MAXLEN bounds the inbox in bytes too): envelopes, and the
# bytes of their frames (a larger frame travels alone).
ENTRY_ENVELOPES = 64
ENTRY_BYTES = 64 * 1024
BATCH_FIELD = b"b"
READ_BACKOFF_S = 0.05  # the first wait after a failed inbox read (then doubling, up to 2 s)
# kind, user, devices (","-joined), frame, conn, ts
_Row = tuple[str, str, str, bytes, str, int]
_encoder = msgspec.msgpack.Encoder()
_ROW_HEAD = b"\x96"  # a row's msgpack array header: six fields
_rows = msgspec.msgpack.Decoder(list[_Row])
# a message's ARGV in ``_ROUTE`` but its row's head (cached per user): sender, only, skip,
# head, tail
_ROUTE_ARGS = b"$%d\r\n%b\r\n" * 3 + b"%b" + b"$%d\r\n%b\r\n"
HEAD_CACHE_MAX = 16384  # recipients whose key and row head are kept made


# KEYS: the user's device hash, the device's kept list; ARGV: device, frame, max, ttl,
# node prefix.  Keeps the frame only while the device is still parked: a sender that
# looked it up as parked just before it resumed must route the frame again, not leave it
# in a list nobody will read.
_KEEP = _ALIVE + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or state(ARGV[5], v) ~= 1 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


# KEYS as ``_KEEP``'s; ARGV: device, max, ttl, node prefix, then the frames (oldest first).
# Puts them at the head of the list, ahead of what was kept since (``keep_first``).
_KEEP_FIRST = _ALIVE + """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v or state(ARGV[4], v) ~= 1 then return 0 end
for i = #ARGV, 5, -1 do redis.call('LPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


# A tick's direct messages, each looked up and queued in one step (``route``).  KEYS: each
# message's recipient device hash; ARGV: node prefix, this worker, inbox key prefix, MAXLEN,
# ENTRY_ENVELOPES, ENTRY_BYTES, then five per message: sender ("!" before it: held back
# since an earlier call), only ("" for all), skip ("" for none), and its batch row
# (``encode_batch``'s) without the devices: the head (array header, kind, user) and the
# tail (frame, conn, ts).  Each message's reply is the count of devices queued, or
# (nothing queued: a device here or parked, or its sender held back or an earlier message
# of its sender in this call not queued) its recipient's live devices, as
# ``_LIVE`` answers.  Envelopes for one inbox share entries within the bounds, as
# ``_take_sends`` makes them.
_ROUTE = _ALIVE + """
local prefix, me, inboxes, maxlen = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_n, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local function str_header(n)
  if n < 32 then return string.char(160 + n) end
  if n < 256 then return string.char(217, n) end
  return string.char(218, math.floor(n / 256), n % 256)
end
local function array_header(n)
  if n < 16 then return string.char(144 + n) end
  return string.char(220, math.floor(n / 256), n % 256)
end
local open, order, gone = {}, {}, {}
local function flush(node)
  local e = open[node]
  open[node] = nil
  local r = redis.call('XADD', inboxes .. node, 'NOMKSTREAM', 'MAXLEN', '~', maxlen, '*',
                       'b', array_header(e.n) .. table.concat(e.rows))
  if not r then gone[node] = true end
end
-- A row for ``node``'s entry: its head, its devices, its tail (the parts are joined once,
-- by the entry's table.concat: no string per row)
local function add(node, head, devices, tail)
  local size = #tail
  local e = open[node]
  if e and (e.n >= max_n or e.bytes + size > max_bytes) then
    flush(node)
    e = nil
  end
  if not e then
    e = {rows = {}, n = 0, k = 0, bytes = 0}
    open[node] = e
    order[#order + 1] = node
  end
  local rows, k = e.rows, e.k
  rows[k + 1] = head
  rows[k + 2] = str_header(#devices)
  rows[k + 3] = devices
  rows[k + 4] = tail
  e.k = k + 4
  e.n = e.n + 1
  e.bytes = e.bytes + size
end
local out, sent, stopped = {}, {}, {}
-- The general case: message i (its ARGV from a + 1), its recipient's hash ``h``.
local function general(i, a, h, sender, only, skip)
  local row = live_of(h, prefix)
  local by_node, nodes, fits = {}, {}, not stopped[sender]
  if fits then
    for j = 1, #row, 2 do
      local device = row[j]
      if (only == '' or device == only) and device ~= skip then
        local node = string.match(row[j + 1], '^[^|]*')
        if node == me or node == '~' then
          fits = false
          break
        end
        local list = by_node[node]
        if not list then
          list = {}
          by_node[node] = list
          nodes[#nodes + 1] = node
        end
        list[#list + 1] = device
      end
    end
  end
  if fits then
    local parts = {}
    for _, node in ipairs(nodes) do
      add(node, ARGV[a + 4], table.concat(by_node[node], ','), ARGV[a + 5])
      parts[#parts + 1] = {node, #by_node[node]}
    end
    sent[i] = parts
    out[i] = 0
  else
    stopped[sender] = true
    out[i] = row
  end
end
for i = 1, #KEYS do
  local a = 6 + (i - 1) * 5
  local sender, only, skip = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if string.byte(sender, 1) == 33 then stopped[sender] = true end  -- '!': held back
  local h = redis.call('HGETALL', KEYS[i])
  -- The common case without the general one's tables (a third of the script's cost per
  -- message): one device, live on another worker.
  local node
  if #h == 2 and not stopped[sender] and (only == '' or h[1] == only) and h[1] ~= skip then
    node = string.match(h[2], '^[^|]*')
    if node == me or node == '~' or node_state(prefix, node) ~= 2 then node = nil end
  end
  if node then
    add(node, ARGV[a + 4], h[1], ARGV[a + 5])
    sent[i] = node  -- one device
    out[i] = 0
  else
    general(i, a, h, sender, only, skip)
  end
end
for _, node in ipairs(order) do
  if open[node] then flush(node) end
end
for i, parts in pairs(sent) do
  local n = 0
  if type(parts) == 'string' then  -- one device on that node
    if not gone[parts] then n = 1 end
  else
    for _, p in ipairs(parts) do
      if not gone[p[1]] then n = n + p[2] end
    end
  end
  out[i] = n
end
return out
"""


def _tell(then: Callable[[RouteOutcome], None], outcome: RouteOutcome) -> None:
    """A route's outcome to its caller (one caller's bug must not cost the others theirs)."""
    try:
        then(outcome)
    except Exception:
        log.exception("a route's outcome callback failed")


def _stream_id(v: bytes | str) -> tuple[int, int]:
    ms, _, seq = _s(v).partition("-")
    return int(ms), int(seq or 0)


def fields_of_kept(key: str) -> tuple[str, str]:
    user, _, device = key[len(keys.kept("", "")) - 1 :].partition("/")
    return user, device


def encode_envelope(env: Envelope) -> dict[bytes, bytes]:
    return {
        b"k": _KIND[env.kind],
        b"u": env.user.encode(),
        b"d": ",".join(env.devices).encode(),  # identifiers never contain ","
        b"f": env.frame,
        b"c": env.conn.encode(),
        b"t": str(env.ts).encode(),
    }


def decode_envelope(fields: dict[bytes, bytes]) -> Envelope:
    """A single-envelope entry (the format before batches; still read)."""
    devices = fields.get(b"d", b"").decode()
    return Envelope(
        _KIND_BACK[fields[b"k"]],
        fields[b"u"].decode(),
        tuple(devices.split(",")) if devices else (),
        fields.get(b"f", b""),
        fields.get(b"c", b"").decode(),
        int(fields.get(b"t", b"0") or 0),
    )


def encode_batch(envelopes: list[Envelope]) -> bytes:
    """The value of one entry's BATCH_FIELD: the envelopes as one msgpack array."""
    return _encoder.encode([
        (_KIND_S[e.kind], e.user, ",".join(e.devices), e.frame, e.conn, e.ts)  # no "," in ids
        for e in envelopes
    ])


def decode_entry(fields: Any) -> list[Envelope]:
    """The envelopes of one stream entry (``fields``: the flat field/value list of the
    reply, or a dict); raises on an entry that is not ours."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    batch = fields.get(BATCH_FIELD)
    if batch is None:
        return [decode_envelope(fields)]
    return [
        envelope_of(_KIND_S_BACK[k], u, tuple(d.split(",")) if d else (), f, c, t)
        for k, u, d, f, c, t in _rows.decode(batch)
    ]


def _entries(reply: Any) -> Iterator[tuple[Any, Any]]:
    """(id, fields) of an XREADGROUP reply: RESP3 (a map) or RESP2 (pairs); nil: none."""
    if not reply:
        return
    streams = reply.values() if isinstance(reply, dict) else (e for _, e in reply)
    for entries in streams:
        yield from entries


def _bounded(items: list[_Pending]) -> Iterator[list[_Pending]]:
    """``items`` in order, cut into runs within ENTRY_ENVELOPES and ENTRY_BYTES."""
    run: list[_Pending] = []
    size = 0
    for item in items:
        env = item[1]
        n = len(env.frame) if env is not None else 0
        if run and (len(run) >= ENTRY_ENVELOPES or size + n > ENTRY_BYTES):
            yield run
            run, size = [], 0
        run.append(item)
        size += n
    if run:
        yield run


class _Made:
    """A worker's commands, or their parts, that never change: made once at ``start``, not
    argument by argument for every round trip (the reads and the route call's head cost a
    worker 15 and 8 µs a round trip when packed from their arguments)."""

    __slots__ = ("route_args", "evalsha", "read_block", "read_now", "_xack", "_xtrim")

    def __init__(self, node: str, sha: str, maxlen: int, count: int, block_ms: int) -> None:
        inbox = keys.inbox(node).encode()
        self.route_args = resp_args((
            keys.node_alive_prefix(), node, keys.inbox(""), maxlen, ENTRY_ENVELOPES,
            ENTRY_BYTES))
        self.evalsha = resp_args(("EVALSHA", sha))  # the key count follows
        head = [b"XREADGROUP", b"GROUP", keys.GROUP.encode(), keys.CONSUMER.encode(),
                b"COUNT", b"%d" % count]
        tail = [b"STREAMS", inbox, b">"]
        self.read_block = Packed(pack([[*head, b"BLOCK", b"%d" % block_ms, *tail]]))
        self.read_now = Packed(pack([[*head, *tail]]))
        self._xack = bulk(b"XACK") + bulk(inbox) + bulk(keys.GROUP.encode())
        self._xtrim = (b"*5\r\n" + bulk(b"XTRIM") + bulk(inbox) + bulk(b"MINID")
                       + bulk(b"~"))

    def xack(self, ids: list[Any]) -> Packed:
        """``XACK`` of ``ids`` (stream ids as Redis sent them: bytes, or str)."""
        return Packed(b"".join((b"*%d\r\n" % (3 + len(ids)), self._xack,
                                *(bulk(i if type(i) is bytes else _s(i).encode())
                                  for i in ids))))

    def xtrim(self, last: Any) -> Packed:
        """``XTRIM MINID ~`` just above ``last``: what was read up to it can go."""
        ms, _, seq = _s(last).partition("-")
        return Packed(self._xtrim + bulk(b"%s-%d" % (ms.encode(), int(seq) + 1)))


class RedisBackplane(LoopBound):
    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        *,
        ttl: int,
        maxlen: int = 10000,
        keep_max: int = 1000,
        keep_ttl: int | None = None,
        read_count: int = 512,
        block_ms: int = 1000,
        stats: Stats | None = None,
        lane: Lane | None = None,
    ) -> None:
        """``reader`` must be a client of its own whose socket timeout exceeds ``block_ms``.
        ``ttl``: how long this worker's inbox outlives its last heartbeat (so that a device
        resuming elsewhere can salvage what it held); ``keep_max``/``keep_ttl`` bound the
        frames kept for parked devices."""
        self._redis = redis
        self._keep_script = redis.register_script(_KEEP)
        self._keep_first_script = redis.register_script(_KEEP_FIRST)
        self._keep_max = keep_max
        self._keep_ttl = keep_ttl or ttl
        self._reader = reader
        self._lane = lane or Lane(redis)  # the writer's batches (shared with the hot path)
        self._lane.add_source(self._take_sends)
        self._route_script = redis.register_script(_ROUTE)
        self._routes: list[_Route] = []
        self._stopped: set[int] = set()  # senders held back until ``resume``
        self._heads: dict[str, tuple[bytes, bytes]] = {}  # see ``_take_routes``
        self._lane.add_source(self._take_routes)
        self._unacked: list[Any] = []  # ids read and delivered, acknowledged with the next read
        self._inbox_lane = Lane(reader)  # the reader's own connection
        self._inbox_lane.add_source(self._take_read)
        self._lane.add_rider(self._ride_read)
        self._read_due = False  # see ``_take_read``
        self._on_read_only = functools.partial(self._on_read, False)
        self._on_read_acked = functools.partial(self._on_read, True)
        self._retry: asyncio.TimerHandle | None = None  # the next read after a failure
        self._backoff = READ_BACKOFF_S
        self._ttl = ttl
        self._maxlen = maxlen
        self._count = read_count
        self._block = block_ms
        self._stats: Stats = stats or NullStats()
        self._node: str | None = None
        self._made: _Made | None = None  # this worker's fixed command parts (``start``)
        self._sink: EnvelopeSink | None = None
        self._pending: list[_Pending] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @property
    def inbox(self) -> str:
        assert self._node is not None, "start() first"
        return keys.inbox(self._node)

    async def start(self, node: str, sink: EnvelopeSink) -> None:
        self._node, self._sink = node, sink
        self._made = _Made(node, self._route_script.sha, self._maxlen, self._count,
                           self._block)
        await self._ensure_group()
        # loaded now, not by the first routes' NOSCRIPT (whose senders would be held back)
        await self._redis.script_load(_ROUTE)
        await self._lane.connect()
        self._read_again()

    async def _ensure_group(self) -> None:
        """Create the inbox and its group; id 0 so nothing added meanwhile is skipped."""
        try:
            await self._redis.xgroup_create(self.inbox, keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._redis.expire(self.inbox, self._ttl)

    async def heartbeat(self) -> None:
        """Keep this worker's inbox alive; recreate it if Redis lost it."""
        if self._node is None:
            return
        if not await self._redis.expire(self.inbox, self._ttl):
            await self._ensure_group()

    # ------------------------------------------------------------------ writing

    def send(self, node: str, envelope: Envelope) -> asyncio.Future[bool]:
        """Queue for this tick's pipeline; the future says whether ``node``'s inbox took it
        (False: that worker is gone) or raises if Redis failed (outcome unknown)."""
        return self._submit(keys.inbox(node), envelope, b"")

    def keep(self, user: str, device: str, frame: bytes) -> asyncio.Future[bool]:
        """Keep a frame for a parked device, in the same ordered pipeline as ``send``."""
        return self._submit(keys.kept(user, device), None, frame)

    async def keep_first(self, user: str, device: str, frames: list[bytes]) -> bool:
        """Keep frames ahead of those kept already (rare: a race with a park), in a call
        of its own: their order against ``keep``'s appends does not matter."""
        if self._closed:
            raise ConnectionError("backplane closed")
        kept = await self._keep_first_script(
            keys=[keys.devices(user), keys.kept(user, device)],
            args=[device, self._keep_max, self._keep_ttl, keys.node_alive_prefix(), *frames],
        )
        return bool(kept == 1)

    def _submit(self, key: str, env: Envelope | None, frame: bytes) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = self.running_loop().create_future()
        if self._closed:
            fut.set_exception(ConnectionError("backplane closed"))
            return fut
        self._pending.append((key, env, frame, fut))
        self._lane.wake()
        return fut

    def route(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int,
    ) -> asyncio.Future[int | dict[str, Location]]:
        """Joins this tick's ``_ROUTE`` call (see the contract)."""
        fut: asyncio.Future[int | dict[str, Location]] = self.running_loop().create_future()
        self.route_then(user, only, skip, frame, ts, sender,
                        functools.partial(settle, fut))
        return fut

    def route_then(
        self, user: str, only: str | None, skip: str | None, frame: bytes, ts: int,
        sender: int, then: Callable[[RouteOutcome], None],
    ) -> None:
        """Joins this tick's ``_ROUTE`` call; ``then`` is called from the lane's read
        callback (see the contract)."""
        if self._closed or self._node is None:
            self.running_loop().call_soon(_tell, then, ConnectionError("backplane closed"))
            return
        self._routes.append((user, only or "", skip or "", frame, ts, sender, then))
        self._lane.wake()

    def _take_routes(self) -> list[Batch]:
        """The lane's source: every ``route`` since the last round trip, in one call (one
        call, not chunks: a sender's messages after one that was not queued must not be
        queued either, and only one script run can tell)."""
        if not self._routes:
            return []
        batch, self._routes = self._routes, []
        made = self._made
        assert made is not None
        # The EVALSHA made here in RESP (``Packed``): its keys, then six arguments, then
        # five per message (``_ROUTE``'s ARGV).
        heads = self._heads
        if len(heads) > HEAD_CACHE_MAX:
            heads.clear()
        stopped = self._stopped
        keys_out: list[bytes] = []
        args_out: list[bytes] = [made.route_args]
        for user, only, skip, frame, ts, sender, _ in batch:
            cached = heads.get(user)
            if cached is None:
                key = keys.devices(user).encode()
                # ``encode_batch``'s row, cut around its devices field (the script fills
                # it in): the head here, the tail below
                head = _ROW_HEAD + _encoder.encode((_KIND_S["deliver"], user))[1:]
                cached = heads[user] = (bulk(key), bulk(head))
            keys_out.append(cached[0])
            who = b"!%d" % sender if sender in stopped else b"%d" % sender
            o, k = only.encode(), skip.encode()
            tail = _encoder.encode((frame, "", ts))[1:]
            args_out.append(_ROUTE_ARGS % (len(who), who, len(o), o, len(k), k, cached[1],
                                           len(tail), tail))
        n = len(batch)
        command = Packed(b"".join((
            b"*%d\r\n" % (3 + 6 + 6 * n), made.evalsha, bulk(b"%d" % n),
            *keys_out, *args_out)))
        commands = [command]
        return [(commands, settled(self._lane, commands, [self._route_script],
                                   functools.partial(self._routed, batch),
                                   functools.partial(self._hold_all, batch)))]

    def _hold_all(self, batch: list[_Route]) -> None:
        """The call runs again (NOSCRIPT) at the head of the next round trip, whose routes
        are taken before its outcomes are known: its senders' later routes are held back
        (as after one not queued in one step) until the router resumes them."""
        self._stopped.update(sender for *_, sender, _ in batch)

    def _routed(self, batch: list[_Route], result: list[Any] | BaseException) -> None:
        reply = result if isinstance(result, BaseException) else result[0]
        if isinstance(reply, BaseException):
            self._stats.backplane_error("xadd")
            exc = ConnectionError(f"backplane write failed: {type(reply).__name__}")
            for *_, then in batch:
                _tell(then, exc)
            return
        stopped = self._stopped
        for (*_, sender, then), res in zip(batch, reply, strict=True):
            try:  # (as ``_tell`` does, without a call per message)
                if isinstance(res, int):
                    then(res)
                    continue
                stopped.add(sender)  # its later calls, in the next rounds, are held back
                then(_devices(res))
            except Exception:
                log.exception("a route's outcome callback failed")

    def resume(self, sender: int) -> None:
        self._stopped.discard(sender)

    async def salvage(self, node: str, user: str, device: str) -> list[bytes]:
        """Frames for ``user``/``device`` that the inbox of a worker that died still held
        undelivered: never read by its group, or read but not acknowledged (delivered
        entries may linger until their stream node is trimmed: those are skipped)."""
        inbox = keys.inbox(node)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrange(inbox)
        pipe.xinfo_groups(inbox)
        pipe.xpending_range(inbox, keys.GROUP, min="-", max="+", count=100_000)
        try:
            entries, groups, pending = await pipe.execute()
        except ResponseError:  # the inbox or its group is gone: nothing to salvage
            return []
        last = _stream_id(next(
            (g["last-delivered-id"] for g in groups if _s(g["name"]) == keys.GROUP), b"0-0"
        ))
        unacked = {_stream_id(p["message_id"]) for p in pending}
        out: list[bytes] = []
        for entry_id, fields in entries:
            sid = _stream_id(entry_id)
            if sid <= last and sid not in unacked:
                continue  # delivered and acknowledged
            try:
                envelopes = decode_entry(fields)
            except Exception:
                continue
            out += [
                env.frame for env in envelopes
                if env.kind == "deliver" and env.user == user and device in env.devices
            ]
        return out

    def _take_sends(self) -> list[Batch]:
        """The lane's source: every send since the last round trip, in order: the sends
        to each inbox as few entries as the bounds allow, each kept frame's script where
        it came (so a frame kept for a parked device never overtakes one sent to it
        before)."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, []
        calls: list[list[Any]] = []
        answers: list[tuple[bool, list[asyncio.Future[bool]]]] = []  # (is XADD, futures)
        groups: dict[str, list[_Pending]] = {}
        for item in batch:
            key, env, frame, fut = item
            if env is not None:
                groups.setdefault(key, []).append(item)
                continue
            self._add_entries(groups, calls, answers)
            user, device = fields_of_kept(key)
            calls.append(evalsha(
                self._keep_script,
                [keys.devices(user), key],
                [device, frame, self._keep_max, self._keep_ttl, keys.node_alive_prefix()],
            ))
            answers.append((False, [fut]))
        self._add_entries(groups, calls, answers)

        return [(calls, settled(self._lane, calls, [self._keep_script],
                                lambda res: self._written(batch, answers, res)))]

    def _written(
        self, batch: list[_Pending], answers: list[tuple[bool, list[asyncio.Future[bool]]]],
        results: list[Any] | BaseException,
    ) -> None:
        if isinstance(results, BaseException):
            exc = results
            self._stats.backplane_error("xadd")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        ConnectionError(f"backplane write failed: {type(exc).__name__}")
                    )
            return
        for (is_xadd, futs), res in zip(answers, results, strict=True):
            if isinstance(res, Exception):
                self._stats.backplane_error("xadd")
            for fut in futs:
                if fut.done():
                    continue
                if isinstance(res, Exception):
                    fut.set_exception(ConnectionError("backplane write failed"))
                else:
                    # XADD: nil when the inbox is gone; keep: 0 when the device is no
                    # longer parked (it resumed meanwhile: the caller routes it again)
                    fut.set_result(res is not None if is_xadd else res == 1)

    def _add_entries(
        self,
        groups: dict[str, list[_Pending]],
        calls: list[list[Any]],
        answers: list[tuple[bool, list[asyncio.Future[bool]]]],
    ) -> None:
        """Turn the grouped sends into XADDs (appended to ``calls``) and empty ``groups``."""
        maxlen = b"%d" % self._maxlen
        for key, items in groups.items():
            for chunk in _bounded(items):
                envelopes = [env for _, env, _, _ in chunk if env is not None]
                calls.append([b"XADD", key, b"NOMKSTREAM", b"MAXLEN", b"~", maxlen, b"*",
                              BATCH_FIELD, encode_batch(envelopes)])
                answers.append((True, [fut for *_, fut in chunk]))
        groups.clear()

    # ------------------------------------------------------------------ reading

    # One read is out at a time.  While the writer's lane is busy, the read rides on its
    # round trips (no BLOCK): the acks of the routes in a round trip and the deliveries it
    # read are then handed to the sessions in the same read callback, so a connection that
    # gets both gets one write (across instances at 2,000 connections an ack and a
    # delivery came in separate ticks: 1.84 writes per message).  When that lane is idle,
    # the read ``BLOCK``s on the reader's own connection, a source of its own lane.  Each
    # read's replies are handled in the socket's read callback, which asks for the next.

    def _take_read(self) -> list[Batch]:
        """The reader's lane: a blocking read, when one is due and the writer's lane will
        not carry it (``busy``: that lane asks ``_ride_read`` again)."""
        if self._lane.busy:
            return []
        return self._read(block=True)

    def _ride_read(self, going: bool) -> list[Batch]:
        """The writer's lane: a read due rides on a round trip that goes anyway; when none
        goes, the reader's lane takes it."""
        if not going:
            if self._read_due:
                self._inbox_lane.wake()
            return []
        return self._read(block=False)

    def _read(self, block: bool) -> list[Batch]:
        """The next read, when one is due; the acknowledgement of the previous read's
        entries (delivered to their sessions' outboxes by then) travels in the same round
        trip, before it."""
        made = self._made
        if not self._read_due or self._closed or made is None:
            return []
        self._read_due = False
        read = made.read_block if block else made.read_now
        ids = self._unacked
        if not ids:
            return [([read], self._on_read_only)]
        # every entry up to the last one read is acknowledged now (one reader, in order):
        # the stream below it can go
        return [([made.xack(ids), made.xtrim(ids[-1]), read], self._on_read_acked)]

    def _on_read(self, acked: bool, result: list[Any] | BaseException) -> None:
        if self._closed:
            return
        resp = result if isinstance(result, BaseException) else result[-1]
        if isinstance(resp, BaseException):
            self._read_failed(resp)
            return
        if acked:
            self._unacked = []
        try:
            self._deliver(resp)
        except Exception as exc:  # an unexpected reply: read again (after the backoff)
            self._read_failed(exc)
            return
        self._backoff = READ_BACKOFF_S
        self._read_again()

    def _deliver(self, resp: Any) -> None:
        assert self._sink is not None
        for entry_id, fields in _entries(resp):
            self._unacked.append(entry_id)
            try:
                envelopes = decode_entry(fields)
            except Exception as exc:  # one bad entry must not stop the inbox
                self._stats.backplane_error("decode")
                log.warning("dropped an undecodable inbox entry: %s", type(exc).__name__)
                continue
            for env in envelopes:
                try:
                    self._sink(env)
                except Exception as exc:
                    self._stats.backplane_error("decode")
                    log.warning("an inbox envelope failed: %s", type(exc).__name__)

    def _read_again(self) -> None:
        self._retry = None
        if not self._closed:
            self._read_due = True
            self._inbox_lane.wake()

    def _read_failed(self, exc: BaseException) -> None:
        """A failed read is tried again: at once after recreating a lost group, else after
        a backoff (doubling up to 2 s)."""
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            # Redis restarted without persistence
            log.warning("inbox consumer group lost; recreating it")
            task = self.running_loop().create_task(self._regroup())
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)
            return
        self._stats.backplane_error("xreadgroup")
        log.warning("inbox read failed: %s", type(exc).__name__)
        self._retry = self.running_loop().call_later(self._backoff, self._read_again)
        self._backoff = min(self._backoff * 2, 2.0)

    async def _regroup(self) -> None:
        with contextlib.suppress(Exception):
            await self._ensure_group()
        self._read_again()

    async def close(self) -> None:
        """Stop reading and writing; pending sends fail.  Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        futures: list[asyncio.Future[Any]] = [p[-1] for p in self._pending]
        routes, self._pending, self._routes = self._routes, [], []
        for fut in futures:
            if not fut.done():
                fut.set_exception(ConnectionError("backplane closed"))
        for *_, then in routes:
            _tell(then, ConnectionError("backplane closed"))
        await self._inbox_lane.close()
        if self._node is not None:
            with contextlib.suppress(Exception):
                await self._redis.delete(self.inbox)
        await self._lane.close()
