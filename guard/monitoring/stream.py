"""The scale-out deployment of the monitor (``monitor.deployment = "streams"``): web workers append
observations to Redis Streams and ``guard monitor`` processes judge them (``StreamMonitor``).

- Partitions: a client's observations always go to the same stream,
  ``<prefix>observations:<p>`` with ``p`` a hash of the client modulo ``monitor.partitions``, so
  one consumer at a time sees a client's queries, in order, and per-client detector state stays
  consistent.
- Bound: ``ObservationStream.offer`` appends with one atomic script that first checks the
  partition's backlog (entries are deleted once judged, so a stream's length is its backlog):
  ``max_pending`` entries, or an oldest entry older than ``max_delay`` (its ID is its time), is a
  fault and nothing is appended; the middleware then answers in the fail mode. The observations
  a worker offers in one turn of its event loop, or while its previous append is in flight, go
  together in one call, each checked in turn. A
  stream is never trimmed (``MAXLEN`` would drop unjudged observations silently): the backlog
  bound refuses instead.
- Ownership: monitors announce themselves in a sorted set (score: expiry) and each holds a lease
  (``SET NX PX``) on at most ``ceil(partitions / live monitors)`` partitions, renewed every round.
  A monitor that dies loses its leases after ``monitor.lease`` seconds; whoever takes a partition
  over first claims its dead owner's pending entries (``XAUTOCLAIM``, once idle for a lease) and
  judges them before reading new ones, so no observation is lost and each client's stay in order.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import socket
import struct
import time

import numpy as np
import redis.asyncio as aioredis

from guard.metrics import GuardMetrics
from guard.detectors.base import Observation
from guard.monitoring.monitor import Monitor, Queued, linger
from guard.policy import MonitorPolicy, Policy
from guard.sanctions import Sanctions
from guard.store.channel import RedisChannel
from guard.store.redis import Coalescer, RedisStore, client_options

logger = logging.getLogger("guard")

GROUP = "monitors"
OFFER_BATCH = 256  # observations appended by one script call, at most

# KEYS: the partitions' streams. ARGV: max_pending, max_delay (ms), then per observation the index of its
# stream in KEYS and the observation (``encode``). Each, in turn, is appended unless its stream's backlog
# is full or its oldest entry has waited beyond max_delay. Returns one character per observation: '1'
# appended, '0' refused.
_OFFER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most, delay = tonumber(ARGV[1]), tonumber(ARGV[2])
local taken = {}
for i = 3, #ARGV, 2 do
  local key = KEYS[tonumber(ARGV[i])]
  local backlog = redis.call('XLEN', key)
  local room = backlog < most
  if room and backlog > 0 then
    local oldest = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1][1]
    room = now - tonumber(string.match(oldest, '^(%d+)')) <= delay
  end
  if room then redis.call('XADD', key, '*', 'o', ARGV[i + 1]) end
  taken[#taken + 1] = room and '1' or '0'
end
return table.concat(taken)
"""

# KEYS: leases. ARGV: the monitor's name, the lease (ms). Renews those the monitor holds; one character
# per lease: '1' renewed, '0' lost.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  local mine = redis.call('GET', key) == ARGV[1]
  if mine then redis.call('PEXPIRE', key, ARGV[2]) end
  held[i] = mine and '1' or '0'
end
return table.concat(held)
"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def partition_of(client: str, partitions: int) -> int:
    """The partition a client's observations go to (stable across processes and machines)."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little") % partitions


def stream_key(prefix: str, partition: int) -> str:
    return f"{prefix}observations:{partition}"


# An entry's one field: rows, columns, then the lengths of the client's and the route's names.
_HEADER = struct.Struct("<IIII")


def encode(observation: Observation) -> bytes:
    """An observation as a stream entry's one value: the header, the client's and route's names
    (UTF-8), the model's labels (int64) and the feature rows (float64, as the middleware read them)."""
    features = np.ascontiguousarray(observation.features, "<f8")
    client, route = observation.client.encode(), observation.route.encode()
    return b"".join((_HEADER.pack(*features.shape, len(client), len(route)), client, route,
                     np.ascontiguousarray(observation.predicted, "<i8").tobytes(), features.tobytes()))


def decode(fields: dict[bytes, bytes]) -> Observation:
    """The observation an entry holds (``encode``)."""
    packed = fields[b"o"]
    rows, columns, client_length, route_length = _HEADER.unpack_from(packed)
    at = _HEADER.size + client_length + route_length
    predicted = np.frombuffer(packed, "<i8", rows, at)
    features = np.frombuffer(packed, "<f8", rows * columns, at + 8 * rows).reshape(rows, columns)
    return Observation(packed[_HEADER.size:_HEADER.size + client_length].decode(), features, predicted,
                       packed[_HEADER.size + client_length:at].decode())


class ObservationStream:
    """The web worker's side: appends each observation to its client's partition, within the bound.

    The observations offered in one turn of the event loop, or while the previous append is in
    flight, go together, in one script call (at most ``OFFER_BATCH`` observations each;
    ``guard.store.redis.Coalescer``), so a busy worker pays one round trip for several requests
    rather than one each, and no request waits for a later one's append; every request still waits
    for its own observation's fate."""

    escalations = 0  # sanctions are written by the monitor processes, unseen here

    def __init__(self, url: str, settings: MonitorPolicy, prefix: str = "predguard:", timeout: float = 0.25):
        self.settings, self.prefix = settings, prefix
        self._client = aioredis.Redis.from_url(url, **client_options(timeout))
        self._offer = self._client.register_script(_OFFER)
        self._channel = RedisChannel(self._client, timeout)
        self._offers: Coalescer[tuple[int, bytes], Queued] = Coalescer(self._append, OFFER_BATCH)

    def start(self) -> None:
        """Nothing to start: the monitors are processes of their own."""

    async def stop(self) -> None:
        await self._offers.drain()
        await self._channel.close()
        await self._client.aclose()

    async def offer(self, observation: Observation) -> Queued:
        """Append ``observation``; refused (nothing appended) when its partition's backlog is full or
        its oldest entry has waited ``max_delay``. ``StoreUnavailable`` when Redis cannot be reached."""
        return await self._offers((partition_of(observation.client, self.settings.partitions), encode(observation)))

    async def _append(self, batch: list[tuple[int, bytes]]) -> list[Queued]:
        """Append ``batch`` (partition, encoded observation), each in turn within the bound."""
        partitions = sorted({partition for partition, _ in batch})
        index = {partition: str(i + 1) for i, partition in enumerate(partitions)}
        args: list[int | str | bytes] = [self.settings.max_pending, int(self.settings.max_delay * 1000)]
        for partition, packed in batch:
            args += [index[partition], packed]
        taken = await self._channel.call(self._offer, [stream_key(self.prefix, p) for p in partitions], args)
        return [Queued.ACCEPTED if flag == ord("1") else Queued.REFUSED for flag in taken]


class StreamMonitor:
    """A ``guard monitor`` process: judges the observations of the partitions it holds."""

    def __init__(self, policy: Policy, name: str | None = None, metrics: GuardMetrics | None = None,
                 prefix: str = "predguard:", block: float = 0.05):
        self.settings, self.prefix, self.block = policy.monitor, prefix, block
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = aioredis.Redis.from_url(policy.store, **client_options(5.0))
        self._channel = RedisChannel(self.redis, 5.0 + block)  # its reads and acknowledgements
        # It owns its clients' detector state: the values it wrote last, cached, are most often current.
        self.store = RedisStore(policy.store, prefix=prefix, cache_bytes=policy.memory_limit // 2)
        self.monitor = Monitor.from_policy(policy, self.store, Sanctions(self.store).escalate,
                                           metrics or GuardMetrics())
        self.owned: set[int] = set()
        self.inherited: set[int] = set()  # owned partitions that may still hold a previous owner's entries
        self._lease_ms = int(self.settings.lease * 1000)
        self.linger = linger(self.settings)
        self._rebalanced = -math.inf
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.judged: dict[int, list[bytes]] = {}  # per partition, the IDs judged and not yet acknowledged

    async def run(self, stop: asyncio.Event) -> None:
        """Judge rounds until ``stop`` is set, then give the partitions back."""
        await self.create_groups()
        try:
            while not stop.is_set():
                await self.step()
        finally:
            if self.judged:
                await self.read([], 0)
            for partition in self.owned:
                await self._release(keys=[self._lease(partition)], args=[self.name])
            await self.redis.zrem(self._alive, self.name)
            await self._channel.close()
            await self.redis.aclose()
            await self.store.close()

    async def create_groups(self) -> None:
        for partition in range(self.settings.partitions):
            try:
                await self.redis.xgroup_create(stream_key(self.prefix, partition), GROUP, id="0", mkstream=True)
            except aioredis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def step(self) -> int:
        """One round: renew and rebalance the leases (every quarter lease), take the next batch (a
        previous owner's pending entries first), judge it. A full batch is acknowledged and deleted
        with the next read, in the same round trip; a smaller one at once. Returns the observations
        judged."""
        if time.monotonic() - self._rebalanced >= self.settings.lease / 4:
            await self.rebalance()
            self._rebalanced = time.monotonic()
        entries: list[tuple[int, bytes, dict[bytes, bytes]]] = []
        if self.inherited and self.judged:
            await self.read([], 0)
        for partition in sorted(self.inherited):
            claimed = await self.claim(partition)
            if claimed is None:
                self.inherited.discard(partition)
            else:
                entries += [(partition, entry_id, fields) for entry_id, fields in claimed]
        readable = sorted(self.owned - self.inherited)
        if not entries and (readable or self.judged):
            entries = await self.read(readable, self.settings.batch_size)  # at once if any wait
        if not entries and not readable:
            await asyncio.sleep(self.block)
        if entries:
            await self.judge(entries)
            if len(entries) < min(self.settings.batch_size, self.settings.max_pending):
                # Let the next batch fill: its fixed costs (round trips to read and to the detectors'
                # state) are most of a small one's. Acknowledge first: a judged entry left in its
                # stream would count against the web workers' bound (its age, the backlog).
                await self.read([], 0)
                await asyncio.sleep(self.linger)
        return len(entries)

    async def read(self, partitions: list[int], count: int) -> list[tuple[int, bytes, dict[bytes, bytes]]]:
        """In one round trip: acknowledge and delete the entries judged so far, then take up to
        ``count`` new entries of ``partitions``, waiting up to ``self.block`` s for one."""
        judged, self.judged = self.judged, {}
        commands: list[tuple] = []
        for partition, ids in judged.items():
            key = stream_key(self.prefix, partition)
            commands += [("XACK", key, GROUP, *ids), ("XDEL", key, *ids)]
        keys = [stream_key(self.prefix, p) for p in partitions]
        if partitions:
            commands.append(("XREADGROUP", "GROUP", GROUP, self.name, "COUNT", count, "BLOCK",
                             int(self.block * 1000), "STREAMS", *keys, *[">"] * len(keys)))
        try:
            replies = await self._channel.execute(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        except BaseException:  # not acknowledged, or not known to be: once more with the next read
            for partition, ids in judged.items():
                self.judged.setdefault(partition, []).extend(ids)
            raise
        by_key = dict(zip(keys, partitions))
        found = (replies[-1] if partitions else None) or []  # per key: [[id, [field, value, ...]], ...]
        return [(by_key[key.decode()], entry_id, dict(zip(fields[::2], fields[1::2])))
                for key, entries in (found.items() if isinstance(found, dict) else found)  # RESP3: a map
                for entry_id, fields in entries]

    async def claim(self, partition: int) -> list[tuple[bytes, dict]] | None:
        """Entries other monitors were given and never acknowledged, once idle for a lease (now
        ours); an empty list while some are not idle enough yet; None when there are none."""
        key = stream_key(self.prefix, partition)
        # The claimed entries come second: Redis 7 appends the deleted IDs, Redis 6.2 does not.
        claimed = (await self.redis.xautoclaim(key, GROUP, self.name, self._lease_ms, "0-0",
                                               count=self.settings.batch_size))[1]
        if claimed:
            return claimed
        return [] if (await self.redis.xpending(key, GROUP))["pending"] else None

    async def judge(self, entries: list[tuple[int, bytes, dict[bytes, bytes]]]) -> None:
        """Judge ``entries``; they are acknowledged with the next read."""
        try:
            await self.monitor.process([decode(fields) for _, _, fields in entries])
        except Exception:
            logger.exception("guard monitor %s: failed on a batch of %d observations", self.name, len(entries))
        for partition, entry_id, _ in entries:
            self.judged.setdefault(partition, []).append(entry_id)

    @property
    def _alive(self) -> str:
        return f"{self.prefix}monitors"

    def _lease(self, partition: int) -> str:
        return f"{self.prefix}monitor-lease:{partition}"

    async def rebalance(self) -> None:
        """Announce this monitor, renew its leases, give back what exceeds its share and take free
        partitions up to it."""
        seconds, microseconds = await self.redis.time()
        now = seconds * 1000 + microseconds // 1000
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self._alive, {self.name: now + self._lease_ms})
            pipe.zremrangebyscore(self._alive, "-inf", now)
            pipe.zcard(self._alive)
            alive = (await pipe.execute())[-1]
        share = math.ceil(self.settings.partitions / max(alive, 1))
        owned = sorted(self.owned)
        renewed = (await self._renew(keys=[self._lease(p) for p in owned], args=[self.name, self._lease_ms])
                   if owned else b"")
        for partition, held in zip(owned, renewed):
            if held != ord("1"):
                self.owned.discard(partition)
                self.inherited.discard(partition)
        for partition in sorted(self.owned, reverse=True)[: max(len(self.owned) - share, 0)]:
            await self._release(keys=[self._lease(partition)], args=[self.name])
            self.owned.discard(partition)
            self.inherited.discard(partition)
        for partition in range(self.settings.partitions):
            if len(self.owned) >= share:
                break
            if partition not in self.owned and await self.redis.set(self._lease(partition), self.name,
                                                                     nx=True, px=self._lease_ms):
                self.owned.add(partition)
                self.inherited.add(partition)
