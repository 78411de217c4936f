"""Redis state store: shared by every worker and replica, so limits, detector state and sanctions
are one per deployment. Built on ``redis.asyncio`` with short timeouts; any failed call (unreachable,
timed out, an error reply such as ``OOM`` or ``WRONGTYPE``, an unreadable reply) raises
``StoreUnavailable`` with its reason (the guard then follows its fail mode) and the next call
reconnects by itself."""
from __future__ import annotations

import asyncio
import math
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from guard.store.base import Admitted, Charge, StoreUnavailable, Update, UpdateMany, WindowCount
from guard.store.channel import RedisChannel, ScriptCall
from guard.store.memory import ExpiringMap

# One swap per field, in order, in a capped table kept as two generations of a hash (current and previous):
# a field is looked up in both, written to the current one, and when the current one holds half the
# cap it replaces the previous one, so the table never holds more than ``cap`` fields and recently
# written fields survive. Each value carries its own expiry (ms, Redis server time) before a ':';
# a generation's key lives as long as its longest-lived field. ARGV: ttl, half the cap, the distinct
# values (``pack``: every item after its 4-byte length: one argument, not thousands, for the client to
# send), per field the index of its value among them (4 bytes, from 1), the fields (packed). Returns the
# distinct previous values found (packed, after their packed length) and per field the index of its
# previous value among them (4 bytes, from 1; 0: none): few distinct values, many fields.
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
local fields = unpack_items(ARGV[5])
local found, index_of, previous = {}, {}, {}
for i, field in ipairs(fields) do
  local stamped = (now + ttl) .. ':' .. values[struct.unpack('>I4', ARGV[4], 4 * i - 3)]
  local old = redis.call('HGET', KEYS[1], field) or redis.call('HGET', KEYS[2], field)
  local index = 0
  if old then
    local sep = string.find(old, ':', 1, true)
    if tonumber(string.sub(old, 1, sep - 1)) > now then
      local value = string.sub(old, sep + 1)
      index = index_of[value]
      if not index then
        found[#found + 1] = struct.pack('>I4', #value) .. value
        index = #found
        index_of[value] = index
      end
    end
  end
  previous[i] = struct.pack('>I4', index)
  redis.call('HSET', KEYS[1], field, stamped)
  if redis.call('HLEN', KEYS[1]) >= half then
    redis.call('UNLINK', KEYS[2])
    redis.call('RENAME', KEYS[1], KEYS[2])
  end
end
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
found = table.concat(found)
return struct.pack('>I4', #found) .. found .. table.concat(previous)
"""

# The admissions (``StateStore.admit``) made in one turn of the event loop, each in turn: read the
# standing; unless a block is in force, read each limit's counters (current and, for sliding windows,
# previous window, numbered on the server's clock) and charge them all only if none would be exceeded.
# KEYS: per admission, its standing, its network's standing when read (the higher one applies), then one
# counter prefix per limit (the throttle limits last). ARGV: per admission one string of numbers: the
# caller's wall time (s), cost, sliding (1/0), throttle level, block level, the number of limits applied
# when not throttled, the number of limits, whether the network's standing is read (1/0), then amount
# and window (ms) per limit. Returns per admission its standing and a string of numbers, each packed
# (``pack``): refused (-1: blocked, 0: none, i: the i-th limit), then per limit read: current, previous,
# elapsed fraction.
_ADMIT = """
local function packed(item)
  if not item then return '\\255\\255\\255\\255' end
  return struct.pack('>I4', #item) .. item
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level_of(standing, wall)
  if not standing then return 0 end
  local ok, record = pcall(cjson.decode, standing)
  if ok and type(record) == 'table' and tonumber(record[1]) and tonumber(record[2])
      and tonumber(record[2]) > wall then
    return tonumber(record[1])
  end
  return 0
end
local function admit(keys, args)
  local standing = redis.call('GET', KEYS[keys])
  local level = level_of(standing, args[1])
  local first = keys + args[8]  -- the key before the first limit's
  if args[8] == 1 then
    local covering = redis.call('GET', KEYS[keys + 1])
    if level_of(covering, args[1]) > level then standing, level = covering, level_of(covering, args[1]) end
  end
  if level >= args[5] then return packed(standing) .. packed('-1') end
  local cost, sliding = args[2], args[3] == 1
  local n = args[7]
  if level ~= args[4] then n = args[6] end
  local out = {'0'}
  local charged = {}
  for i = 1, n do
    local amount, window = args[7 + 2 * i], args[8 + 2 * i]
    local index = math.floor(now / window)
    local elapsed = (now - index * window) / window
    local key = KEYS[first + i] .. ':' .. index
    local current = tonumber(redis.call('GET', key) or '0')
    local previous = 0
    if sliding then previous = tonumber(redis.call('GET', KEYS[first + i] .. ':' .. (index - 1)) or '0') end
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
  keys = keys + 1 + args[8] + args[7]
end
return table.concat(replies)
"""

# Compare-and-set of several keys (``update_many``), by version: every write through this store also
# sets the key's version key to a fresh token, so a key's state is its token ('' when the key is absent,
# '-' when present without one), and checking that no key changed since it was read ships no values.
# KEYS: the keys, then their version keys. ARGV: ttl (ms), the new token, per key 'w' (write its new
# value) or 'k' (keep it), the state each key had when read ('?': not read), then the new values of the
# keys written. Sets them if every key still has the state read and returns 1; else sets nothing and
# returns each key's value and state (for the caller to update again from).
_COMPARE_AND_SET = """
local n = #KEYS / 2
local states, same = {}, true
for i = 1, n do
  local value = redis.call('GET', KEYS[i])
  local state = value and (redis.call('GET', KEYS[n + i]) or '-') or ''
  states[2 * i - 1], states[2 * i] = value, state
  same = same and state == ARGV[3 + i]
end
if not same then return states end
local written = 3 + n
for i = 1, n do
  if string.sub(ARGV[3], i, i) == 'w' then
    written = written + 1
    redis.call('SET', KEYS[i], ARGV[written], 'PX', ARGV[1])
    redis.call('SET', KEYS[n + i], ARGV[2], 'PX', ARGV[1])
  end
end
return 1
"""
UNREAD = "?"  # the state of a key not read: no key ever has it

ADMIT_BATCH = 256  # admissions sent in one script call, at most
SCRIPT_BATCH = 64  # script calls sent in one round trip, at most

def store_error(error: Exception) -> StoreUnavailable:
    """A failed Redis call as the store's error, with its reason: ``timeout``, ``unreachable``,
    ``oom`` (full under ``noeviction``), ``wrongtype`` (a key holding another type), ``response_error``
    (any other error reply), ``malformed`` (a reply that cannot be read)."""
    if isinstance(error, StoreUnavailable):
        return error
    if isinstance(error, (RedisTimeoutError, TimeoutError)):
        reason = "timeout"
    elif isinstance(error, (RedisConnectionError, OSError)):
        reason = "unreachable"
    elif isinstance(error, ResponseError):
        text = str(error)
        reason = ("oom" if isinstance(error, OutOfMemoryError) or "OOM " in text or "'maxmemory'" in text
                  else "wrongtype" if "WRONGTYPE" in text else "response_error")
    else:
        reason = "malformed"
    return StoreUnavailable(f"redis {reason}: {error}", reason)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """Calls sent to Redis together: ``send(items)`` (at most ``most`` items each) gives one result per
    item. One batch is in flight at a time: the first call starts a sender that, once the turn of
    the event loop it was made in has run, sends the calls made so far; the calls made while a batch
    is in flight go together as soon as its reply is in. So a busy worker pays one round trip for
    many calls, an idle one no more than one per call, and no call waits for a later one. Each
    caller waits for its own result; calls go in the order they were made. Any failure of the batch
    is ``StoreUnavailable`` (``store_error``) for every call of it; a result that is an exception is
    raised to its own caller, as ``StoreUnavailable`` too."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[list[Result]]], most: int):
        self._send, self._most = send, most
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._sender: asyncio.Task | None = None

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Result] = loop.create_future()
        self._waiting.append((item, result))
        if self._sender is None:
            self._sender = loop.create_task(self._send_waiting())
        return await result

    async def drain(self) -> None:
        """Wait for the calls made so far to be answered."""
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:self._most], self._waiting[self._most:]
                await self._settle(batch)
        except asyncio.CancelledError:  # the event loop is closing: no caller is left hanging
            _fail(self._waiting, StoreUnavailable("redis calls were cancelled"))
            self._waiting = []
            raise
        finally:
            self._sender = None

    async def _settle(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Send ``batch`` and give each caller its result (a caller cancelled meanwhile needs none)."""
        try:
            results = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            _fail(batch, StoreUnavailable("redis calls were cancelled"))
            raise
        except Exception as error:  # unreachable, a script's error, an unreadable reply
            _fail(batch, store_error(error))
        else:
            for (_, waiting), result in zip(batch, results, strict=True):
                if waiting.done():
                    continue
                if isinstance(result, Exception):
                    waiting.set_exception(store_error(result))
                else:
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
    """Implements ``guard.store.base.StateStore`` on Redis. Keys are namespaced by ``prefix`` (a key's
    version lives at ``<prefix>version:<key>``); ``max_table_fields`` caps each ``swap_many`` table;
    calls fail after ``timeout`` seconds; ``update_many`` keeps up to ``cache_bytes`` of the values it
    last read or wrote, and their versions, to update them again without reading them first."""

    def __init__(self, url: str, prefix: str = "predguard:", max_table_fields: int = 1_000_000,
                 timeout: float = 0.25, cache_bytes: int = 16 << 20):
        self._cache = StateCache(cache_bytes)
        self._client = aioredis.Redis.from_url(url, **client_options(timeout))
        self._prefix = prefix
        self._half_cap = max(1, max_table_fields // 2)
        self._swap_many = self._client.register_script(_SWAP_MANY)
        self._admit = self._client.register_script(_ADMIT)
        self._admissions: Coalescer[Charge, Admitted] = Coalescer(self._admit_many, ADMIT_BATCH)
        self._admission_channel = RedisChannel(self._client, timeout)
        self._compare_and_set = self._client.register_script(_COMPARE_AND_SET)
        self._scripts: Coalescer[ScriptCall, object] = Coalescer(self._run_scripts, SCRIPT_BATCH)
        self._script_channel = RedisChannel(self._client, timeout)

    def _version(self, key: str) -> str:
        return f"{self._prefix}version:{key}"

    @asynccontextmanager
    async def _reachable(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as error:
            raise store_error(error) from error

    async def _script(self, script: AsyncScript, keys: list, args: list) -> object:
        """``script``'s reply; the scripts called in one turn of the event loop (a monitor's detectors
        writing their state at once) go to Redis in one round trip."""
        return await self._scripts((script, keys, args))

    async def _run_scripts(self, calls: list[ScriptCall]) -> list[object]:
        return await self._script_channel.call_many(calls)

    async def get(self, key: str) -> bytes | None:
        async with self._reachable():
            return await self._client.get(self._prefix + key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        name = self._prefix + key
        self._cache.forget(name)
        async with self._reachable(), self._client.pipeline(transaction=True) as pipe:
            await pipe.set(name, value, px=_ms(ttl)).set(self._version(key), token(), px=_ms(ttl)).execute()

    async def delete(self, key: str) -> None:
        self._cache.forget(self._prefix + key)
        async with self._reachable():
            await self._client.delete(self._prefix + key, self._version(key))

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        return (await self.update_many([key], lambda values: [update(values[0])], ttl))[0]

    async def update_many(self, keys: list[str], update: UpdateMany, ttl: float) -> list[bytes]:
        """Optimistic, by version (``_COMPARE_AND_SET``): compute the new values from those last seen
        (cached) and set them unless some key changed meanwhile; else, or when some key is not
        cached, update again from the values and versions the failed attempt returned. One round
        trip when this store saw the keys last (a ``guard monitor`` process owning its clients' state),
        two otherwise; only the values written travel to Redis."""
        names = [self._prefix + key for key in keys]
        seen = [self._cache.get(name) for name in names]
        old = [value for value, _ in seen]
        states = [state for _, state in seen]
        script_keys = [*names, *(self._version(key) for key in keys)]
        try:
            while True:
                if UNREAD in states:  # read first: the script answers with the values and their versions
                    new, flags, written = None, "k" * len(keys), []
                else:
                    new = update(old)
                    flags = "".join(["k" if value is before else "w" for before, value in zip(old, new, strict=True)])
                    written = [value for value, flag in zip(new, flags) if flag == "w"]
                fresh = token()
                reply = await self._script(self._compare_and_set, script_keys,
                                           [_ms(ttl), fresh, flags, *states, *written])
                if reply == 1:
                    for name, value, state, flag in zip(names, new, states, flags):
                        self._cache.put(name, value, fresh if flag == "w" else state)
                    return new
                old, states = reply[0::2], [state.decode() for state in reply[1::2]]
        except BaseException:  # e.g. a timeout after the call reached Redis: what is there now is unknown
            for name in names:
                self._cache.forget(name)
            raise

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        if not fields:
            return []
        base = f"{self._prefix}{{{table}}}"
        distinct, indices = indexed([value] * len(fields) if isinstance(value, bytes) else value)
        reply = await self._script(self._swap_many, [base + ":cur", base + ":prev"],
                                   [_ms(ttl), self._half_cap, pack(distinct), indices, pack(fields)])
        found = 4 + int.from_bytes(reply[:4], "big")
        previous = [None, *unpack(reply[4:found])]
        return [previous[i] for i in struct.unpack(f">{len(fields)}I", reply[found:])]

    async def admit(self, charge: Charge) -> Admitted:
        """``StateStore.admit``; the admissions made in one turn of the event loop go to Redis in one
        script call, in the order they were made (``Coalescer``)."""
        return await self._admissions(charge)

    async def _admit_many(self, charges: list[Charge]) -> list[Admitted]:
        keys, args = [], []
        for charge in charges:
            limits = [*charge.limits, *charge.throttle_limits]
            keys.append(self._prefix + charge.standing_key)
            if charge.network_key is not None:
                keys.append(self._prefix + charge.network_key)
            keys += [self._prefix + limit.key for limit in limits]
            numbers = [repr(charge.now), str(charge.cost), "1" if charge.sliding else "0", str(charge.throttle_level),
                       str(charge.block_level), str(len(charge.limits)), str(len(limits)),
                       "0" if charge.network_key is None else "1"]
            for limit in limits:
                numbers += [str(limit.amount), str(_ms(limit.seconds))]
            args.append(" ".join(numbers))
        replies = unpack(await self._admission_channel.call(self._admit, keys, args))
        return [admitted(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    async def close(self) -> None:
        await self._admissions.drain()
        await self._scripts.drain()
        await self._admission_channel.close()
        await self._script_channel.close()
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
    if items and len(set(map(len, items))) == 1:  # all of one length (hashes): one join
        length = len(items[0]).to_bytes(4, "big")
        return length + length.join(items)
    return b"".join([len(item).to_bytes(4, "big") + item for item in items])


def indexed(values: list[bytes]) -> tuple[list[bytes], bytes]:
    """The distinct ``values`` in order of first appearance, and each value's index among them (from 1,
    4 bytes big-endian)."""
    index: dict[bytes, int] = {}
    indices = [index.setdefault(value, len(index) + 1) for value in values]
    return list(index), struct.pack(f">{len(indices)}I", *indices)


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


def token() -> str:
    """A fresh version token (never '', '-' or ``UNREAD``)."""
    return os.urandom(8).hex()


class StateCache:
    """The values ``update_many`` last read or wrote, with their versions, the least recently used
    dropped beyond ``max_bytes`` (an evicting ``ExpiringMap`` whose entries never expire). Only a
    guess: every update checks the versions."""

    def __init__(self, max_bytes: int):
        self._entries = ExpiringMap(max_bytes)

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def size(self) -> int:
        """Bytes held, by ``entry_bytes``."""
        return self._entries.size

    def get(self, name: str) -> tuple[bytes | None, str]:
        found = self._entries.get(name, 0.0)
        return (None, UNREAD) if found is None else found  # type: ignore[return-value]

    def put(self, name: str, value: bytes | None, state: str) -> None:
        self._entries.set(name, (value, state), math.inf, 0.0)

    def forget(self, name: str) -> None:
        self._entries.delete(name)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
