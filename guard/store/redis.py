"""Redis state store: shared by every worker and replica, so limits, detector state and sanctions
are one per deployment. Built on ``redis.asyncio`` with short timeouts; a connection error raises
``StoreUnavailable`` (the guard then follows its fail mode) and the next call reconnects by itself."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from guard.store.base import Admitted, Charge, StoreUnavailable, Update, UpdateMany, WindowCount

# One swap per field, in order, in a capped table kept as two generations of a hash (current and previous):
# a field is looked up in both, written to the current one, and when the current one holds half the
# cap it replaces the previous one, so the table never holds more than ``cap`` fields and recently
# written fields survive. Each value carries its own expiry (ms, Redis server time) before a ':';
# a generation's key lives as long as its longest-lived field. ARGV: ttl, half the cap, the values (one,
# or one per field) and the fields, each list packed (``pack``: every item after its 4-byte length: one
# argument, not thousands, for the client to send). Returns the previous values packed alike, a
# length of 0xFFFFFFFF standing for none.
_SWAP_MANY = """
local function unpack_items(packed)
  local items, at = {}, 1
  while at <= #packed do
    local length = struct.unpack('>I4', packed, at)
    items[#items + 1] = string.sub(packed, at + 4, at + 3 + length)
    at = at + 4 + length
  end
  return items
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local half = tonumber(ARGV[2])
local values = unpack_items(ARGV[3])
local fields = unpack_items(ARGV[4])
local previous = {}
for i, field in ipairs(fields) do
  local stamped = (now + ttl) .. ':' .. values[#values == 1 and 1 or i]
  local old = redis.call('HGET', KEYS[1], field) or redis.call('HGET', KEYS[2], field)
  local value = false
  if old then
    local sep = string.find(old, ':', 1, true)
    if tonumber(string.sub(old, 1, sep - 1)) > now then value = string.sub(old, sep + 1) end
  end
  previous[#previous + 1] = value and (struct.pack('>I4', #value) .. value) or '\\255\\255\\255\\255'
  redis.call('HSET', KEYS[1], field, stamped)
  if redis.call('HLEN', KEYS[1]) >= half then
    redis.call('UNLINK', KEYS[2])
    redis.call('RENAME', KEYS[1], KEYS[2])
  end
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return table.concat(previous)
"""

# The admissions (``StateStore.admit``) made in one turn of the event loop, each in turn: read the
# standing; unless a block is in force, read each limit's counters (current and, for sliding windows,
# previous window, numbered on the server's clock) and charge them all only if none would be exceeded.
# KEYS: per admission, its standing, then one counter prefix per limit (the throttle limits last). ARGV:
# per admission one string of numbers: the caller's wall time (s), cost, sliding (1/0), throttle level,
# block level, the number of limits applied when not throttled, the number of limits, then amount and
# window (ms) per limit. Returns per admission its standing and a string of numbers, each packed
# (``pack``): refused (-1: blocked, 0: none, i: the i-th limit), then per limit read: current, previous,
# elapsed fraction.
_ADMIT = """
local function packed(item)
  if not item then return '\\255\\255\\255\\255' end
  return struct.pack('>I4', #item) .. item
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function admit(keys, args)
  local standing = redis.call('GET', KEYS[keys])
  local level = 0
  if standing then
    local ok, record = pcall(cjson.decode, standing)
    if ok and type(record) == 'table' and tonumber(record[1]) and tonumber(record[2])
        and tonumber(record[2]) > args[1] then
      level = tonumber(record[1])
    end
  end
  if level >= args[5] then return packed(standing) .. packed('-1') end
  local cost, sliding = args[2], args[3] == 1
  local n = args[7]
  if level ~= args[4] then n = args[6] end
  local out = {'0'}
  local charged = {}
  for i = 1, n do
    local amount, window = args[6 + 2 * i], args[7 + 2 * i]
    local index = math.floor(now / window)
    local elapsed = (now - index * window) / window
    local key = KEYS[keys + i] .. ':' .. index
    local current = tonumber(redis.call('GET', key) or '0')
    local previous = 0
    if sliding then previous = tonumber(redis.call('GET', KEYS[keys + i] .. ':' .. (index - 1)) or '0') end
    out[#out + 1] = current .. ' ' .. previous .. ' ' .. tostring(elapsed)
    if previous * (1 - elapsed) + current + cost > amount then
      out[1] = tostring(i)
      return packed(standing) .. packed(table.concat(out, ' '))
    end
    charged[#charged + 1] = {key, sliding and 2 * window or window}
  end
  for _, counter in ipairs(charged) do
    redis.call('INCRBY', counter[1], cost)
    redis.call('PEXPIRE', counter[1], counter[2])
  end
  return packed(standing) .. packed(table.concat(out, ' '))
end
local replies, keys = {}, 1
for a = 1, #ARGV do
  local args = {}
  for number in string.gmatch(ARGV[a], '%S+') do args[#args + 1] = tonumber(number) end
  replies[a] = admit(keys, args)
  keys = keys + 1 + args[7]
end
return table.concat(replies)
"""

# Compare-and-set of several keys (``update_many``): unless some key's value is no longer the one read
# (or a key read absent now exists), set the new values. KEYS: the keys. ARGV: ttl (ms), then per key two
# flags ('p' present when read, else 'a'; 'w' write its new value, else 'k' keep) and then per key its
# value as read and its new value ('' where unused). Returns 1 if it set them, 0 if they changed.
_COMPARE_AND_SET = """
local flags = ARGV[2]
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if string.sub(flags, 2 * i - 1, 2 * i - 1) == 'p' then
    if current ~= ARGV[1 + 2 * i] then return 0 end
  elseif current then
    return 0
  end
end
for i, key in ipairs(KEYS) do
  if string.sub(flags, 2 * i, 2 * i) == 'w' then redis.call('SET', key, ARGV[2 + 2 * i], 'PX', ARGV[1]) end
end
return 1
"""

ADMIT_BATCH = 256  # admissions sent in one script call, at most

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Calls made in one turn of the event loop, sent to Redis together: ``send(items)`` (at most
    ``most`` items each) gives one result per item. Each caller still waits for its own result, and
    no call waits for a later one: the first call of a turn schedules the sending for just after
    the turn's other handlers have run. A client's calls of one turn go in the order they were made.
    A failure to reach Redis is ``StoreUnavailable`` for every call of the batch; any other error is
    raised to each of them."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Result]]], most: int):
        self._send, self._most = send, most
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._sending: set[asyncio.Task] = set()

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, result))
        if len(self._waiting) == 1:  # the turn's first: send them all once the turn's handlers have run
            loop.call_soon(self._send_waiting)
        return await result

    async def drain(self) -> None:
        """Wait for the batches in flight."""
        await asyncio.gather(*self._sending, return_exceptions=True)

    def _send_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self._most):
            task = asyncio.create_task(self._settle(waiting[start:start + self._most]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _settle(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Send ``batch`` and give each caller its result (a caller cancelled meanwhile needs none)."""
        try:
            results = await self._send([item for item, _ in batch])
        except _UNREACHABLE as error:
            _fail(batch, StoreUnavailable(f"redis unreachable: {error}"))
        except asyncio.CancelledError:  # the event loop is closing: no caller is left hanging
            _fail(batch, StoreUnavailable("redis calls were cancelled"))
            raise
        except Exception as error:  # e.g. a script error: every caller of the batch sees it
            _fail(batch, error)
        else:
            for (_, waiting), result in zip(batch, results, strict=True):
                if not waiting.done():
                    waiting.set_result(result)


def _fail(batch: list[tuple[object, asyncio.Future]], error: BaseException) -> None:
    for _, waiting in batch:
        if not waiting.done():
            waiting.set_exception(error)


def client_options(timeout: float) -> dict:
    """Connection options for a guard's Redis clients: fail within ``timeout`` seconds, retry once
    at once (a pooled socket may have died with a restarted server), never back off for seconds."""
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1)}


class RedisStore:
    """Implements ``guard.store.base.StateStore`` on Redis. Keys are namespaced by ``prefix``;
    ``max_table_fields`` caps each ``swap_many`` table; calls fail after ``timeout`` seconds."""

    def __init__(self, url: str, prefix: str = "predguard:", max_table_fields: int = 1_000_000,
                 timeout: float = 0.25):
        self._client = aioredis.Redis.from_url(url, **client_options(timeout))
        self._prefix = prefix
        self._half_cap = max(1, max_table_fields // 2)
        self._swap_many = self._client.register_script(_SWAP_MANY)
        self._admit = self._client.register_script(_ADMIT)
        self._admissions: Coalescer[Charge, Admitted] = Coalescer(self._admit_many, ADMIT_BATCH)
        self._compare_and_set = self._client.register_script(_COMPARE_AND_SET)

    @asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNREACHABLE as error:
            raise StoreUnavailable(f"redis unreachable: {error}") from error

    async def get(self, key: str) -> bytes | None:
        async with self._reachable():
            return await self._client.get(self._prefix + key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        async with self._reachable():
            await self._client.set(self._prefix + key, value, px=_ms(ttl))

    async def delete(self, key: str) -> None:
        async with self._reachable():
            await self._client.delete(self._prefix + key)

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        return (await self.update_many([key], lambda values: [update(values[0])], ttl))[0]

    async def update_many(self, keys: list[str], update: UpdateMany, ttl: float) -> list[bytes]:
        """Optimistic: read the values (MGET), compute the new ones, and set them with a script that
        first checks that none changed meanwhile (two round trips however many keys); retried until
        no other writer intervened."""
        names = [self._prefix + key for key in keys]
        async with self._reachable():
            while True:
                old = await self._client.mget(names)
                new = update(old)
                flags, values = [], []
                for before, value in zip(old, new, strict=True):
                    flags += ["a" if before is None else "p", "k" if value is before else "w"]
                    values += [b"" if before is None else before, b"" if value is before else value]
                if await self._compare_and_set(keys=names, args=[_ms(ttl), "".join(flags), *values]):
                    return new

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        if not fields:
            return []
        base = f"{self._prefix}{{{table}}}"
        async with self._reachable():
            previous = await self._swap_many(keys=[base + ":cur", base + ":prev"], args=[
                _ms(ttl), self._half_cap, pack([value] if isinstance(value, bytes) else value), pack(fields)])
        return unpack(previous)

    async def admit(self, charge: Charge) -> Admitted:
        """``StateStore.admit``; the admissions made in one turn of the event loop go to Redis in one
        script call, in the order they were made (``Coalescer``)."""
        return await self._admissions(charge)

    async def _admit_many(self, charges: list[Charge]) -> list[Admitted]:
        keys, args = [], []
        for charge in charges:
            limits = [*charge.limits, *charge.throttle_limits]
            keys.append(self._prefix + charge.standing_key)
            keys += [self._prefix + limit.key for limit in limits]
            numbers = [repr(charge.now), str(charge.cost), "1" if charge.sliding else "0", str(charge.throttle_level),
                       str(charge.block_level), str(len(charge.limits)), str(len(limits))]
            for limit in limits:
                numbers += [str(limit.amount), str(_ms(limit.seconds))]
            args.append(" ".join(numbers))
        replies = unpack(await self._admit(keys=keys, args=args))
        return [admitted(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    async def close(self) -> None:
        await self._admissions.drain()
        await self._client.aclose()


def admitted(standing: bytes | None, numbers: bytes) -> Admitted:
    """An admission as ``_ADMIT`` reports it."""
    refused, *read = numbers.split()
    if refused == b"-1":
        return Admitted(standing, blocked=True)
    counts = tuple(WindowCount(int(read[i]), int(read[i + 1]), float(read[i + 2])) for i in range(0, len(read), 3))
    return Admitted(standing, False, counts, int(refused) - 1 if refused != b"0" else None)


_NONE = 0xFFFFFFFF


def pack(items: list[bytes]) -> bytes:
    """``items`` as one string: each after its length (4 bytes, big-endian)."""
    return b"".join([len(item).to_bytes(4, "big") + item for item in items])


def unpack(packed: bytes) -> list[bytes | None]:
    """The items of a packed string, a length of ``0xFFFFFFFF`` standing for None."""
    items: list[bytes | None] = []
    at, end = 0, len(packed)
    while at < end:
        length = int.from_bytes(packed[at:at + 4], "big")
        at += 4
        if length == _NONE:
            items.append(None)
        else:
            items.append(packed[at:at + length])
            at += length
    return items


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
