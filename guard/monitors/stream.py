"""The scale-out deployment of the monitor (``monitor.deployment = "streams"``): web workers append
observations to Redis Streams and ``guard monitor`` processes judge them (``StreamMonitor``).

- Partitions: a client's observations always go to the same stream,
  ``<prefix>observations:<p>`` with ``p`` a hash of the client modulo ``monitor.partitions``, so
  one consumer at a time sees a client's queries, in order, and per-client detector state stays
  consistent.
- Bound: ``ObservationStream.offer`` appends with one atomic script that first checks the
  partition's backlog (entries are deleted once judged, so the stream's length is its backlog):
  ``max_pending`` entries, or an oldest entry older than ``max_delay`` (its ID is its time), is a
  fault and nothing is appended; the middleware then answers in the fail mode. A stream is never
  trimmed (``MAXLEN`` would drop unjudged observations silently): the backlog bound refuses instead.
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
import time

import numpy as np
import redis.asyncio as aioredis

from guard.metrics import GuardMetrics
from guard.monitors.base import Observation
from guard.monitors.monitor import Monitor, Queued, linger
from guard.policy import MonitorPolicy, Policy
from guard.sanctions import Sanctions
from guard.store.base import StoreUnavailable
from guard.store.redis import RedisStore, client_options

logger = logging.getLogger("guard")

GROUP = "monitors"

# KEYS: the partition's stream. ARGV: max_pending, max_delay (ms), then the entry's field/value pairs.
_OFFER = """
local backlog = redis.call('XLEN', KEYS[1])
if backlog >= tonumber(ARGV[1]) then return 0 end
if backlog > 0 then
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now - tonumber(string.match(oldest, '^(%d+)')) > tonumber(ARGV[2]) then return 0 end
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return 1
"""

# KEYS: a lease. ARGV: the monitor's name, the lease (ms). Renews the lease if the monitor holds it.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def partition_of(client: str, partitions: int) -> int:
    """The partition a client's observations go to (stable across processes and machines)."""
    return int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little") % partitions


def stream_key(prefix: str, partition: int) -> str:
    return f"{prefix}observations:{partition}"


def encode(observation: Observation) -> list[bytes]:
    """An observation as a stream entry's field/value pairs."""
    features = np.ascontiguousarray(observation.features, "<f8")
    return [b"client", observation.client.encode(), b"route", observation.route.encode(),
            b"rows", str(len(features)).encode(), b"features", features.tobytes(),
            b"predicted", np.ascontiguousarray(observation.predicted, "<i8").tobytes()]


def decode(fields: dict[bytes, bytes]) -> Observation:
    rows = int(fields[b"rows"])
    return Observation(fields[b"client"].decode(), np.frombuffer(fields[b"features"], "<f8").reshape(rows, -1),
                       np.frombuffer(fields[b"predicted"], "<i8"), fields[b"route"].decode())


class ObservationStream:
    """The web worker's side: appends each observation to its client's partition, within the bound."""

    escalations = 0  # sanctions are written by the monitor processes, unseen here

    def __init__(self, url: str, settings: MonitorPolicy, prefix: str = "predguard:", timeout: float = 0.25):
        self.settings, self.prefix = settings, prefix
        self._client = aioredis.Redis.from_url(url, **client_options(timeout))
        self._offer = self._client.register_script(_OFFER)

    def start(self) -> None:
        """Nothing to start: the monitors are processes of their own."""

    async def stop(self) -> None:
        await self._client.aclose()

    async def offer(self, observation: Observation) -> Queued:
        """Append ``observation``; refused (nothing appended) when its partition's backlog is full or
        its oldest entry has waited ``max_delay``. ``StoreUnavailable`` when Redis cannot be reached."""
        key = stream_key(self.prefix, partition_of(observation.client, self.settings.partitions))
        try:
            appended = await self._offer(keys=[key], args=[self.settings.max_pending,
                                                           int(self.settings.max_delay * 1000), *encode(observation)])
            return Queued.ACCEPTED if appended else Queued.REFUSED
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as error:
            raise StoreUnavailable(f"redis unreachable: {error}") from error


class StreamMonitor:
    """A ``guard monitor`` process: judges the observations of the partitions it holds."""

    def __init__(self, policy: Policy, name: str | None = None, metrics: GuardMetrics | None = None,
                 prefix: str = "predguard:", block: float = 0.05):
        self.settings, self.prefix, self.block = policy.monitor, prefix, block
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.redis = aioredis.Redis.from_url(policy.store, **client_options(5.0))
        self.store = RedisStore(policy.store, prefix=prefix)
        self.monitor = Monitor.from_policy(policy, self.store, Sanctions(self.store).escalate,
                                           metrics or GuardMetrics())
        self.owned: set[int] = set()
        self.inherited: set[int] = set()  # owned partitions that may still hold a previous owner's entries
        self._lease_ms = int(self.settings.lease * 1000)
        self.linger = linger(self.settings)
        self._rebalanced = -math.inf
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    async def run(self, stop: asyncio.Event) -> None:
        """Judge rounds until ``stop`` is set, then give the partitions back."""
        await self.create_groups()
        try:
            while not stop.is_set():
                await self.step()
        finally:
            for partition in self.owned:
                await self._release(keys=[self._lease(partition)], args=[self.name])
            await self.redis.zrem(self._alive, self.name)
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
        previous owner's pending entries first), judge it, acknowledge and delete it. Returns the
        observations judged."""
        if time.monotonic() - self._rebalanced >= self.settings.lease / 4:
            await self.rebalance()
            self._rebalanced = time.monotonic()
        entries: list[tuple[int, bytes, dict[bytes, bytes]]] = []
        for partition in sorted(self.inherited):
            claimed = await self.claim(partition)
            if claimed is None:
                self.inherited.discard(partition)
            else:
                entries += [(partition, entry_id, fields) for entry_id, fields in claimed]
        readable = sorted(self.owned - self.inherited)
        if not entries and readable:
            entries = await self.read(readable, self.settings.batch_size, block=True)
            if 0 < len(entries) < min(self.settings.batch_size, self.settings.max_pending):
                await asyncio.sleep(self.linger)  # let the batch fill: its fixed costs are most of a small one
                entries += await self.read(readable, self.settings.batch_size - len(entries), block=False)
        elif not entries:
            await asyncio.sleep(self.block)
        if entries:
            await self.judge(entries)
        return len(entries)

    async def read(self, partitions: list[int], count: int, block: bool) -> list[tuple[int, bytes, dict]]:
        """Up to ``count`` new entries of ``partitions`` (with ``block``, waiting up to ``self.block`` s for one)."""
        streams = {stream_key(self.prefix, p): ">" for p in partitions}
        answer = await self.redis.xreadgroup(GROUP, self.name, streams, count=count,
                                             block=int(self.block * 1000) if block else None)
        by_key = {stream_key(self.prefix, p): p for p in partitions}
        return [(by_key[key.decode()], entry_id, fields) for key, found in answer or [] for entry_id, fields in found]

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
        try:
            await self.monitor.process([decode(fields) for _, _, fields in entries])
        except Exception:
            logger.exception("guard monitor %s: failed on a batch of %d observations", self.name, len(entries))
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in {p for p, _, _ in entries}:
                ids = [entry_id for p, entry_id, _ in entries if p == partition]
                pipe.xack(stream_key(self.prefix, partition), GROUP, *ids)
                pipe.xdel(stream_key(self.prefix, partition), *ids)
            await pipe.execute()

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
        for partition in sorted(self.owned):
            if not await self._renew(keys=[self._lease(partition)], args=[self.name, self._lease_ms]):
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
