"""The cluster-wide rate limiter: ``limits``' moving window on Redis (redis-py
implementation, sharing the service's connection pool), with every message of one loop tick
counted in one pipeline.

Per tick, each user with ``n`` messages costs one run of ``limits``' own acquire steps with
``amount = n`` (all-or-nothing, atomic in Redis, so two workers never both get the last
slot).  When that fails, the few messages that still fit are found with ``limits``' window
stats and acquired one by one; the rest are refused with the time until the window frees a
slot.  Counting stays exact and cluster-wide; no message waits for more than one pipeline.

The per-user calls of one tick are one ``EVALSHA`` of ``_ACQUIRE_MANY`` (several, of at most
CALL_BUDGET each, in the same round trip when the tick is large): limits' acquire script run
for each user in turn (its very steps, on its keys and list format, so limits'
own strategy reads the same windows).  One call per user was half of Redis's script
calls when every user sends a few messages a second; measured at 5,000 msg/s across two
instances, the calls halved and Redis's time in commands fell 5 % (the steps inside the
scripts, not the calls, are most of it), and the worker packs one command instead of one
per user.

Leases, for steady senders under a high limit: when a user came back for more within a
lease period, the next acquisition takes as many more slots as the user used in that
period (at most LEASE_SHARE of the limit) and this worker spends them locally for
LEASE_S seconds, without asking Redis.  Every slot is still counted in Redis before it is
spent.  A slot counted at its acquisition may be spent up to LEASE_S later (later still
when a renewal carries it over, below), and a worker holds at most one lease's worth per
user at a time, so any one window sees at most one lease
(LEASE_SHARE of the limit) per worker beyond the limit; unspent slots lapse with the
lease (the user is undercharged never, overcharged by at most what it sent in the last
one and a half LEASE_S, and never by more than LEASE_SHARE of the limit).  With a limit
too low for a lease of two slots (the default 100/second gives 5) every message is
counted exactly as it comes.

A lease is renewed ahead: when half of it is spent (up to five eighths, drawn per lease so
that users who started together do not renew together) or half of its time gone, the next
tick's call also takes what the user spent meanwhile (twice that when half was spent
before half the time went: the lease grows by half, up to what the user spends in one
to one and a half lease periods), and the slots left join the new lease (the sum within
the cap, so a worker still holds at most LEASE_SHARE of the limit for a user, and a
window still sees at most that beyond the limit).  A steady sender's messages then never
wait for an acquisition (before, one in four did at two messages a second: the one that
found its lease spent or lapsed, and went the slow way, two round trips).  A renewal
refused at the limit is not tried again with that lease.  One round trip takes on at most
CALL_BUDGET of renewal work (Redis runs a script alone); the rest ride the next round trips.
Messages that wait for an acquisition all go, in script calls of at most CALL_BUDGET each.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from ..core.ratelimit import Admission
from ..core.running import LoopBound
from .keys import LIMITS_PREFIX
from .lane import Batch, Lane, fail_all
from .scripts import evalsha, settled

Waiter = asyncio.Future[float | None]

# limits' acquire_moving_window.lua (limits 5.x), once per key: ARGV is the timestamp,
# the limit, the expiry, then one amount per key.  Each key's acquisition is all-or-nothing
# as in limits; the reply is 1 (acquired) or 0 per key (a Lua nil would end the array).
# The list is trimmed only when the push took it past the limit: limits trims on every
# acquisition, to the same end state, and that no-op trim was a quarter of the script's
# time in Redis.  Each slot pushed is ARGV[1], the timestamp as the caller wrote it: limits
# pushes the number, which Redis formats anew for every slot (500 users of 100 slots each:
# 57 ms of Redis against 21), and reads entries back with ``tonumber`` (the same value).
_ACQUIRE_MANY = """
local timestamp = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local out = {}
for k = 1, #KEYS do
    local key = KEYS[k]
    local amount = tonumber(ARGV[3 + k])
    local ok = 0
    if amount <= limit then
        local entry = redis.call('lindex', key, limit - amount)
        if not (entry and tonumber(entry) >= timestamp - expiry) then
            local entries = {}
            for i = 1, amount do
                entries[i] = ARGV[1]
            end
            local length = 0
            for i = 1, #entries, 5000 do
                length = redis.call('lpush', key, unpack(entries, i, math.min(i + 4999, #entries)))
            end
            if length > limit then
                redis.call('ltrim', key, 0, limit - 1)
            end
            redis.call('expire', key, expiry)
            ok = 1
        end
    end
    out[k] = ok
end
return out
"""

# How long a lease's slots may be spent.  Ten seconds cover a user who sends a message a
# second or more (a call's signaling, the latency scenario's 1,000 users at 1,000 msg/s):
# after its first two messages none waits for an acquisition (a message that waits takes
# two round trips instead of one, ``route``).  At 2 s a lease taken at one message had
# lapsed by the third after it: 0.67 acquisitions per message at 1,000 msg/s across two
# instances against 0.2-0.3 now, and 6-12 % less CPU per message (row 62 of
# optimisations.md).  The bounds above do not depend on it: a window still sees at most
# one lease per worker beyond the limit, and the cap on a lease holds.
LEASE_S = 10.0
LEASE_SHARE = 0.05  # the largest lease, as a share of the limit
# The work one script call may take on, in slots plus USER_COST per user: about 2 ms of
# Redis (measured: ~6 us per user and ~0.4 us per slot pushed).  Redis runs a script
# alone: one call renewing the leases of 500 users at 100 slots each held every other
# command of the cluster for 20-60 ms.  Renewals past the budget ride the next round trips
# (a renewal is due with half the lease still to spend); messages waiting for an
# acquisition always go, in as many calls of the budget as they need (``_chunks``).
CALL_BUDGET = 2048
USER_COST = 6
KEY_CACHE_MAX = 16384  # users whose Redis key is kept built


class RedisLimiter(LoopBound):
    synchronous = False  # ``admit`` answers with a future (the tick's batch)

    def __init__(
        self, storage: RedisStorage, redis: Redis, rate: str, lane: Lane | None = None
    ) -> None:
        """``storage`` must be ``limits``' redis-py storage on the same server as ``redis``
        (whose settings the lane, when none is given, connects with)."""
        self._storage = storage
        self._item = parse(rate)
        self._strategy = MovingWindowRateLimiter(storage)
        self._lane = lane or Lane(redis)
        self._acquire_script = redis.register_script(_ACQUIRE_MANY)
        self._lane.add_source(self._take)
        self._pending: dict[str, list[Waiter]] = {}
        self._flushing: set[asyncio.Task[None]] = set()
        self._closed = False
        period = self._item.get_expiry()
        self._lease_cap = int(self._item.amount * LEASE_SHARE)
        # user -> [slots left, lapses at (monotonic), messages counted since it was taken
        # or renewed, 1 while a renewal is due or out (or was refused), slots left at
        # which it is renewed (``_renew_at``)]
        self._leases: dict[str, list[float]] = {}
        self._keys: dict[str, str] = {}  # user -> limits' key (see ``_key``)
        self._lease_sweep = time.monotonic() + period
        self.acquisitions = 0  # pipelines sent (tests and benchmarks read it)
        self.waited = 0  # messages that waited for one (not spent from a lease)

    @property
    def limit(self) -> int:
        return int(self._item.amount)

    @property
    def period_s(self) -> int:
        return int(self._item.get_expiry())

    def leased(self, user: str) -> bool:
        lease = self._leases.get(user)
        if lease is not None and lease[0] > 0:
            now = time.monotonic()
            if now < lease[1]:
                lease[0] -= 1
                lease[2] += 1
                # half of it spent (or a little more), or of its time gone: renewed ahead (a
                # message that found it empty or lapsed would wait for an acquisition, two
                # round trips)
                if not lease[3] and (lease[0] <= lease[4] or now > lease[1] - LEASE_S / 2):
                    lease[3] = 1
                    self._pending.setdefault(user, [])
                    self._lane.wake()
                return True
        return False

    def admit(self, user: str) -> Admission:
        if self.leased(user):
            return None
        fut: asyncio.Future[float | None] = self.running_loop().create_future()
        if self._closed:
            fut.set_exception(ConnectionError("rate limiter closed"))
            return fut
        self.waited += 1
        self._pending.setdefault(user, []).append(fut)
        self._lane.wake()
        return fut

    async def hit(self, user: str) -> float | None:
        return await self.admit(user)  # type: ignore[misc]

    def _key(self, user: str) -> str:
        # limits' own key and script (pinned limits 5.x), so its strategy sees the same window;
        # built once per user (limits' key_for is a microsecond), the cache bounded
        key = self._keys.get(user)
        if key is None:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            key = str(self._storage.bridge.prefixed_key(self._item.key_for("u", user)))
            self._keys[user] = key
        return key

    def _lease_size(self, user: str, now: float) -> int:
        """Slots to take ahead for ``user``: a sender that used up its lease, or spent
        half of it before half its time was gone, gets twice what it spent (the lease
        grows: by half, renewed with half of it left); one renewing a lease at half its
        time, what it spent (its pace); one whose lease lapsed a moment ago, what it spent;
        everyone else none.  What a user holds stays within the cap."""
        lease = self._leases.get(user)
        if self._lease_cap < 2 or lease is None:
            return 0
        spent = int(lease[2])
        if now < lease[1]:
            held = int(lease[0])
            # Without growth a renewal kept the size a lease started with (two slots):
            # one acquisition every other message, half of Redis's commands at 2,000
            # connections across instances.
            grow = not held or now <= lease[1] - LEASE_S / 2
            want = max(2, 2 * spent if grow else spent)
            return max(0, min(self._lease_cap - held, want))
        if now < lease[1] + LEASE_S:
            return min(self._lease_cap, spent)
        return 0

    def _take(self) -> list[Batch]:
        """The lane's source: one script call for every user with messages since the last
        one (each user's count and the slots its lease takes ahead, acquired all-or-nothing
        per user)."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, {}
        now = time.monotonic()
        if now >= self._lease_sweep:
            # a lease that lapsed LEASE_S ago no longer sizes the next (``_lease_size``)
            self._leases = {u: v for u, v in self._leases.items() if v[1] > now - LEASE_S}
            self._lease_sweep = now + self._item.get_expiry()
        extra = {user: self._lease_size(user, now) for user in batch}
        for user in [u for u, futs in batch.items() if not futs and extra[u] < 2]:
            # a renewal with no room left under the cap: none now, maybe with a later message
            del batch[user]
            lease = self._leases.get(user)
            if lease is not None:
                lease[3] = 0
        self._defer_renewals(batch, extra)
        if not batch:
            return []
        head = [time.time(), self._item.amount, self._item.get_expiry()]
        chunks = _chunks(batch, extra)
        commands = [
            evalsha(self._acquire_script, [self._key(user) for user in chunk],
                    [*head, *(len(batch[user]) + extra[user] for user in chunk)])
            for chunk in chunks
        ]
        self.acquisitions += 1
        return [(commands, settled(self._lane, commands, [self._acquire_script],
                                   lambda res: self._acquired(batch, extra, now, res, chunks)))]

    def _defer_renewals(self, batch: dict[str, list[Waiter]], extra: dict[str, int]) -> None:
        """Keep the call within CALL_BUDGET: renewals (users with no message waiting) that
        do not fit go back to the pending ones, for the next round trip (the lane asks its
        sources again after every reply).  At least one renewal goes when nothing waits,
        so a lease larger than the budget is still renewed."""
        cost = sum(_cost(len(futs), extra[u]) for u, futs in batch.items() if futs)
        later: list[str] = []
        for user, futs in batch.items():
            if futs:
                continue
            more = _cost(0, extra[user])
            if cost and cost + more > CALL_BUDGET:
                later.append(user)
            else:
                cost += more
        for user in later:
            del batch[user]
            self._pending.setdefault(user, [])

    def _acquired(
        self, batch: dict[str, list[Waiter]], extra: dict[str, int], now: float,
        result: list[Any] | BaseException, chunks: list[list[str]],
    ) -> None:
        """Each user's answer: admitted (with a lease), or its messages that still fit
        found one by one (``_partial``); a chunk's failure fails its users' messages."""
        if isinstance(result, BaseException):
            fail_all((fut for futs in batch.values() for fut in futs), result,
                     "rate limiter closed")
            return
        answers: list[Any] = []
        for chunk, reply in zip(chunks, result, strict=True):
            answers += [reply] * len(chunk) if isinstance(reply, BaseException) else reply
        refused: list[tuple[str, list[Waiter]]] = []
        for (user, futs), ok in zip(batch.items(), answers, strict=True):
            if isinstance(ok, BaseException):
                # its flag stays set: the lease it holds runs out, as for a refusal
                fail_all(futs, ok, "rate limiter closed")
            elif ok:
                for fut in futs:
                    if not fut.done():
                        fut.set_result(None)
                if self._lease_cap >= 2:
                    # a lease of ``extra`` slots (maybe none) and what is left of the one
                    # held (``_lease_size`` kept the sum within the cap, and slots are only
                    # spent from it meanwhile): its use sizes the next one
                    old = self._leases.get(user)
                    held = int(old[0]) if old is not None and now < old[1] else 0
                    size = min(self._lease_cap, held + extra[user])
                    self._leases[user] = [size, now + LEASE_S, len(futs), 0,
                                          _renew_at(size, len(futs))]
            elif futs:
                self._leases.pop(user, None)
                refused.append((user, futs))
            # a renewal refused (the user is at its limit): the lease it holds runs out,
            # and is not renewed again (its flag stays set)
        if refused:
            task = self.running_loop().create_task(self._refused(refused))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _refused(self, refused: list[tuple[str, list[Waiter]]]) -> None:
        for user, futs in refused:
            await self._partial(user, futs)

    async def _partial(self, user: str, futs: list[Waiter]) -> None:
        """Not all of a user's messages of this tick fit: admit those that do, in order."""
        try:
            allowed = 0
            for _ in futs:
                if not await self._strategy.hit(self._item, "u", user):
                    break
                allowed += 1
            stats = await self._strategy.get_window_stats(self._item, "u", user)
            retry = max(0.001, stats.reset_time - time.time())
        except Exception as exc:
            fail_all(futs, exc, "rate limiter closed")
            return
        for i, fut in enumerate(futs):
            if not fut.done():
                fut.set_result(None if i < allowed else retry)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._flushing):
            task.cancel()
        await self._lane.close()
        closer = getattr(self._storage, "aclose", None)
        if closer is not None:
            await closer()


def _cost(waiting: int, extra: int) -> int:
    """A user's share of CALL_BUDGET: the slots it takes (its waiting messages and the
    lease taken ahead) plus USER_COST."""
    return waiting + extra + USER_COST


def _chunks(batch: dict[str, list[Waiter]], extra: dict[str, int]) -> list[list[str]]:
    """``batch``'s users in order, cut into script calls of at most CALL_BUDGET each (a
    user over it alone in one).  They all go in one round trip, but Redis serves other
    clients between two calls (it reads a pipeline 16 KB at a time): a tick in which
    thousands of users wait for their first acquisition (a reconnection storm) would
    otherwise be one script that holds every client of the cluster (~6 us a user)."""
    chunks: list[list[str]] = [[]]
    cost = 0
    for user, futs in batch.items():
        more = _cost(len(futs), extra[user])
        if chunks[-1] and cost + more > CALL_BUDGET:
            chunks.append([])
            cost = 0
        chunks[-1].append(user)
        cost += more
    return chunks


def _renew_at(size: int, counted: int) -> int:
    """The slots left at which a lease of ``size`` (taken with ``counted`` messages that
    waited for it) is renewed: when half of it is spent, or up to five eighths, at random.
    Users who started together (a deploy's reconnections, the benchmark's users) would
    otherwise renew together, and their renewals grow together: in the latency scenario
    each wave pushed 15,000-40,000 slots into Redis at once, and every route call of the
    cluster waited behind it (p99 spikes of 50-100 ms at fixed times of the run).  Slots
    are whole, so the floor renews at the same point (and a small int is not an object
    per lease)."""
    return int((size + counted) / 2 * random.uniform(0.75, 1.0))


def redis_rate_limiter(
    url: str, redis: Redis, rate: str, lane: Lane | None = None
) -> RedisLimiter:
    scheme, rest = url.split("://", 1)
    storage = RedisStorage(
        f"async+{scheme}://{rest}",
        implementation="redispy",
        key_prefix=LIMITS_PREFIX,
        connection_pool=redis.connection_pool,  # type: ignore[arg-type]
    )
    return RedisLimiter(storage, redis, rate, lane)
