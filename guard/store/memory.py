"""In-process state store (the default): maps with per-key expiry, bounded in bytes, so a flood of
new client identities cannot exhaust memory, and every operation costs the same however many clients
are held (no sweep over all keys: expired keys are dropped when touched or evicted).

Two kinds of bound: detector state is *evicting* (the least recently used key makes room); sanctions
are *keeping* (``evict=False``): a key is never dropped before it expires, and when the store is
full of live keys a new one is refused with ``StoreFull``, so old blocks are never forgotten.
``swap_many`` tables are kept apart, as the Redis store keeps them: two generations of plain dicts,
each of at most half the table's bounds, written and read in bulk, that expire a generation at a
time (``_Table``)."""
from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from guard.store.base import Admitted, Charge, Update, UpdateMany, WindowCount

# What one entry costs beyond its key and value: the dict slot, the (expiry, value) tuple, the float,
# the objects' headers (measured with tracemalloc at about 250 bytes on CPython 3.11).
ENTRY_OVERHEAD = 300


class StoreFull(RuntimeError):
    """A keeping store holds ``max_bytes`` of live entries and cannot take a new key."""


def entry_bytes(key: object, value: object) -> int:
    """What an entry costs: ``ENTRY_OVERHEAD``, its key, and its value (bytes or str: their length; an
    int or None: 8; a tuple: 40 an item, and the length of its bytes and str items)."""
    if isinstance(value, tuple):
        size = 40 * len(value) + sum(len(item) for item in value if isinstance(item, (bytes, str)))
    else:
        size = 8 if value is None or isinstance(value, int) else len(value)  # type: ignore[arg-type]
    return ENTRY_OVERHEAD + len(key) + size  # type: ignore[arg-type]


class ExpiringMap:
    """Keys with an expiry, at most ``max_bytes`` (by ``entry_bytes``) in all. Evicting: the least
    recently used key goes first. Keeping: expired keys go (earliest expiry first), live ones never.
    The one byte-bounded LRU map of the stores (the Redis store's cache is one too)."""

    def __init__(self, max_bytes: int, evict: bool = True):
        self.max_bytes, self.evict, self.size = max_bytes, evict, 0
        self._items: OrderedDict[object, tuple[float, object]] = OrderedDict()
        self._expiries: list[tuple[float, object]] = []  # keeping maps: a heap, stale entries skipped

    def get(self, key: object, now: float) -> object | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= now:
            self.delete(key)
            return None
        self._items.move_to_end(key)
        return value

    def set(self, key: object, value: object, expires: float, now: float) -> None:
        old = self._items.get(key)
        grown = entry_bytes(key, value) - (entry_bytes(key, old[1]) if old else 0)
        if not self.evict and old is None:
            self._purge(now, grown)
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        self.size += grown
        if self.evict:
            while len(self._items) > 1 and self.size > self.max_bytes:
                oldest, (_, evicted) = self._items.popitem(last=False)
                self.size -= entry_bytes(oldest, evicted)
        else:
            heapq.heappush(self._expiries, (expires, key))
            if len(self._expiries) > 2 * len(self._items) + 16:  # drop stale heap entries, amortised
                self._expiries = [(e, k) for k, (e, _) in self._items.items()]
                heapq.heapify(self._expiries)

    def replace(self, key: object, value: object, expires: float) -> None:
        """Give a key just read (``get``) a new value of the same ``entry_bytes``, in place."""
        self._items[key] = (expires, value)

    def _purge(self, now: float, needed: int) -> None:
        """Drop expired keys, earliest first, until ``needed`` bytes fit; ``StoreFull`` if they do not."""
        while self.size + needed > self.max_bytes and self._expiries and self._expiries[0][0] <= now:
            expires, key = heapq.heappop(self._expiries)
            item = self._items.get(key)
            if item is not None and item[0] == expires:
                self.delete(key)
        if self.size + needed > self.max_bytes:
            raise StoreFull(f"the store holds {self.size} bytes of live entries (ceiling {self.max_bytes})")

    def full(self, now: float) -> bool:
        """Whether a new key would be refused now (keeping maps only; evicting ones always take it)."""
        if self.evict or self.size + ENTRY_OVERHEAD + 64 <= self.max_bytes:  # room without a purge
            return False
        try:
            self._purge(now, ENTRY_OVERHEAD + 64)
        except StoreFull:
            return True
        return False

    def delete(self, key: object) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.size -= entry_bytes(key, item[1])

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Generation:
    """One generation of a ``_Table``: its fields' values; the widest entry written (``entry_bytes``),
    so ``len(values) * widest`` bounds its bytes; when it becomes the previous generation
    (``rotates``) and when it is dropped (``expires``): half and all of its earliest write's ttl
    after that write."""

    values: dict[bytes, bytes] = field(default_factory=dict)
    widest: int = 0
    rotates: float = math.inf
    expires: float = math.inf

    def fits(self, fields: int, widest: int, max_fields: int, max_bytes: int) -> bool:
        """Whether ``fields`` more, none of them wider than ``widest``, surely stay within the bounds."""
        count = len(self.values) + fields
        return count <= max_fields and count * max(self.widest, widest) <= max_bytes

    def write(self, fields: list[bytes], values: list[bytes], widest: int, now: float, ttl: float) -> None:
        self.values.update(zip(fields, values))
        self.widest = max(self.widest, widest)
        self.rotates = min(self.rotates, now + ttl / 2)
        self.expires = min(self.expires, now + ttl)


class _Table:
    """A ``swap_many`` table kept as the Redis store keeps its own: two generations, each of at most
    half the bytes and half the fields; a field is read in the current generation, else in the
    previous one, and written to the current one, which becomes the previous one (the old previous
    one dropped) when it cannot surely take a call's fields. Expiry is per generation: a generation
    becomes the previous one at half its earliest write's ttl and is dropped at all of it, so a
    value is never returned after its ttl, and is remembered for at least half of it unless the
    bounds push it out first. Each call is a few C-level passes over its fields (``map``,
    ``dict.update``), no Python loop per field unless a field repeats within the call."""

    def __init__(self, max_bytes: int, max_fields: int):
        self.max_bytes, self.max_fields = max(1, max_bytes // 2), max(1, max_fields // 2)  # per generation
        self.current, self.previous = _Generation(), _Generation()

    def swap(self, fields: list[bytes], values: list[bytes], now: float, ttl: float) -> list[bytes | None]:
        """``StateStore.swap_many`` for this table."""
        if not fields:
            return []
        if self.current.rotates <= now:
            self._rotate()
        if self.previous.expires <= now:
            self.previous = _Generation()
        current, previous = self.current.values, self.previous.values
        found = list(map(current.get, fields, map(previous.get, fields)) if previous else map(current.get, fields))
        distinct = len(set(fields))
        if distinct < len(fields):
            _see_earlier_occurrences(found, fields, values)
        widest = ENTRY_OVERHEAD + max(map(len, fields)) + max(map(len, values))
        if not self.current.fits(distinct, widest, self.max_fields, self.max_bytes):
            self._rotate()
        if self.current.fits(distinct, widest, self.max_fields, self.max_bytes):
            self.current.write(fields, values, widest, now, ttl)
            return found
        step = max(1, min(self.max_fields, self.max_bytes // widest))  # a call larger than a generation
        for start in range(0, len(fields), step):
            if start:
                self._rotate()
            self.current.write(fields[start:start + step], values[start:start + step], widest, now, ttl)
        return found

    def _rotate(self) -> None:
        self.previous, self.current = self.current, _Generation()

    @property
    def size(self) -> int:
        """An upper bound of the bytes held (by ``entry_bytes``)."""
        return sum(len(generation.values) * generation.widest for generation in (self.current, self.previous))

    def __len__(self) -> int:
        """Fields held (a field in both generations counts twice)."""
        return len(self.current.values) + len(self.previous.values)


def _see_earlier_occurrences(found: list[bytes | None], fields: list[bytes], values: list[bytes]) -> None:
    """Give each repeated field of a call (in ``found``) the value its earlier occurrence set."""
    written: dict[bytes, bytes] = {}
    for i, (name, value) in enumerate(zip(fields, values)):
        if name in written:
            found[i] = written[name]
        written[name] = value


class MemoryStore:
    """Implements ``guard.store.base.StateStore`` in one process: at most ``max_bytes`` for the plain
    keys and for each ``swap_many`` table (which also holds at most ``max_table_fields`` fields, in
    two generations: ``_Table``).
    ``evict=False`` keeps live keys (see the module docstring). Rate-limit counters (``admit``) are
    kept apart, in at most ``counter_bytes``, the least recently used evicted first."""

    def __init__(self, max_bytes: int = 64 << 20, max_table_fields: int = 1_000_000, evict: bool = True,
                 counter_bytes: int = 16 << 20):
        self._keys = ExpiringMap(max_bytes, evict)
        self._counters = ExpiringMap(counter_bytes)
        self._tables: dict[str, _Table] = {}
        self._max_bytes = max_bytes
        self._max_table_fields = max_table_fields
        self._lock = asyncio.Lock()

    @property
    def full(self) -> bool:
        """Whether a new key would be refused (``StoreFull``) now."""
        return self._keys.full(time.monotonic())

    @property
    def size(self) -> int:
        """Bytes held, by ``entry_bytes``, keys and tables together (the tables': a bound)."""
        return self._keys.size + self._counters.size + sum(table.size for table in self._tables.values())

    async def get(self, key: str) -> bytes | None:
        return self._keys.get(key, time.monotonic())

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        now = time.monotonic()
        self._keys.set(key, value, now + ttl, now)

    async def delete(self, key: str) -> None:
        self._keys.delete(key)

    async def update(self, key: str, update: Update, ttl: float) -> bytes:
        return (await self.update_many([key], lambda values: [update(values[0])], ttl))[0]

    async def update_many(self, keys: list[str], update: UpdateMany, ttl: float) -> list[bytes]:
        async with self._lock:
            now = time.monotonic()
            old = [self._keys.get(key, now) for key in keys]
            new = update(old)
            for key, before, value in zip(keys, old, new, strict=True):
                if value is not before:
                    self._keys.set(key, value, now + ttl, now)
            return new

    async def swap_many(self, table: str, fields: list[bytes], value: bytes | list[bytes],
                        ttl: float) -> list[bytes | None]:
        entries = self._tables.get(table)
        if entries is None:
            entries = self._tables[table] = _Table(self._max_bytes, self._max_table_fields)
        return entries.swap(fields, [value] * len(fields) if isinstance(value, bytes) else value, time.monotonic(), ttl)

    async def admit(self, charge: Charge) -> Admitted:
        """One admission, as one synchronous step on the event loop (nothing can interleave).
        Counter windows are numbered on the wall clock, as in Redis (server time)."""
        standing = self._keys.get(charge.standing_key, time.monotonic())
        level = charge.level(standing)
        if charge.network_key is not None:
            covering = self._keys.get(charge.network_key, time.monotonic())
            if charge.level(covering) > level:
                standing, level = covering, charge.level(covering)
        if level >= charge.block_level:
            return Admitted(standing, blocked=True)
        limits = list(charge.limits)
        if level == charge.throttle_level:
            limits += charge.throttle_limits
        now = time.time()
        counters, counts, charged = self._counters, [], []
        for limit in limits:
            index, offset = divmod(now, limit.seconds)
            # One entry per counter, read and written once: (its window's number since the epoch,
            # the queries in that window, those in the window before it).
            window = counters.get(limit.key, now)
            if window is not None and window[0] == index:
                current, previous = window[1], window[2]
            else:
                current, previous = 0, window[1] if window is not None and window[0] == index - 1 else 0
            count = WindowCount(current, previous if charge.sliding else 0, offset / limit.seconds)
            counts.append(count)
            if charge.exceeds(limit, count):
                return Admitted(standing, False, tuple(counts), len(counts) - 1)
            charged.append((limit.key, (index, current + charge.cost, previous),
                            (index + (2 if charge.sliding else 1)) * limit.seconds, window is not None))
        for key, window, expires, held in charged:
            if held:  # read just now (and made the most recent): the same size, so only its value changes
                counters.replace(key, window, expires)
            else:
                counters.set(key, window, expires, now)
        return Admitted(standing, False, tuple(counts))

    def __len__(self) -> int:
        """Keys currently held (expired ones may still count until touched or evicted)."""
        return len(self._keys)
